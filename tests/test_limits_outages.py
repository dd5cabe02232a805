"""Shared limits attacked the way production breaks them: Redis killed with exchanges open or
in the middle of a batch, restarted, flushed; answers slower than the lease TTL.

Real time against a redis-server of each test's own (``own_redis``), which a test may kill
and start again; the windows are scaled down to seconds.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import uuid
from collections.abc import Awaitable, Callable

import anyio
import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.redis import RedisLimits
from amp_cohorts_async.testing import FakeAmplitude

from .conftest import RedisServer
from .test_redis_limits import SCALED, run_workers, started_cohorts

EXPORT_REQUEST = re.compile(r"^/api/5/cohorts/request/[^/]+$")


def backend(server: RedisServer, **kwargs: float) -> RedisLimits:
    return RedisLimits.from_url(server.url, namespace=uuid.uuid4().hex,
                                lease_ttl=kwargs.get("lease_ttl", 1.0))


async def test_redis_killed_with_open_exchanges_leaks_no_permit(own_redis: RedisServer) -> None:
    """5 exchanges open and 3 queued at the gate when Redis dies: the 5 answers stand, the 3
    fail having sent nothing, every local permit is free, and the client works again as soon
    as Redis is back, without a restart."""
    answer = anyio.Event()
    open_exchanges = 0

    async def slow_list(request: httpx.Request) -> httpx.Response:
        nonlocal open_exchanges
        open_exchanges += 1
        await answer.wait()
        return httpx.Response(200, json={"cohorts": []})

    outcomes: list[object] = []
    async with backend(own_redis) as limits, amp.CohortsClient(
        "k", "s", transport=httpx.MockTransport(slow_list), limits_backend=limits,
        limits=amp.Limits(max_concurrent_requests=5),
    ) as client:

        async def call() -> None:
            try:
                outcomes.append(await client.list_cohorts())
            except amp.AmplitudeError as error:
                outcomes.append(error)

        with anyio.fail_after(20):  # a leaked permit hangs the queued calls forever
            async with anyio.create_task_group() as group:
                for _ in range(8):
                    group.start_soon(call)
                while open_exchanges < 5 or client.scheduler.gate.queued < 3:
                    await anyio.sleep(0.01)
                own_redis.stop()
                answer.set()
        assert [o for o in outcomes if o == []] == [[]] * 5  # answered: the answers stand
        failed = [o for o in outcomes if o != []]
        assert len(failed) == 3
        assert all(isinstance(o, amp.LimitsBackendError) for o in failed), failed
        assert open_exchanges == 5  # the 3 sent nothing
        assert client.scheduler.gate.in_use == 0
        assert client.scheduler.gate.queued == 0

        own_redis.start()
        with anyio.fail_after(15):
            assert await client.list_cohorts() == []
        assert client.scheduler.gate.in_use == 0


class KillRedisAtThirdExport(httpx.AsyncBaseTransport):
    """The emulator's transport, which kills Redis when the third export request arrives and
    answers export requests a little late, so that three are in flight then."""

    def __init__(self, fake: FakeAmplitude, server: RedisServer) -> None:
        self.inner = fake.transport()
        self.server = server
        self.arrived = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if EXPORT_REQUEST.match(request.url.path):
            self.arrived += 1
            if self.arrived == 3:
                self.server.stop()
            await anyio.sleep(0.3)
        return await self.inner.handle_async_request(request)


async def test_redis_killed_during_a_batch_journals_the_accepted_exports(
    own_redis: RedisServer, tmp_path: pathlib.Path
) -> None:
    """Exports Amplitude accepted while Redis died are in the journal although the batch
    failed, and a resume once Redis is back (empty: restarted without persistence) spends
    quota only for the others, without a violation."""
    limits = amp.Limits(cohort_requests=(amp.RateWindow(4, 2.0),), monthly_quota=None)
    poll = amp.PollPolicy(initial_interval=0.1, max_interval=0.2)
    with FakeAmplitude(limits=limits, job_duration=0.2) as fake:
        ids = [fake.add_cohort(f"c{i}", size=5).id for i in range(10)]
        async with backend(own_redis) as shared:
            async with amp.CohortsClient(
                fake.api_key, fake.secret_key, transport=KillRedisAtThirdExport(fake, own_redis),
                limits=limits, limits_backend=shared, poll=poll,
            ) as client:
                with anyio.fail_after(30):
                    first = await client.download_cohorts(ids, tmp_path)
                assert client.scheduler.gate.in_use == 0
            accepted = {e.path.rsplit("/", 1)[-1] for e in fake.log
                        if e.endpoint == "request" and e.status == 202}
            assert len(accepted) == 3  # in flight when Redis died, answered after
            assert not any(o.ok for o in first)
            journal = json.loads((tmp_path / ".amp-cohorts-journal.json").read_text())
            journaled = {entry["cohort_id"] for entry in journal["entries"].values()
                         if entry["request_id"] is not None}
            assert journaled == accepted

            own_redis.start()
            async with amp.CohortsClient(
                fake.api_key, fake.secret_key, transport=fake.transport(), limits=limits,
                limits_backend=shared, poll=poll,
            ) as client:
                with anyio.fail_after(30):
                    again = await client.download_cohorts(ids, tmp_path, resume=True)
        assert all(o.ok for o in again), [o.error for o in again if not o.ok]
        assert fake.cohort_requests == len(ids)  # none of the accepted ones paid twice
        assert fake.violations == []
        assert not [e for e in fake.log if e.status == 429]


# -- the shared state lost: a flush, a restart -------------------------------------------------

def slot() -> amp.PermitRequest:
    return amp.PermitRequest(slot=True, cohort=False)


def cohort() -> amp.PermitRequest:
    return amp.PermitRequest(slot=False, cohort=True)


async def flushall(url: str) -> None:
    import redis.asyncio as aioredis

    redis = aioredis.Redis.from_url(url)
    async with redis:
        await redis.flushall()


async def test_a_flush_holds_new_grants_until_holders_have_re_asserted(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limits = amp.Limits(max_concurrent_requests=1, cohort_requests=(amp.RateWindow(1, 0.8),),
                        monthly_quota=None)
    namespace = uuid.uuid4().hex
    async with RedisLimits.from_url(own_redis.url, namespace=namespace,
                                    lease_ttl=5.0) as holder, \
            RedisLimits.from_url(own_redis.url, namespace=namespace, lease_ttl=0.5) as other:
        holder.bind(limits, "app")
        other.bind(limits, "app")
        held = await holder.acquire(amp.PermitRequest(slot=True, cohort=True))
        assert isinstance(held, amp.Permit)
        assert await other.acquire(slot()) == amp.PermitWait(math.inf, "slots")
        await flushall(own_redis.url)

        wait = await other.acquire(slot())  # the first call after the flush notices it
        assert isinstance(wait, amp.PermitWait)
        assert wait.reason == "slots"
        assert 0 < wait.seconds <= 0.5  # one lease_ttl, for the holders to re-assert
        assert other.state_losses == 1
        wait = await other.acquire(cohort())
        assert isinstance(wait, amp.PermitWait)
        assert wait.reason == "window"
        assert 0 < wait.seconds <= 0.8 + 1e-3  # the longest window
        assert "state on Redis" in caplog.text

        assert await holder.renew([held]) == 0  # re-asserted, not reported as lost
        assert holder.state_losses == 1
        await anyio.sleep(0.85)  # past both hold-offs
        assert await other.acquire(slot()) == amp.PermitWait(math.inf, "slots")  # still held
        assert await other.acquire(cohort()) == amp.PermitWait(math.inf, "window")  # in flight
        assert await holder.release([held], amp.Settlement(stamp=True, refund=False)) == 0
        assert isinstance(await other.acquire(slot()), amp.Permit)
        assert holder.state_losses == other.state_losses == 1  # one loss, counted once each


async def test_a_redis_this_app_never_used_is_not_a_loss(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limits = amp.Limits(cohort_requests=(amp.RateWindow(1, 60.0),), monthly_quota=None)
    namespace = uuid.uuid4().hex
    async with RedisLimits.from_url(own_redis.url, namespace=namespace) as first:
        first.bind(limits, "app")
        assert isinstance(await first.acquire(cohort()), amp.Permit)  # at once
        assert first.state_losses == 0
        await flushall(own_redis.url)
        # A process that starts now cannot tell the flush from a new Redis: it starts at
        # once. The first client that used the state before notices at its next call and
        # holds everyone from then on.
        async with RedisLimits.from_url(own_redis.url, namespace=namespace) as newcomer:
            newcomer.bind(limits, "app")
            assert isinstance(await newcomer.acquire(slot()), amp.Permit)
            assert newcomer.state_losses == 0
            assert "was lost" not in caplog.text
            wait = await first.acquire(cohort())
            assert isinstance(wait, amp.PermitWait)
            assert wait.reason == "window"
            assert first.state_losses == 1
            wait = await newcomer.acquire(cohort())
            assert isinstance(wait, amp.PermitWait)
            assert wait.reason == "window"
            assert 59 < wait.seconds <= 60.001


async def test_a_restarted_redis_re_reads_the_quota_and_holds_the_windows(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limits = amp.Limits(cohort_requests=(amp.RateWindow(2, 1.5),), monthly_quota=500)
    with FakeAmplitude(limits=limits, usage=100) as fake:
        ids = [fake.add_cohort(f"c{i}", size=5).id for i in range(4)]
        async with backend(own_redis) as shared, amp.CohortsClient(
            fake.api_key, fake.secret_key, transport=fake.transport(), limits=limits,
            limits_backend=shared,
        ) as client:
            await client.get_usage()
            for cohort_id in ids[:2]:
                await client.request_cohort(cohort_id)
            assert await client.scheduler.quota_used() == 102
            own_redis.stop()
            own_redis.start()  # empty: no persistence
            logged = len(fake.log)
            with anyio.fail_after(15):
                for cohort_id in ids[2:]:
                    await client.request_cohort(cohort_id)
            assert shared.state_losses == 1
            # Amplitude's count was read again before the next cohort request was sent.
            assert [e.endpoint for e in fake.log[logged:]] == ["usage", "request", "request"]
            assert await client.scheduler.quota_used() == 104
    assert fake.violations == []  # the two answered before the restart still counted
    assert "was lost" in caplog.text


async def test_a_restart_from_a_snapshot_is_a_loss_too(tmp_path: pathlib.Path) -> None:
    """The snapshot misses whatever came after it, though the state looks present: the
    server's new run id gives the restart away (as it does a failover to a replica)."""
    import redis.asyncio as aioredis

    server = RedisServer("--dir", str(tmp_path), "--dbfilename", "snapshot.rdb")
    server.start()
    try:
        async with backend(server) as shared:
            shared.bind(amp.Limits(monthly_quota=None), "app")
            assert isinstance(await shared.acquire(cohort()), amp.Permit)
            redis = aioredis.Redis.from_url(server.url)
            async with redis:
                await redis.save()
            server.stop()
            server.start()  # the snapshot is loaded: the state's keys are back
            wait = await shared.acquire(cohort())
            assert isinstance(wait, amp.PermitWait)
            assert wait.reason == "window"
            assert shared.state_losses == 1
    finally:
        server.stop()


