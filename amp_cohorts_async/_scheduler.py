"""Permits for every exchange with the Amplitude host.

Three guards, all shared by every coroutine of one client (or, through a shared backend, by
every process using one account):

* a concurrency gate: at most ``max_concurrent_requests`` HTTP exchanges at once, held for one
  exchange only (never across a poll sleep or an S3 transfer); quota-costing cohort requests go
  first, then downloads and other calls, then status polls;
* exact sliding-window logs for cohort requests: a request may start only if, for every
  ``RateWindow(N, W)``, fewer than N requests are in flight or were *answered* within the last
  W seconds. Stamping at the answer (not at the grant) is what makes the guarantee hold as the
  server counts: the server saw each request no later than we saw its answer;
* one shared pause after a 429: everyone waits until it ends, then resumes with a little
  spread so they do not arrive together.

The monthly quota is counted here too: a cohort request reserves one unit before it is sent
and gives it back only when the server certainly did not act on it.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Protocol

import anyio
import attrs

from ._config import Limits, RateWindow
from ._exceptions import QuotaExceededError

__all__ = (
    "InMemoryBackend",
    "LimitsBackend",
    "Outcome",
    "RequestKind",
    "Scheduler",
    "SlidingWindowLog",
    "Ticket",
)


class RequestKind(enum.Enum):
    """What an exchange is; decides its priority at the concurrency gate."""

    COHORT_REQUEST = "cohort_request"
    FILE = "file"
    OTHER = "other"
    POLL = "poll"


# Lower goes first: the rate-limited request is on every batch's critical path, polls are not.
PRIORITY = {
    RequestKind.COHORT_REQUEST: 0,
    RequestKind.FILE: 1,
    RequestKind.OTHER: 1,
    RequestKind.POLL: 2,
}


class Outcome(enum.Enum):
    """What became of a cohort request, for quota and window accounting."""

    ACCEPTED = "accepted"  # 2xx: quota spent
    REFUSED = "refused"  # the server answered no (4xx/429): quota not spent
    NOT_SENT = "not_sent"  # failed before a byte left: neither quota nor window
    UNKNOWN = "unknown"  # may have been acted on: counted as spent


@attrs.define
class Ticket:
    """Handed to the holder of an exchange permit, who reports what happened.

    Until the permit is granted the outcome is NOT_SENT (a request cancelled while it waits
    never left); once granted it is UNKNOWN until the holder reports better.
    """

    outcome: Outcome = Outcome.NOT_SENT
    answered_at: float | None = None

    def answered(self, at: float, outcome: Outcome) -> None:
        self.answered_at = at
        self.outcome = outcome


WINDOW_EDGE = 1e-3  # seconds


class SlidingWindowLog:
    """An exact log of answered cohort requests for one RateWindow, plus those in flight."""

    def __init__(self, window: RateWindow) -> None:
        self.window = window
        self.stamps: deque[float] = deque()
        self.in_flight = 0

    def wait_time(self, now: float) -> float:
        """0 if one more request may start now; else seconds to wait (inf: until one settles)."""
        limit = self.window.max_requests
        # A stamp leaves the window a hair after its length: at the exact edge, float rounding
        # of "now - length" on either side could count it in the server's window still.
        length = self.window.seconds + WINDOW_EDGE
        while self.stamps and self.stamps[0] + length <= now:
            self.stamps.popleft()
        occupied = self.in_flight + len(self.stamps)
        if occupied < limit:
            return 0.0
        must_expire = occupied - limit + 1
        if must_expire > len(self.stamps):
            return math.inf
        return self.stamps[must_expire - 1] + length - now

    def settle(self, stamp: float | None) -> None:
        self.in_flight -= 1
        if stamp is not None:
            # Answers arrive in time order, so appending keeps the log sorted.
            if self.stamps and stamp < self.stamps[-1]:
                stamp = self.stamps[-1]
            self.stamps.append(stamp)


class LimitsBackend(Protocol):
    """The state that everyone sharing one account's limits must share.

    The in-memory backend serves one process; a shared store (e.g. Redis) can implement the
    same five operations atomically to enforce the limits across processes.
    """

    def cohort_wait_time(self, now: float) -> float:
        """0 and reserve a window slot if a cohort request may start now, else the wait."""
        ...

    def settle_cohort_request(self, stamp: float | None) -> None: ...

    def reserve_quota(self, month: str, quota: int | None) -> None:
        """Count one cohort request against ``month``; raise QuotaExceededError if over."""
        ...

    def refund_quota(self, month: str) -> None: ...

    def set_known_usage(self, month: str, usage: int) -> None: ...

    def quota_used(self, month: str) -> int: ...


class InMemoryBackend:
    """The default backend: exact, in one process, no I/O."""

    def __init__(self, windows: tuple[RateWindow, ...]) -> None:
        self.logs = [SlidingWindowLog(window) for window in windows]
        self._usage: dict[str, int] = {}

    def cohort_wait_time(self, now: float) -> float:
        wait = max((log.wait_time(now) for log in self.logs), default=0.0)
        if wait <= 0:
            for log in self.logs:
                log.in_flight += 1
        return wait

    def settle_cohort_request(self, stamp: float | None) -> None:
        for log in self.logs:
            log.settle(stamp)

    def reserve_quota(self, month: str, quota: int | None) -> None:
        used = self._usage.get(month, 0)
        if quota is not None and used + 1 > quota:
            raise QuotaExceededError(
                f"monthly cohort-request quota reached: {used} of {quota} used in {month}"
            )
        self._usage[month] = used + 1

    def refund_quota(self, month: str) -> None:
        self._usage[month] = max(0, self._usage.get(month, 0) - 1)

    def set_known_usage(self, month: str, usage: int) -> None:
        # The server's count wins, except that requests we sent may not be in it yet.
        self._usage[month] = max(usage, self._usage.get(month, 0))

    def quota_used(self, month: str) -> int:
        return self._usage.get(month, 0)


class PriorityGate:
    """A counting semaphore that serves waiters by (priority, arrival)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiters: list[tuple[int, int, _GateWaiter]] = []
        self._order = itertools.count()

    async def acquire(self, priority: int) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self.in_use < self.capacity and not self._waiters:
            self.in_use += 1  # no await after taking it: a cancellation cannot leak the slot
            return
        waiter = _GateWaiter()
        heapq.heappush(self._waiters, (priority, next(self._order), waiter))
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release()  # pass the slot on
            else:
                waiter.abandoned = True
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if waiter.abandoned:
                continue
            waiter.granted = True  # the slot moves to the waiter; in_use is unchanged
            waiter.event.set()
            return
        self.in_use -= 1


