"""The client against the fake with Amplitude's real limits, in virtual time."""

from __future__ import annotations

import itertools
import pathlib

import anyio
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude

from .conftest import FAST_POLL


@pytest.mark.looptime
async def test_a_batch_draws_no_429_and_no_violation(tmp_path: pathlib.Path) -> None:
    with FakeAmplitude(job_duration=(20.0, 120.0), latency=(0.02, 0.5), seed=3) as fake:
        ids = [fake.add_cohort(size=30).id for _ in range(30)]
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     poll=FAST_POLL, seed=1) as client:
            started = anyio.current_time()
            outcomes = await client.download_cohorts(ids, tmp_path)
            elapsed = anyio.current_time() - started
    assert [o.cohort_id for o in outcomes] == ids
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes if o.error]
    assert fake.violations == []
    assert not [e for e in fake.log if e.status == 429]
    assert fake.cohort_requests == 30
    assert fake.max_active <= 5
    # 30 cohorts at 4 a minute: the last starts at 7 minutes; jobs take <= 120 s.
    assert 7 * 60 <= elapsed <= 7 * 60 + 120 + 60


@pytest.mark.looptime
async def test_concurrent_plain_calls_share_five_slots(fake: FakeAmplitude) -> None:
    fake.latency = 0.5
    async with amp.CohortsClient(fake.api_key, fake.secret_key,
                                 transport=fake.transport()) as client:
        async with anyio.create_task_group() as group:
            for _ in range(40):
                group.start_soon(client.list_cohorts)
    assert fake.max_active == 5
    assert fake.violations == []


@pytest.mark.looptime
async def test_a_429_pauses_everyone_once(fake: FakeAmplitude) -> None:
    fake.inject("list", "status", status=429, retry_after=20)
    fake.latency = 1.0
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 seed=2) as client, anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(client.list_cohorts)
        await anyio.sleep(2)  # the 429 has been answered at t=1
        group.start_soon(client.get_usage)
    times = [e.time for e in fake.log]
    assert [e.status for e in fake.log].count(429) == 1
    assert len([t for t in times if t < 20]) == 3  # the three in flight when the 429 came
    assert all(t >= 21 for t in times[3:])  # the retry and the newcomer waited the pause


@pytest.mark.looptime
async def test_retry_after_is_capped(fake: FakeAmplitude) -> None:
    fake.inject("usage", "status", status=429, retry_after=10_000)
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 retry=amp.RetryPolicy(max_retry_after=30)) as client:
        started = anyio.current_time()
        await client.get_usage()
    assert 30 <= anyio.current_time() - started < 32


@pytest.mark.looptime
@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_server_errors_are_retried_with_backoff(fake: FakeAmplitude, status: int) -> None:
    fake.inject("list", "status", status=status, times=3)
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport()
                                 ) as client:
        assert len(await client.list_cohorts()) == 2
    assert [e.status for e in fake.log] == [status] * 3 + [200]


@pytest.mark.looptime
async def test_retries_are_bounded(fake: FakeAmplitude) -> None:
    fake.inject("list", "status", status=503, times=10)
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 retry=amp.RetryPolicy(max_attempts=3)) as client:
        with pytest.raises(amp.ServerError):
            await client.list_cohorts()
    assert len(fake.log) == 3


@pytest.mark.looptime
async def test_client_errors_are_not_retried(fake: FakeAmplitude) -> None:
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport()
                                 ) as client:
        with pytest.raises(amp.NotFoundError):
            await client.request_cohort("missing")
    assert len(fake.log) == 1
    assert await client.scheduler.quota_used() == 0


@pytest.mark.looptime
async def test_cohort_request_retry_counts_quota_when_fate_unknown(fake: FakeAmplitude) -> None:
    fake.inject("request", "status", status=502)
    fake.inject("request", "status", status=429)
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport()
                                 ) as client:
        await client.request_cohort("small")
        # 502: may have been acted on -> counted; 429: refused -> not counted; 202 counted.
        assert await client.scheduler.quota_used() == 2
    assert [e.status for e in fake.log] == [502, 429, 202]


@pytest.mark.looptime
async def test_quota_guard_refuses_a_batch_that_cannot_fit(tmp_path: pathlib.Path) -> None:
    with FakeAmplitude(usage=498) as fake:
        ids = [fake.add_cohort().id for _ in range(3)]
        async with amp.CohortsClient(fake.api_key, fake.secret_key,
                                     transport=fake.transport()) as client:
            with pytest.raises(amp.QuotaExceededError, match="needs 3 cohort requests but only 2"):
                await client.download_cohorts(ids, tmp_path)
    assert [e.endpoint for e in fake.log] == ["usage"]


@pytest.mark.looptime
async def test_quota_guard_off(tmp_path: pathlib.Path) -> None:
    with FakeAmplitude(usage=0) as fake:
        ids = [fake.add_cohort().id for _ in range(2)]
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     limits=amp.Limits(monthly_quota=None), poll=FAST_POLL
                                     ) as client:
            outcomes = await client.download_cohorts(ids, tmp_path)
    assert all(o.ok for o in outcomes)
    assert "usage" not in [e.endpoint for e in fake.log]


@pytest.mark.looptime
async def test_max_jobs_in_flight(tmp_path: pathlib.Path) -> None:
    with FakeAmplitude(job_duration=30.0) as fake:
        ids = [fake.add_cohort().id for _ in range(4)]
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     limits=amp.Limits(max_jobs_in_flight=1), poll=FAST_POLL
                                     ) as client:
            outcomes = await client.download_cohorts(ids, tmp_path)
    assert all(o.ok for o in outcomes)
    starts = [e.time for e in fake.log if e.endpoint == "request"]
    assert all(b - a >= 30 for a, b in itertools.pairwise(starts))
