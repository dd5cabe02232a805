"""Shared limits on a real redis-server: the backend's operations, then several processes.

These run in real time against the Redis that the ``redis_url`` fixture provides (a
redis-server started for the run); windows are scaled down to fractions of a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pathlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amp_cohorts_async as amp
from amp_cohorts_async._scheduler import RequestKind
from amp_cohorts_async.redis import RedisLimits
from amp_cohorts_async.testing import FakeAmplitude

WORKER = pathlib.Path(__file__).with_name("limits_worker.py")
SCALED = amp.Limits(max_concurrent_requests=3, cohort_requests=(amp.RateWindow(20, 2.0),),
                    monthly_quota=None)


SharedLimits = RedisLimits | amp.FileLimits


@pytest.fixture(params=["redis", "file"])
def open_backend(request: pytest.FixtureRequest, tmp_path: pathlib.Path
                 ) -> Callable[[], SharedLimits]:
    """Opens one more view of one shared store: on Redis, or in a file (the same protocol)."""
    if request.param == "file":
        path = tmp_path / "limits.sqlite3"
        return lambda: amp.FileLimits(path, lease_ttl=0.5)
    redis_url = request.getfixturevalue("redis_url")
    namespace = f"t-{uuid.uuid4().hex}"
    return lambda: RedisLimits.from_url(redis_url, namespace=namespace, lease_ttl=0.5)


@pytest.fixture
async def backend(open_backend: Callable[[], SharedLimits]) -> AsyncIterator[SharedLimits]:
    async with open_backend() as limits:
        yield limits


def slot() -> amp.PermitRequest:
    return amp.PermitRequest(slot=True, cohort=False)


def cohort(quota: int | None = None) -> amp.PermitRequest:
    return amp.PermitRequest(slot=False, cohort=True, quota=quota)


# -- the operations ----------------------------------------------------------------------------


async def test_slots_are_granted_up_to_the_limit_and_come_back(backend: SharedLimits) -> None:
    backend.bind(amp.Limits(max_concurrent_requests=2), "app")
    first, second = await backend.acquire(slot()), await backend.acquire(slot())
    assert isinstance(first, amp.Permit)
    assert isinstance(second, amp.Permit)
    assert await backend.acquire(slot()) == amp.PermitWait(math.inf, "slots")
    assert await backend.release([first], None) == 0
    assert isinstance(await backend.acquire(slot()), amp.Permit)


async def test_the_window_is_exact_and_says_how_long_to_wait(backend: SharedLimits) -> None:
    backend.bind(amp.Limits(cohort_requests=(amp.RateWindow(2, 0.6),), monthly_quota=None),
                 "app")
    a, b = await backend.acquire(cohort()), await backend.acquire(cohort())
    assert isinstance(a, amp.Permit)
    assert isinstance(b, amp.Permit)
    assert await backend.acquire(cohort()) == amp.PermitWait(math.inf, "window")  # in flight
    settled = time.monotonic()
    await backend.release([a], amp.Settlement(stamp=True, refund=False))
    wait = await backend.acquire(cohort())
    assert isinstance(wait, amp.PermitWait)
    assert wait.reason == "window"
    assert 0 < wait.seconds <= 0.602  # whatever time passed since the answer
    await anyio.sleep(wait.seconds - (time.monotonic() - settled) + 0.01)
    assert isinstance(await backend.acquire(cohort()), amp.Permit)


async def test_a_request_that_never_left_leaves_no_stamp_and_no_quota(
    backend: SharedLimits
) -> None:
    backend.bind(amp.Limits(cohort_requests=(amp.RateWindow(1, 60.0),)), "app")
    permit = await backend.acquire(cohort(quota=1))
    assert isinstance(permit, amp.Permit)
    assert await backend.quota_used() == 1
    assert await backend.quota_used(permit.month) == 1
    await backend.release([permit], amp.Settlement(stamp=False, refund=True))
    assert await backend.quota_used() == 0
    assert isinstance(await backend.acquire(cohort(quota=1)), amp.Permit)  # window still free
    with pytest.raises(amp.QuotaExceededError, match=f"1 of 1 used in {permit.month}"):
        await backend.acquire(cohort(quota=1))


async def test_known_usage_and_the_pause_are_shared(
    backend: SharedLimits, open_backend: Callable[[], SharedLimits]
) -> None:
    backend.bind(amp.Limits(), "app")
    async with open_backend() as other:
        other.bind(amp.Limits(), "app")
        await backend.set_known_usage("2026-11", 42)
        await backend.set_known_usage("2026-11", 7)  # never lowers the count
        assert await other.quota_used("2026-11") == 42
        await other.pause(0.4)
        wait = await backend.acquire(slot())
        assert isinstance(wait, amp.PermitWait)
        assert wait.reason == "pause"
        assert 0 < wait.seconds <= 0.4


async def test_a_lease_not_renewed_expires_and_is_reported(backend: SharedLimits) -> None:
    backend.bind(amp.Limits(max_concurrent_requests=1), "app")
    held = await backend.acquire(slot())
    assert isinstance(held, amp.Permit)
    assert await backend.acquire(slot()) == amp.PermitWait(math.inf, "slots")
    await anyio.sleep(0.6)  # lease_ttl=0.5 without a renewal: the holder is presumed dead
    taken = await backend.acquire(slot())
    assert isinstance(taken, amp.Permit)
    assert await backend.renew([held]) == 1  # the late holder hears its lease is gone
    assert await backend.release([held], None) == 0  # reported once, not twice
    assert await backend.release([taken], None) == 0


async def test_a_held_exchange_keeps_its_lease(open_backend: Callable[[], SharedLimits]
                                              ) -> None:
    async with open_backend() as limits:
        with FakeAmplitude() as fake:
            async with fake.serve() as base_url, amp.CohortsClient(
                fake.api_key, fake.secret_key, base_url=base_url, limits_backend=limits,
                limits=amp.Limits(max_concurrent_requests=1),
            ) as client:
                async with client.scheduler.exchange(RequestKind.OTHER):
                    await anyio.sleep(1.3)  # more than twice the TTL, renewed meanwhile
                    assert await limits.acquire(slot()) == amp.PermitWait(math.inf, "slots")
                assert client.scheduler.leases_lost == 0
                await client.list_cohorts()


async def test_apps_are_kept_apart_and_no_key_is_stored(redis_url: str) -> None:
    import redis.asyncio as aioredis

    limits = amp.Limits(max_concurrent_requests=1)
    async with RedisLimits.from_url(redis_url) as one, RedisLimits.from_url(redis_url) as two:
        key_one, key_two = f"key-{uuid.uuid4().hex}", f"key-{uuid.uuid4().hex}"
        amp.CohortsClient(key_one, "secret", limits=limits, limits_backend=one)
        amp.CohortsClient(key_two, "secret", limits=limits, limits_backend=two)
        assert isinstance(await one.acquire(slot()), amp.Permit)
        assert isinstance(await two.acquire(slot()), amp.Permit)  # another app's slot
        with pytest.raises(amp.InvalidRequestError, match="another app"):
            amp.CohortsClient(key_two, "secret", limits=limits, limits_backend=one)
        redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        async with redis:
            keys = [k async for k in redis.scan_iter("amp-cohorts:*")]
            values = [str(await redis.dump(k)) for k in keys]
        assert keys
        assert not any(secret in text for text in keys + values for secret in (key_one, key_two))


async def test_an_unreachable_redis_is_a_named_error_without_the_password() -> None:
    limits = RedisLimits.from_url("redis://:s3cret-pw@127.0.0.1:1/0")
    async with limits, amp.CohortsClient("k", "s", limits_backend=limits) as client:
        with pytest.raises(amp.LimitsBackendError) as caught:
            await client.list_cohorts()
    text = str(caught.value)
    assert "redis://127.0.0.1:1/0" in text
    assert "s3cret" not in text
    assert "never falls back" in text


async def test_the_quota_month_is_the_redis_servers(redis_url: str) -> None:
    """A host whose clock says another month still counts in the month Redis says: hosts
    whose clocks straddle midnight at the end of a month count in one month."""
    import redis.asyncio as aioredis

    async with RedisLimits.from_url(redis_url, namespace=uuid.uuid4().hex) as limits:
        with FakeAmplitude() as fake:
            fake.add_cohort("c")
            async with amp.CohortsClient(
                fake.api_key, fake.secret_key, transport=fake.transport(), limits_backend=limits,
                wall_clock=lambda: datetime(2020, 1, 31, 23, 59, 59, tzinfo=UTC),
            ) as client:
                await client.request_cohort("c")
        redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        async with redis:
            seconds, _ = await redis.time()
        server_month = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m")
        assert await limits.quota_used() == 1
        assert await limits.quota_used(server_month) == 1
        assert await limits.quota_used("2020-01") == 0


async def test_the_servers_month_is_the_calendar_month(redis_url: str) -> None:
    import redis.asyncio as aioredis

    from amp_cohorts_async.redis import _PRELUDE

    starts = [datetime(year, month, 1, tzinfo=UTC) for year in (1970, 1999, 2000, 2024, 2026,
                                                                2100, 2400)
              for month in range(1, 13)]
    moments = [t.timestamp() + delta for t in starts for delta in (-1, 0, 86_399)]
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    async with redis:
        months = [await redis.eval(_PRELUDE + "return utc_month(tonumber(ARGV[1]))", 0,
                                   str(int(moment))) for moment in moments]
    assert months == [datetime.fromtimestamp(m, UTC).strftime("%Y-%m") for m in moments]


async def test_a_redis_cluster_shares_the_limits(redis_cluster_url: str,
                                                tmp_path: pathlib.Path) -> None:
    """Two clients, each with its own cluster client, share one budget on a 3-master Redis
    Cluster: every key of the app in one hash slot, no violation, every cohort started once."""
    from redis.asyncio.cluster import RedisCluster

    namespace = uuid.uuid4().hex
    with FakeAmplitude(limits=SCALED, job_duration=0.2) as fake:
        ids = [fake.add_cohort(f"c{i:02d}", size=5).id for i in range(24)]
        async with RedisLimits.from_url(redis_cluster_url, namespace=namespace, lease_ttl=1.0,
                                        cluster=True) as one, \
                RedisLimits.from_url(redis_cluster_url, namespace=namespace, lease_ttl=1.0,
                                     cluster=True) as two:
            outcomes: list[amp.CohortOutcome] = []

            async def batch(limits: RedisLimits, part: list[str], directory: str) -> None:
                async with amp.CohortsClient(
                    fake.api_key, fake.secret_key, transport=fake.transport(), limits=SCALED,
                    limits_backend=limits, poll=amp.PollPolicy(initial_interval=0.1,
                                                               max_interval=0.2),
                ) as client:
                    outcomes.extend(await client.download_cohorts(part, tmp_path / directory))

            with anyio.fail_after(60):
                async with anyio.create_task_group() as group:
                    group.start_soon(batch, one, ids[::2], "one")
                    group.start_soon(batch, two, ids[1::2], "two")
            assert one.state_losses == two.state_losses == 0
        cluster = RedisCluster.from_url(redis_cluster_url, decode_responses=True)
        async with cluster:
            keys = [key async for key in cluster.scan_iter(f"amp-cohorts:{{{namespace}}}:*")]
            slots = {await cluster.cluster_keyslot(key) for key in keys}
    assert len(keys) >= 3  # the state, the window log, the quota
    assert len(slots) == 1
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    assert fake.violations == []
    assert started_cohorts(fake) == sorted(ids)


# Passwords made of distinctive pieces: no piece may show in any message.
PIECES = ("Qx7", "Zk9", "Vw3", "Jm5")


@pytest.mark.parametrize("url", [
    "redis://:Qx7/Zk9#Vw3?Jm5@127.0.0.1:1/0",
    "redis://user:Qx7#Zk9@127.0.0.1:1/0",
    "redis://:Qx7?Zk9@127.0.0.1:1/0",
    "redis://:Qx7/Zk9@127.0.0.1:1/0",
    "redis://:6379/Qx7@127.0.0.1:1/0",  # a password that looks like a port and a path
    "redis://:Qx7@Zk9@127.0.0.1:1/0",  # an unescaped '@'
    "redis://:Qx7Zk9@127.0.0.1:notaport/0",
    "redis://:Qx7Zk9@127.0.0.1:1/notadb",
    "redis://:Qx7Zk9@[::1/0",
    "redis://127.0.0.1:1/0?password=Qx7/Zk9@Vw3",
    "redis://:Qx7Zk9\udcff@127.0.0.1:1/0",  # a byte that was not UTF-8
    "rediss://Jm5:Qx7 Zk9@127.0.0.1:1/0",
    "unix://:Qx7/Zk9@/tmp/no-such.sock",
])
async def test_no_part_of_the_password_is_ever_shown(url: str) -> None:
    """However malformed the URL: refused at once, or failing to connect, neither message nor
    repr shows any part of the password."""
    messages = []
    try:
        limits = RedisLimits.from_url(url)
    except amp.InvalidRequestError as error:
        messages.append(str(error))
    else:
        messages.append(repr(limits))
        async with limits:
            limits.bind(amp.Limits(), "app")
            with pytest.raises(amp.LimitsBackendError) as caught:
                await limits.acquire(slot())
            messages.append(str(caught.value))
    for text in messages:
        assert not [piece for piece in PIECES if piece in text], text


@pytest.mark.parametrize("bad", [
    lambda: RedisLimits.from_url("http://host"),
    lambda: RedisLimits.from_url("redis://h", lease_ttl=0),
    lambda: RedisLimits.from_url("redis://h", lease_ttl=math.nan),
    lambda: RedisLimits.from_url("redis://h", namespace="a b"),
    lambda: amp.CohortsClient("k", "s", limits_backend="redis://h"),  # type: ignore[arg-type]
])
def test_bad_backend_arguments(bad: object) -> None:
    with pytest.raises(amp.InvalidRequestError):
        bad()  # type: ignore[operator]


# -- property: random arrivals, faults, cancellations and dead holders never over-grant ------

ops = st.lists(
    st.tuples(st.floats(0.0, 0.6),  # when
              st.sampled_from(["ok", "ok", "ok", "cancel", "429", "500", "crash"])),
    min_size=1, max_size=10,
)


@pytest.mark.parametrize("kind", ["memory", "redis", "file"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(plan=ops)
def test_backends_never_over_grant_a_window(redis_url: str, tmp_path: pathlib.Path,
                                            plan: list[tuple[float, str]], kind: str) -> None:
    limits = amp.Limits(max_concurrent_requests=2, cohort_requests=(amp.RateWindow(3, 0.4),),
                        monthly_quota=None)

    async def main() -> None:
        backend: amp.LimitsBackend = {
            "memory": amp.InMemoryLimits,
            "redis": lambda: RedisLimits.from_url(redis_url, namespace=uuid.uuid4().hex,
                                                  lease_ttl=0.5),
            "file": lambda: amp.FileLimits(tmp_path / f"{uuid.uuid4().hex}.sqlite3",
                                           lease_ttl=0.5),
        }[kind]()
        shared = kind != "memory"
        with FakeAmplitude(limits=limits) as fake:
            fake.add_cohort("c", size=3)
            async with fake.serve() as base_url, amp.CohortsClient(
                fake.api_key, fake.secret_key, base_url=base_url, limits=limits,
                limits_backend=backend, retry=amp.RetryPolicy(max_attempts=2,
                                                              initial_delay=0.01),
            ) as client, anyio.create_task_group() as group:

                async def one(at: float, fate: str) -> None:
                    await anyio.sleep(at)
                    if fate == "crash":  # a holder that dies with its permit
                        if not shared:
                            return  # one process: a crash takes the whole budget with it
                        await backend.acquire(amp.PermitRequest(slot=True, cohort=True))
                        return
                    if fate in ("429", "500"):
                        fake.inject("request", "status", status=int(fate))
                    with anyio.move_on_after(0.05 if fate == "cancel" else math.inf), \
                            contextlib.suppress(amp.AmplitudeError):
                        await client.request_cohort("c")

                for at, fate in plan:
                    group.start_soon(one, at, fate)
            assert fake.violations == []
        await backend.aclose()

    anyio.run(main)


# -- several processes on one account ---------------------------------------------------------

async def run_workers(base_url: str, spec: str, groups: list[list[str]], out: pathlib.Path,
                      namespace: str, *, during: Callable[[], Awaitable[None]] | None = None,
                      **env_extra: str) -> list[dict[str, object]]:
    """Run one worker per group of ids, all started together; ``during`` runs beside them."""
    env = {**os.environ, "AMP_TEST_NAMESPACE": namespace, **env_extra}
    processes = []
    for index, ids in enumerate(groups):
        directory = out / f"w{index}"
        directory.mkdir()
        processes.append(await anyio.open_process(
            [sys.executable, str(WORKER), "download", base_url, spec, str(directory), *ids],
            env=env))
    readers = [BufferedByteReceiveStream(p.stdout) for p in processes if p.stdout]
    try:
        with anyio.fail_after(90):  # a run that breaks the limits must fail, not hang
            return await _drive(processes, readers, during)
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
            await process.aclose()


async def _drive(processes: list[anyio.abc.Process], readers: list[BufferedByteReceiveStream],
                 during: Callable[[], Awaitable[None]] | None = None) -> list[dict[str, object]]:
    for reader in readers:  # everyone imported and connected: start together
        assert await reader.receive_until(b"\n", 1 << 16) == b"ready"
    for process in processes:
        assert process.stdin is not None
        await process.stdin.send(b"go\n")
    results = []
    async with anyio.create_task_group() as group:
        if during is not None:
            group.start_soon(during)
        for process, reader in zip(processes, readers, strict=True):
            results.append(json.loads(await reader.receive_until(b"\n", 1 << 20)))
            await process.wait()
    return results


def started_cohorts(fake: FakeAmplitude) -> list[str]:
    """The cohort of each accepted export request, sorted."""
    return sorted(e.path.rsplit("/", 1)[-1] for e in fake.log
                  if e.endpoint == "request" and e.status == 202)


async def test_four_processes_share_one_budget_without_a_violation(
    redis_url: str, tmp_path: pathlib.Path
) -> None:
    with FakeAmplitude(limits=SCALED, job_duration=0.3, latency=(0.001, 0.005)) as fake:
        ids = [fake.add_cohort(f"c{i:02d}", size=20).id for i in range(60)]
        async with fake.serve() as base_url:
            results = await run_workers(base_url, redis_url, [ids[i::4] for i in range(4)],
                                        tmp_path, uuid.uuid4().hex)
    # Only what cannot flake on a busy machine: completion, no violation, each cohort started
    # once. How close the batch came to the bound is measured in benchmarks/distributed.py.
    assert [r["ok"] for r in results] == [15, 15, 15, 15]
    assert fake.violations == []
    assert not [e for e in fake.log if e.status == 429]
    assert started_cohorts(fake) == sorted(ids)
    assert fake.max_active <= 3


async def test_a_killed_holder_gives_its_slot_back_within_the_ttl(
    redis_url: str, tmp_path: pathlib.Path
) -> None:
    import redis.asyncio as aioredis

    namespace = uuid.uuid4().hex
    env = {**os.environ, "AMP_TEST_NAMESPACE": namespace, "AMP_TEST_LEASE_TTL": "1.0"}
    hog = await anyio.open_process([sys.executable, str(WORKER), "hog", redis_url], env=env)
    async with hog:
        assert hog.stdout is not None
        reader = BufferedByteReceiveStream(hog.stdout)
        token = json.loads(await reader.receive_until(b"\n", 1 << 16))["token"]
        await anyio.sleep(1.5)  # alive and renewing past its TTL: still held
        redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        async with redis:
            slots = f"amp-cohorts:{{{namespace}}}:slots"
            assert await redis.zscore(slots, token) is not None
            os.kill(hog.pid, signal.SIGKILL)
            await hog.wait()
            expiry = await redis.zscore(slots, token)
            seconds, micros = await redis.time()
            assert expiry is not None
            assert expiry / 1e6 - (seconds + micros / 1e6) <= 1.0  # back within the TTL
        with FakeAmplitude(limits=SCALED, job_duration=0.2) as fake:
            ids = [fake.add_cohort(f"c{i}", size=5).id for i in range(12)]
            async with fake.serve() as base_url:
                results = await run_workers(base_url, redis_url, [ids[:6], ids[6:]], tmp_path,
                                            namespace)
    assert [r["ok"] for r in results] == [6, 6]
    assert fake.violations == []


async def test_per_process_limits_break_the_account_limits(tmp_path: pathlib.Path) -> None:
    """Why the shared backend exists: four processes, each obeying the limits on its own,
    together exceed them (the emulator counts for the account, as Amplitude does)."""
    with FakeAmplitude(limits=SCALED, job_duration=0.3, latency=(0.001, 0.005)) as fake:
        ids = [fake.add_cohort(f"c{i:02d}", size=20).id for i in range(40)]
        async with fake.serve() as base_url:
            await run_workers(base_url, "memory", [ids[i::4] for i in range(4)], tmp_path,
                              "unused", AMP_TEST_RETRY_AFTER_CAP="0.2")
    kinds = {v.kind for v in fake.violations}
    assert "window" in kinds or "concurrency" in kinds
    assert len(fake.violations) > 0




async def test_the_command_line_shares_limits_through_limits_url(
    redis_url: str, tmp_path: pathlib.Path
) -> None:
    """Two amp-cohorts processes with --limits-url / AMPLITUDE_LIMITS_URL share one budget."""
    import redis.asyncio as aioredis

    with FakeAmplitude(job_duration=0.2, api_key=f"key-{uuid.uuid4().hex}") as fake:
        fake.add_cohort("a", size=5)
        fake.add_cohort("b", size=5)
        async with fake.serve() as base_url:
            env = {**os.environ, "AMPLITUDE_API_KEY": fake.api_key,
                   "AMPLITUDE_SECRET_KEY": fake.secret_key}
            command = [sys.executable, "-m", "amp_cohorts_async", "download", "--base-url",
                       base_url, "--poll-interval", "0.1"]
            async with anyio.create_task_group() as group:
                group.start_soon(lambda: anyio.run_process(
                    [*command, "a", "-o", str(tmp_path / "a"), "--limits-url", redis_url],
                    env=env))
                group.start_soon(lambda: anyio.run_process(
                    [*command, "b", "-o", str(tmp_path / "b")],
                    env={**env, "AMPLITUDE_LIMITS_URL": redis_url}))
    assert (tmp_path / "a" / "a.csv").exists()
    assert (tmp_path / "b" / "b.csv").exists()
    namespace = hashlib.sha256(fake.api_key.encode()).hexdigest()[:16]
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    async with redis:
        seconds, _ = await redis.time()
        month = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m")
        assert await redis.hget(f"amp-cohorts:{{{namespace}}}:quota", month) == "2"