@attrs.define
class _GateWaiter:
    event: anyio.Event = attrs.field(factory=anyio.Event)
    granted: bool = False
    abandoned: bool = False


WaitCallback = Callable[[float], None]


def _utc_month(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m")


class Scheduler:
    """Grants exchange permits under Limits. One per client; primitives are made lazily."""

    def __init__(
        self,
        limits: Limits,
        *,
        backend: LimitsBackend | None = None,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> None:
        self.limits = limits
        self.backend: LimitsBackend = backend or InMemoryBackend(limits.cohort_requests)
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()
        self._gate: PriorityGate | None = None
        self._admission: anyio.Lock | None = None
        self._changed: anyio.Event | None = None
        self._jobs: anyio.Semaphore | None = None
        self.paused_until = -math.inf

    # -- lazily created loop-bound primitives -------------------------------------------
    @property
    def gate(self) -> PriorityGate:
        if self._gate is None:
            self._gate = PriorityGate(self.limits.max_concurrent_requests)
        return self._gate

    @property
    def jobs(self) -> anyio.Semaphore | None:
        if self._jobs is None and self.limits.max_jobs_in_flight is not None:
            self._jobs = anyio.Semaphore(self.limits.max_jobs_in_flight)
        return self._jobs

    def _admission_lock(self) -> anyio.Lock:
        if self._admission is None:
            self._admission = anyio.Lock()
        return self._admission

    def _changed_event(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # -- quota ----------------------------------------------------------------------------
    def month(self) -> str:
        return _utc_month(self.wall_clock())

    def record_usage(self, usage: int) -> None:
        self.backend.set_known_usage(self.month(), usage)

    def quota_used(self) -> int:
        return self.backend.quota_used(self.month())

    # -- the shared pause -----------------------------------------------------------------
    def pause(self, seconds: float) -> None:
        """Hold every exchange for ``seconds`` (a 429 was answered)."""
        until = anyio.current_time() + seconds
        if until > self.paused_until:
            self.paused_until = until

    async def _wait_for_pause(self, on_wait: WaitCallback | None) -> None:
        while (remaining := self.paused_until - anyio.current_time()) > 0:
            # Spread the restart a little so a crowd does not hit the server at one instant.
            spread = self.rng.uniform(0.0, min(1.0, remaining * 0.1))
            if on_wait is not None:
                on_wait(remaining + spread)
            await anyio.sleep(remaining + spread)

    # -- cohort-request admission ---------------------------------------------------------
    async def _admit_cohort_request(self, on_wait: WaitCallback | None) -> str:
        """Reserve quota and a slot in every window, waiting (FIFO) for the windows."""
        async with self._admission_lock():
            month = self.month()
            self.backend.reserve_quota(month, self.limits.monthly_quota)
            try:
                while (wait := self.backend.cohort_wait_time(anyio.current_time())) > 0:
                    if on_wait is not None and math.isfinite(wait):
                        on_wait(wait)
                    changed = self._changed_event()
                    with anyio.move_on_after(wait if math.isfinite(wait) else None):
                        await changed.wait()
            except BaseException:
                self.backend.refund_quota(month)
                raise
            return month

    def _settle_cohort_request(self, month: str, ticket: Ticket) -> None:
        now = anyio.current_time()
        if ticket.outcome is Outcome.NOT_SENT:
            self.backend.settle_cohort_request(None)
        else:
            # Unknown fate: assume the server counted it as late as now.
            stamp = ticket.answered_at if ticket.answered_at is not None else now
            self.backend.settle_cohort_request(stamp)
        if ticket.outcome in (Outcome.NOT_SENT, Outcome.REFUSED):
            self.backend.refund_quota(month)
        self._notify()

    # -- the permit -----------------------------------------------------------------------
    @asynccontextmanager
    async def exchange(
        self, kind: RequestKind, *, on_wait: WaitCallback | None = None
    ) -> AsyncIterator[Ticket]:
        """Hold a permit for one HTTP exchange with the Amplitude host."""
        ticket = Ticket()
        month = None
        if kind is RequestKind.COHORT_REQUEST:
            month = await self._admit_cohort_request(on_wait)
        try:
            while True:
                await self._wait_for_pause(on_wait)
                await self.gate.acquire(PRIORITY[kind])
                if self.paused_until <= anyio.current_time():
                    break
                self.gate.release()  # a 429 paused everyone while we queued
            ticket.outcome = Outcome.UNKNOWN  # granted: from here on the server may see it
            try:
                yield ticket
            finally:
                self.gate.release()
        finally:
            if month is not None:
                self._settle_cohort_request(month, ticket)