async def test_a_flush_during_a_three_process_batch_breaks_no_limit(
    own_redis: RedisServer, tmp_path: pathlib.Path
) -> None:
    """FLUSHALL while three processes share one budget: every process notices, holds new
    grants, re-asserts what it holds; the emulator (counting as Amplitude does) sees no
    violation and no cohort is started twice."""
    with FakeAmplitude(limits=SCALED, job_duration=0.3, latency=(0.001, 0.005)) as fake:
        ids = [fake.add_cohort(f"c{i:02d}", size=20).id for i in range(30)]

        async def flush_when_busy() -> None:
            while fake.cohort_requests < 10:
                await anyio.sleep(0.01)
            await flushall(own_redis.url)

        async with fake.serve() as base_url:
            results = await run_workers(base_url, own_redis.url, [ids[i::3] for i in range(3)],
                                        tmp_path, uuid.uuid4().hex, during=flush_when_busy)
    assert [r["ok"] for r in results] == [10, 10, 10]
    assert fake.violations == []
    assert not [e for e in fake.log if e.status == 429]
    assert started_cohorts(fake) == sorted(ids)
    assert [r["state_losses"] for r in results] == [1, 1, 1]


# -- leases that hold while anything is in flight ------------------------------------------------

class SlowAnswers(httpx.AsyncBaseTransport):
    """The emulator's transport, answering the list and export requests after ``seconds``."""

    def __init__(self, fake: FakeAmplitude, seconds: float) -> None:
        self.inner = fake.transport()
        self.seconds = seconds

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)  # active at the server
        if EXPORT_REQUEST.match(request.url.path) or request.url.path == "/api/3/cohorts":
            await anyio.sleep(self.seconds)
        return response


