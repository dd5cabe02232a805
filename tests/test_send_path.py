"""The one send path: bounded attempts, waits as the policy says, quota counted honestly,
and nothing of a borrowed client's identity sent where it does not belong."""

from __future__ import annotations

import email.utils
import itertools
import pathlib
import statistics
import time

import anyio
import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async._scheduler import RequestKind, Scheduler
from amp_cohorts_async.testing import FakeAmplitude

from .conftest import FAST_POLL


def client_for(fake: FakeAmplitude, **kwargs: object) -> amp.CohortsClient:
    kwargs.setdefault("poll", FAST_POLL)
    if "http_client" not in kwargs:
        kwargs["transport"] = fake.transport()
    return amp.CohortsClient(fake.api_key, fake.secret_key, seed=3,
                             **kwargs)  # type: ignore[arg-type]


# -- attempts -------------------------------------------------------------------------------


@pytest.mark.looptime
@pytest.mark.parametrize("attempts", [1, 3, 6])
async def test_file_is_attempted_exactly_max_attempts_times(
    fake: FakeAmplitude, tmp_path: pathlib.Path, attempts: int
) -> None:
    fake.inject("file", "status", status=503, times=100)
    async with client_for(fake, retry=amp.RetryPolicy(max_attempts=attempts)) as client:
        request = await client.request_cohort("large")
        with pytest.raises(amp.DownloadError) as caught:
            await client.download_file(request.request_id, tmp_path / "out.csv")
    assert len(fake.requests_to("file")) == attempts
    assert caught.value.attempts == attempts
    if attempts > 1:
        assert f"after {attempts} attempts" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.looptime
async def test_default_policy_makes_six_attempts_in_all(fake: FakeAmplitude,
                                                        tmp_path: pathlib.Path) -> None:
    fake.inject("file", "status", status=503, times=100)
    async with client_for(fake) as client:
        with pytest.raises(amp.DownloadError, match="after 6 attempts"):
            await client.download_cohort("large", tmp_path)
    assert len(fake.requests_to("file")) == 6


@pytest.mark.looptime
async def test_an_endpoint_error_says_how_many_attempts(fake: FakeAmplitude) -> None:
    fake.inject("list", "status", status=502, times=100)
    async with client_for(fake, retry=amp.RetryPolicy(max_attempts=4)) as client:
        with pytest.raises(amp.ServerError) as caught:
            await client.list_cohorts()
    assert len(fake.requests_to("list")) == 4
    assert caught.value.attempts == 4
    assert str(caught.value).endswith("(after 4 attempts)")


async def test_status_error_message_is_the_servers_own(fake: FakeAmplitude) -> None:
    async with client_for(fake) as client:
        with pytest.raises(amp.NotFoundError) as caught:
            await client.request_cohort("no-such-cohort")
    error = caught.value
    assert error.message == "Cohort no-such-cohort not found"
    assert error.request_line == "GET https://amplitude.com/api/5/cohorts/request/no-such-cohort"
    assert str(error) == (f"HTTP 404 {error.type}: Cohort no-such-cohort not found "
                          f"(GET https://amplitude.com/api/5/cohorts/request/no-such-cohort)")


# -- waits ----------------------------------------------------------------------------------


@pytest.mark.looptime
async def test_an_http_date_retry_after_is_honoured() -> None:
    seen: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(anyio.current_time())
        if len(seen) == 1:
            when = email.utils.formatdate(time.time() + 40, usegmt=True)
            return httpx.Response(429, headers={"Retry-After": when})
        return httpx.Response(200, json={"cohorts": []})

    async with amp.CohortsClient("k", "s", transport=httpx.MockTransport(answer)) as client:
        await client.list_cohorts()
    # The date has a one-second resolution, and a small spread is added on the way out of
    # the shared pause; without the date the default backoff would wait at most 0.5 s.
    assert 38.5 <= seen[1] - seen[0] <= 42.5


