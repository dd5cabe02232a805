"""The scheduler's guarantees: exact windows, per-exchange concurrency, shared pause, quota."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amp_cohorts_async as amp
from amp_cohorts_async._limits import WINDOW_EDGE, SlidingWindowLog
from amp_cohorts_async._scheduler import Outcome, PriorityGate, RequestKind, Scheduler
from amp_cohorts_async.testing import FakeAmplitude, run_in_virtual_time


def test_window_log_admits_exactly_n_then_waits_for_the_oldest() -> None:
    log = SlidingWindowLog(amp.RateWindow(2, 10.0))
    assert log.wait_time(0.0) == 0
    log.in_flight += 1
    assert log.wait_time(0.0) == 0
    log.in_flight += 1
    assert log.wait_time(0.0) == math.inf  # both in flight: wait until one is answered
    log.settle(1.0)
    # answered at 1.0 -> free at 11.0, plus a millisecond so the edge is never shared
    assert log.wait_time(1.0) == pytest.approx(10.0 + WINDOW_EDGE)
    log.settle(3.0)
    assert log.wait_time(5.0) == pytest.approx(6.0 + WINDOW_EDGE)
    assert log.wait_time(11.0) > 0
    assert log.wait_time(11.0 + WINDOW_EDGE) == 0


def test_window_log_not_sent_requests_leave_no_stamp() -> None:
    log = SlidingWindowLog(amp.RateWindow(1, 60.0))
    log.in_flight += 1
    log.settle(None)
    assert log.wait_time(0.0) == 0


async def test_priority_gate_serves_lower_priority_first() -> None:
    gate = PriorityGate(1)
    await gate.acquire(0)
    order: list[str] = []

    async def take(name: str, priority: int) -> None:
        await gate.acquire(priority)
        order.append(name)
        gate.release()

    async with anyio.create_task_group() as group:
        group.start_soon(take, "poll", 2)
        group.start_soon(take, "file", 1)
        group.start_soon(take, "cohort", 0)
        await anyio.wait_all_tasks_blocked()
        gate.release()
    assert order == ["cohort", "file", "poll"]
    assert gate.in_use == 0


async def test_priority_gate_cancelled_waiter_releases_nothing_it_does_not_hold() -> None:
    gate = PriorityGate(1)
    await gate.acquire(0)
    with anyio.move_on_after(0.01):
        await gate.acquire(1)
    gate.release()
    assert gate.in_use == 0
    await gate.acquire(0)
    assert gate.in_use == 1


# -- property: the windows hold as the server counts, whatever the arrivals ------------------

arrivals = st.lists(
    st.tuples(
        st.floats(0, 300),  # when the caller asks
        st.floats(0.001, 2.0),  # uplink latency (server counts on arrival)
        st.floats(0.001, 2.0),  # downlink latency
        st.sampled_from(["ok", "ok", "ok", "429", "not_sent", "5xx", "cancel_wait",
                         "cancel_flight"]),
    ),
    min_size=1,
    max_size=40,
)
windows = st.lists(
    st.tuples(st.integers(1, 6), st.floats(1.0, 120.0)), min_size=1, max_size=3
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrivals=arrivals, windows=windows, concurrency=st.integers(1, 5))
def test_windows_never_exceeded_and_everything_released(
    arrivals: list[tuple[float, float, float, str]],
    windows: list[tuple[int, float]],
    concurrency: int,
) -> None:
    limits = amp.Limits(
        max_concurrent_requests=concurrency,
        cohort_requests=tuple(amp.RateWindow(n, w) for n, w in windows),
        monthly_quota=None,
    )
    server_times: list[float] = []
    in_server = 0
    peak = 0

    async def main() -> Scheduler:
        scheduler = Scheduler(limits, rng=random.Random(1))

        async def one(start: float, up: float, down: float, fate: str) -> None:
            nonlocal in_server, peak
            await anyio.sleep(start)
            with anyio.CancelScope() as scope:
                if fate == "cancel_wait":
                    scope.deadline = anyio.current_time() + up / 3
                async with scheduler.exchange(RequestKind.COHORT_REQUEST) as ticket:
                    if fate == "not_sent":
                        ticket.outcome = Outcome.NOT_SENT
                        return
                    in_server += 1
                    peak = max(peak, in_server)
                    try:
                        await anyio.sleep(up)
                        server_times.append(anyio.current_time())
                        if fate == "cancel_flight":
                            scope.cancel()
                        await anyio.sleep(down)
                    finally:
                        in_server -= 1
                    outcome = {"429": Outcome.REFUSED, "5xx": Outcome.UNKNOWN}.get(
                        fate, Outcome.ACCEPTED
                    )
                    ticket.answered(anyio.current_time(), outcome)

        async with anyio.create_task_group() as group:
            for arrival in arrivals:
                group.start_soon(one, *arrival)
        return scheduler

    scheduler = run_in_virtual_time(main)
    assert peak <= concurrency
    times = sorted(server_times)
    for n, w in windows:
        for i, t in enumerate(times):
            inside = sum(1 for u in times[: i + 1] if u > t - w)
            assert inside <= n, f"{inside} requests within {w}s (limit {n})"
    assert scheduler.gate.in_use == 0
    for log in scheduler.backend.logs:  # type: ignore[attr-defined]
        assert log.in_flight == 0


# -- shared pause and quota ----------------------------------------------------------------

@pytest.mark.looptime
async def test_a_pause_holds_everyone(looptime: object) -> None:
    scheduler = Scheduler(amp.Limits(), rng=random.Random(0))
    started: list[float] = []

    async def call() -> None:
        async with scheduler.exchange(RequestKind.POLL):
            started.append(anyio.current_time())

    await scheduler.pause(30.0)
    async with anyio.create_task_group() as group:
        for _ in range(5):
            group.start_soon(call)
    assert len(started) == 5
    assert min(started) >= 30.0
    assert max(started) - min(started) <= 3.0  # spread, not a herd, and not a long tail


async def test_quota_reserved_then_refunded_only_when_the_server_did_not_act() -> None:
    scheduler = Scheduler(amp.Limits(monthly_quota=2), wall_clock=lambda: datetime(2026, 3, 5,
                                                                                  tzinfo=UTC))
    for outcome in (Outcome.REFUSED, Outcome.NOT_SENT):
        async with scheduler.exchange(RequestKind.COHORT_REQUEST) as ticket:
            ticket.outcome = outcome
    assert await scheduler.quota_used() == 0
    async with scheduler.exchange(RequestKind.COHORT_REQUEST) as ticket:
        ticket.answered(anyio.current_time(), Outcome.ACCEPTED)
    async with scheduler.exchange(RequestKind.COHORT_REQUEST):
        pass  # unknown fate counts as spent
    assert await scheduler.quota_used() == 2
    with pytest.raises(amp.QuotaExceededError, match="2 of 2 used in 2026-03"):
        async with scheduler.exchange(RequestKind.COHORT_REQUEST):
            pass


async def test_quota_is_counted_per_calendar_month() -> None:
    now = [datetime(2026, 1, 31, 23, 59, tzinfo=UTC)]
    scheduler = Scheduler(amp.Limits(monthly_quota=1), wall_clock=lambda: now[0])
    async with scheduler.exchange(RequestKind.COHORT_REQUEST) as ticket:
        ticket.answered(0.0, Outcome.ACCEPTED)
    with pytest.raises(amp.QuotaExceededError):
        async with scheduler.exchange(RequestKind.COHORT_REQUEST):
            pass
    now[0] = datetime(2026, 2, 1, 0, 0, 1, tzinfo=UTC)
    async with scheduler.exchange(RequestKind.COHORT_REQUEST) as ticket:
        ticket.answered(0.0, Outcome.ACCEPTED)


async def test_known_usage_counts() -> None:
    scheduler = Scheduler(amp.Limits(monthly_quota=10),
                          wall_clock=lambda: datetime(2026, 3, 5, tzinfo=UTC))
    await scheduler.record_usage(10, datetime(2026, 4, 1, tzinfo=UTC))
    with pytest.raises(amp.QuotaExceededError):
        async with scheduler.exchange(RequestKind.COHORT_REQUEST):
            pass


async def test_usage_counts_in_the_month_amplitude_says_not_the_local_one() -> None:
    """Amplitude answers 500 of 500 for November a second before midnight; this host's clock
    already says December. November's count must not fill December's quota."""
    amplitude_now = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    local_now = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)
    with FakeAmplitude(usage=500, wall_clock=lambda: amplitude_now) as fake:
        fake.add_cohort("c")
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     wall_clock=lambda: local_now) as client:
            usage = await client.get_usage()
            assert usage.remaining == 0
            assert await client.scheduler.quota_used("2026-11") == 500
            assert await client.scheduler.quota_used() == 0  # December, on the limits' clock