async def test_leases_hold_through_slow_answers_and_slot_waits(own_redis: RedisServer) -> None:
    """Answers slower than twice the lease TTL, and a cohort permit waiting for a slot as
    long: the leases are renewed all along, so the other process never gets the slot or the
    window place (the emulator counts for both) and no lease is lost."""
    limits = amp.Limits(max_concurrent_requests=1, cohort_requests=(amp.RateWindow(1, 1.0),),
                        monthly_quota=None)
    namespace = uuid.uuid4().hex
    with FakeAmplitude(limits=limits) as fake:
        for name in ("a", "a2", "b"):
            fake.add_cohort(name)
        async with RedisLimits.from_url(own_redis.url, namespace=namespace,
                                        lease_ttl=0.5) as one, \
                RedisLimits.from_url(own_redis.url, namespace=namespace,
                                     lease_ttl=0.5) as two, \
                amp.CohortsClient(fake.api_key, fake.secret_key, limits=limits,
                                  transport=SlowAnswers(fake, 1.2), limits_backend=one) as slow, \
                amp.CohortsClient(fake.api_key, fake.secret_key, limits=limits,
                                  transport=fake.transport(), limits_backend=two) as other:

            async def after(seconds: float, call: Callable[[], Awaitable[object]]) -> None:
                await anyio.sleep(seconds)
                await call()

            with anyio.fail_after(30):
                # a cohort request granted its slot at once, answered after 2.4 TTLs
                async with anyio.create_task_group() as group:
                    group.start_soon(slow.request_cohort, "a")
                    group.start_soon(after, 0.1, other.list_cohorts)
                # a cohort permit that waits 2.4 TTLs for the slot, then a slow answer
                async with anyio.create_task_group() as group:
                    group.start_soon(slow.list_cohorts)
                    group.start_soon(after, 0.1, lambda: slow.request_cohort("a2"))
                    group.start_soon(after, 0.2, lambda: other.request_cohort("b"))
        assert fake.violations == []
        assert fake.cohort_requests == 3
        assert slow.scheduler.leases_lost == 0
        assert other.scheduler.leases_lost == 0