@pytest.mark.looptime
async def test_poll_intervals_grow_by_the_multiplier_with_jitter(tmp_path: pathlib.Path) -> None:
    policy = amp.PollPolicy(initial_interval=2.0, multiplier=2.0, max_interval=20.0, jitter=0.2)
    with FakeAmplitude(job_duration=400.0, latency=0.0) as fake:
        fake.add_cohort("c", size=10)
        async with client_for(fake, poll=policy) as client:
            client.scheduler.idle = lambda: False  # type: ignore[method-assign]  # a busy client
            await client.download_cohort("c", tmp_path)
        times = [e.time for e in fake.log if e.endpoint in ("request", "status")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    nominal = [min(20.0, 2.0 * 2.0**n) for n in range(len(gaps))]
    for gap, expected in zip(gaps, nominal, strict=True):
        assert expected * 0.8 - 1e-6 <= gap <= expected * 1.2 + 1e-6
    capped = gaps[5:]  # 2, 4, 8, 16, then 20 forever
    assert len(capped) >= 10
    assert 19.0 <= statistics.mean(capped) <= 21.0
    assert statistics.pstdev(capped) > 0.5  # jittered, not a fixed 20 s


@pytest.mark.looptime
async def test_an_idle_client_polls_every_idle_interval(tmp_path: pathlib.Path) -> None:
    with FakeAmplitude(job_duration=120.0, latency=0.0) as fake:
        fake.add_cohort("c", size=10)
        async with client_for(fake, poll=amp.PollPolicy()) as client:  # the defaults
            assert client.scheduler.idle()
            await client.download_cohort("c", tmp_path)
        times = [e.time for e in fake.log if e.endpoint in ("request", "status")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(1.6 - 1e-6 <= gap <= 2.4 + 1e-6 for gap in gaps)  # 2 s +/- 20 %, not growing
    assert times[-1] - 120.0 <= 2.4  # the finished job was seen within one idle interval
    assert len(gaps) <= 120.0 / 1.6 + 2  # no more than one status request per 1.6 s


async def test_the_gate_is_idle_only_with_a_free_slot_and_nobody_queued() -> None:
    scheduler = Scheduler(amp.Limits(max_concurrent_requests=1))
    assert scheduler.idle()
    async with scheduler.exchange(RequestKind.POLL):
        assert not scheduler.idle()
    assert scheduler.idle()


# -- the gate -------------------------------------------------------------------------------


async def test_status_polls_wait_behind_cohort_requests_at_the_gate() -> None:
    scheduler = Scheduler(amp.Limits(max_concurrent_requests=1, monthly_quota=None))
    order: list[str] = []
    holding = anyio.Event()
    release = anyio.Event()

    async def hold() -> None:
        async with scheduler.exchange(RequestKind.OTHER):
            holding.set()
            await release.wait()

    async def take(name: str, kind: RequestKind) -> None:
        async with scheduler.exchange(kind):
            order.append(name)

    async with anyio.create_task_group() as group:
        group.start_soon(hold)
        await holding.wait()
        group.start_soon(take, "poll", RequestKind.POLL)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(take, "file", RequestKind.FILE)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(take, "cohort request", RequestKind.COHORT_REQUEST)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert order == ["cohort request", "file", "poll"]


# -- quota ----------------------------------------------------------------------------------


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("failure", "spent"),
    [(httpx.ConnectError, 0),  # never left this machine: refunded
     (httpx.ReadTimeout, 3)],  # the server may have acted on each attempt: counted
)
async def test_quota_counts_only_requests_that_may_have_reached_the_server(
    failure: type[httpx.TransportError], spent: int
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise failure("no luck", request=request)

    async with amp.CohortsClient("k", "s", transport=httpx.MockTransport(fail),
                                 retry=amp.RetryPolicy(max_attempts=3)) as client:
        with pytest.raises(amp.TransportError) as caught:
            await client.request_cohort("c1")
        assert caught.value.never_sent is (spent == 0)
        assert await client.scheduler.quota_used() == spent


async def test_a_refused_connection_over_a_real_socket_costs_no_quota() -> None:
    with FakeAmplitude() as fake:
        async with fake.serve() as base_url:
            pass  # the port is closed again: connections to it are refused
        async with amp.CohortsClient(fake.api_key, fake.secret_key, base_url=base_url,
                                     retry=amp.RetryPolicy(max_attempts=2,
                                                           initial_delay=0.01)) as client:
            with pytest.raises(amp.TransportError):
                await client.request_cohort("c1")
            assert await client.scheduler.quota_used() == 0


# -- a borrowed client's identity -------------------------------------------------------------


@pytest.mark.looptime
async def test_a_borrowed_clients_auth_headers_and_cookies_stay_home(
    fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    borrowed = httpx.AsyncClient(transport=fake.transport(), auth=("someone", "else"),
                                 headers={"X-Team": "data"}, cookies={"session": "s3cr3t"})
    async with borrowed, client_for(fake, http_client=borrowed) as client:
        result = await client.download_cohort("large", tmp_path)  # through the 302 to S3
    assert result.size_bytes > 0
    (s3,) = fake.requests_to("s3")
    assert s3.status == 200
    assert "authorization" not in {k.lower() for k in s3.headers}
    assert "x-team" not in {k.lower() for k in s3.headers}
    assert "cookie" not in {k.lower() for k in s3.headers}
    # Requests to Amplitude carry our credentials, not the borrowed client's auth.
    assert fake.violations == []
    assert all(e.status < 400 for e in fake.log)


@pytest.mark.looptime
@pytest.mark.parametrize("where", ["gate", "pause"])
async def test_a_cohort_request_cancelled_while_it_waits_costs_nothing(where: str) -> None:
    """Cancelled at the concurrency gate or in the shared pause: it never left the machine,
    so it is neither counted against the quota nor stamped into the rate windows."""
    release = anyio.Event()
    cohort_requests = 0

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal cohort_requests
        if request.url.path == "/api/3/cohorts":
            await release.wait()  # holds the only slot
            return httpx.Response(200, json={"cohorts": []})
        cohort_requests += 1
        return httpx.Response(200, json={"request_id": f"r{cohort_requests}"})

    limits = amp.Limits(max_concurrent_requests=1, cohort_requests=(amp.RateWindow(1, 600.0),))
    async with amp.CohortsClient("k", "s", transport=httpx.MockTransport(answer),
                                 limits=limits) as client, anyio.create_task_group() as group:
        if where == "gate":
            group.start_soon(client.list_cohorts)
            await anyio.wait_all_tasks_blocked()
        else:
            await client.scheduler.pause(30.0)
        with anyio.move_on_after(5.0):
            await client.request_cohort("c1")
        assert await client.scheduler.quota_used() == 0
        release.set()
        await anyio.sleep(30.0)  # past any pause
        started = anyio.current_time()
        await client.request_cohort("c2")  # the window (1 per 600 s) is still free
        assert anyio.current_time() - started < 1.0
        assert cohort_requests == 1
        assert await client.scheduler.quota_used() == 1
