"""What everyone sharing one Amplitude app's limits must share, behind one protocol.

A ``LimitsBackend`` holds the concurrency slots, the cohort-request rate windows (an exact
sliding log), the shared pause after a 429 and the monthly quota count, and grants permits
atomically. The scheduler keeps its priority order locally and asks the backend for permits;
``InMemoryLimits`` serves one process, ``amp_cohorts_async.redis.RedisLimits`` many processes
and hosts. A permit is a lease: a backend with ``lease_ttl`` expects it renewed while held and
gives the slots of a holder that died back when the lease runs out.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import anyio
import attrs

from ._config import Limits, RateWindow
from ._exceptions import AmplitudeError, InvalidRequestError, QuotaExceededError

__all__ = (
    "WINDOW_EDGE",
    "InMemoryLimits",
    "LimitsBackend",
    "LimitsBackendError",
    "Permit",
    "PermitRequest",
    "PermitWait",
    "ReleaseSignal",
    "Settlement",
    "SlidingWindowLog",
)

WINDOW_EDGE = 1e-3  # seconds


class LimitsBackendError(AmplitudeError):
    """The shared limits store failed or could not be reached; nothing was sent.

    The client never falls back to process-local limits: without the shared store it cannot
    know what the other processes are doing, so it stops instead.
    """


@attrs.frozen
class PermitRequest:
    """What a caller needs before it may send.

    ``slot``: one of ``max_concurrent_requests`` (granted only outside a shared pause).
    ``cohort``: a cohort request: one unit of ``quota`` in ``month`` (UTC ``YYYY-MM``) and a
    place in every rate window.
    """

    slot: bool
    cohort: bool
    month: str = ""
    quota: int | None = None


@attrs.frozen
class Permit:
    """A granted lease; hand it back with ``release``."""

    token: str
    slot: bool
    cohort: bool
    month: str = ""


@attrs.frozen
class PermitWait:
    """Not now: ask again after ``seconds`` (``inf``: once something is released)."""

    seconds: float
    reason: Literal["pause", "window", "slots"]


@attrs.frozen
class Settlement:
    """What became of a cohort request, for the windows and the quota.

    ``stamp``: it may have reached the server, so it occupies the windows from ``at`` (the
    time its answer arrived, on the backend's clock; ``None``: now). ``refund``: the server
    certainly did not act on it, so its quota unit is given back.
    """

    stamp: bool
    refund: bool
    at: float | None = None


@runtime_checkable
class LimitsBackend(Protocol):
    """The shared state of one Amplitude app's limits; every operation is atomic.

    ``lease_ttl``: seconds a permit lives unless renewed (``None``: permits never expire).
    ``recheck``: how soon to ask again when waiting for a release that may happen elsewhere
    (``None``: every release happens in this process and ``wait_for_release`` hears it).
    """

    lease_ttl: float | None
    recheck: float | None

    def bind(self, limits: Limits, app: str) -> None:
        """Called once per client: the limits to enforce and a hash naming the app."""
        ...

    async def acquire(self, request: PermitRequest) -> Permit | PermitWait:
        """Grant ``request`` whole, or say how long to wait; QuotaExceededError if over."""
        ...

    async def release(self, permits: Sequence[Permit], settlement: Settlement | None) -> int:
        """Hand ``permits`` back (a cohort permit settled as said); returns leases found lost."""
        ...

    async def renew(self, permits: Sequence[Permit]) -> int:
        """Extend the leases of ``permits``; returns how many had already expired."""
        ...

    async def pause(self, seconds: float) -> None:
        """Hold every slot grant for ``seconds`` (a 429 was answered)."""
        ...

    async def wait_for_release(self, at_most: float) -> None:
        """Return when a permit is released (here, at least), or after ``at_most`` seconds."""
        ...

    async def set_known_usage(self, month: str, usage: int) -> None:
        """The server's count of ``month``: the local one never goes below it."""
        ...

    async def quota_used(self, month: str) -> int: ...

    async def aclose(self) -> None: ...


class ReleaseSignal:
    """Wakes the waiters of this process when a permit is released (made lazily: loop-bound)."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def fire(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self, at_most: float) -> None:
        if self._event is None:
            self._event = anyio.Event()
        with anyio.move_on_after(at_most):
            await self._event.wait()


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


class InMemoryLimits:
    """The default backend: exact, in one process, on the event loop's clock, no I/O.

    One instance may be shared by several clients of the same app in one process.
    """

    lease_ttl: float | None = None
    recheck: float | None = None

    def __init__(self) -> None:
        self.limits: Limits | None = None
        self.logs: list[SlidingWindowLog] = []
        self.slots_in_use = 0
        self.paused_until = -math.inf
        self._usage: dict[str, int] = {}
        self._tokens = itertools.count(1)
        self._released = ReleaseSignal()

    def __repr__(self) -> str:
        return f"InMemoryLimits(slots_in_use={self.slots_in_use})"

    def bind(self, limits: Limits, app: str) -> None:
        if self.limits is not None:
            if self.limits != limits:
                raise InvalidRequestError("this limits backend is bound to other Limits")
            return
        self.limits = limits
        self.logs = [SlidingWindowLog(window) for window in limits.cohort_requests]

    def _bound(self) -> Limits:
        if self.limits is None:
            raise RuntimeError("InMemoryLimits is not bound to a client's Limits yet")
        return self.limits

    async def acquire(self, request: PermitRequest) -> Permit | PermitWait:
        # No await in here: a grant is atomic, and a cancellation cannot leak it.
        limits = self._bound()
        now = anyio.current_time()
        if request.slot:
            if self.paused_until > now:
                return PermitWait(self.paused_until - now, "pause")
            if self.slots_in_use >= limits.max_concurrent_requests:
                return PermitWait(math.inf, "slots")
        if request.cohort:
            used = self._usage.get(request.month, 0)
            if request.quota is not None and used + 1 > request.quota:
                raise QuotaExceededError(
                    f"monthly cohort-request quota reached: {used} of {request.quota} used in "
                    f"{request.month}"
                )
            wait = max((log.wait_time(now) for log in self.logs), default=0.0)
            if wait > 0:
                return PermitWait(wait, "window")
            self._usage[request.month] = used + 1
            for log in self.logs:
                log.in_flight += 1
        if request.slot:
            self.slots_in_use += 1
        return Permit(f"m{next(self._tokens)}", request.slot, request.cohort, request.month)

    async def release(self, permits: Sequence[Permit], settlement: Settlement | None) -> int:
        now = anyio.current_time()
        for permit in permits:
            if permit.slot:
                self.slots_in_use -= 1
            if permit.cohort:
                stamped = settlement is not None and settlement.stamp
                at = settlement.at if settlement is not None and settlement.at is not None else now
                for log in self.logs:
                    log.settle(at if stamped else None)
                if settlement is not None and settlement.refund:
                    self._usage[permit.month] = max(0, self._usage.get(permit.month, 0) - 1)
        self._released.fire()
        return 0

    async def renew(self, permits: Sequence[Permit]) -> int:
        return 0

    async def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, anyio.current_time() + seconds)

    async def wait_for_release(self, at_most: float) -> None:
        await self._released.wait(at_most)

    async def set_known_usage(self, month: str, usage: int) -> None:
        # The server's count wins, except that requests we sent may not be in it yet.
        self._usage[month] = max(usage, self._usage.get(month, 0))

    async def quota_used(self, month: str) -> int:
        return self._usage.get(month, 0)

    async def aclose(self) -> None:
        return None
