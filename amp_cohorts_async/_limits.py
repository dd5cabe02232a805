"""What everyone sharing one Amplitude app's limits must share, behind one protocol.

A ``LimitsBackend`` holds the concurrency slots, the cohort-request rate windows (an exact
sliding log), the shared pause after a 429 and the monthly quota count, and grants permits
atomically. The scheduler keeps its priority order locally and asks the backend for permits;
``InMemoryLimits`` serves one process, ``amp_cohorts_async.redis.RedisLimits`` many processes
and hosts. A permit is a lease: a backend with ``lease_ttl`` expects it renewed while held and
gives the slots of a holder that died back when the lease runs out.

The contract every backend keeps (``InMemoryLimits`` and ``RedisLimits`` agree on it):

* **One clock.** Every time a shared backend reasons about (lease expiry, window stamps, the
  pause, the quota month) is read from the backend's own clock, never from a client's: two
  hosts whose clocks disagree still count in one window and one month. ``acquire`` decides
  the quota month of a cohort permit and names it in ``Permit.month``; ``quota_used(None)``
  means the month it is now on the backend's clock.
* **Grants are whole and atomic**: a request for a slot and a cohort place is granted both or
  neither; a cancelled or failed round trip grants nothing that its caller cannot release.
* **Leases.** With ``lease_ttl``, a permit not renewed within ``lease_ttl`` seconds is given
  back (its holder is presumed dead). ``renew`` and ``release`` report leases they found
  expired while their holder still held them (a holder that stalled past the TTL); ``renew``
  also puts such a lease back (re-asserts it), even over capacity, so that from then on the
  slot is not granted to a second holder. A lease is reported once, not at each call.
* **State loss.** A backend whose shared state can vanish (a Redis restarted without
  persistence, failed over or flushed) detects it at the next call of any client that used
  the state before, counts it in ``state_losses`` and logs it at WARNING. From then on it
  grants no cohort permit until the longest rate window has passed, and no new slot until one
  ``lease_ttl`` has passed, so that every live holder has re-asserted its leases through
  ``renew`` (which, for a lease from before the loss, re-asserts without reporting it lost);
  a refund of a unit charged before the loss is not applied to the count after it. A client
  whose backend's ``state_losses`` moved re-reads the quota from Amplitude (``get_usage()``
  then ``set_known_usage``) before its next cohort request. A store this app never used is
  not a loss: the first client starts at once.
* **Failures** raise ``LimitsBackendError`` (or any exception, which the scheduler turns
  into one); a backend never falls back to process-local limits.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
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
    "checked_lease_ttl",
    "utc_month",
)

WINDOW_EDGE = 1e-3  # seconds


def checked_lease_ttl(lease_ttl: object) -> float:
    """``lease_ttl`` as seconds, or InvalidRequestError: a shared backend's leases must outlive
    a round trip, so less than half a second is refused."""
    if isinstance(lease_ttl, bool) or not isinstance(lease_ttl, int | float) or not (
        math.isfinite(lease_ttl) and lease_ttl >= 0.5
    ):
        raise InvalidRequestError(f"lease_ttl must be a number of seconds >= 0.5, "
                                  f"got {lease_ttl!r}")
    return float(lease_ttl)


def utc_month(now: datetime) -> str:
    """The calendar month (UTC) of ``now`` as ``YYYY-MM``, the quota's unit of time."""
    return now.astimezone(UTC).strftime("%Y-%m")


class LimitsBackendError(AmplitudeError):
    """The shared limits store failed or could not be reached; nothing was sent.

    The client never falls back to process-local limits: without the shared store it cannot
    know what the other processes are doing, so it stops instead.
    """


@attrs.frozen
class PermitRequest:
    """What a caller needs before it may send.

    ``slot``: one of ``max_concurrent_requests`` (granted only outside a shared pause).
    ``cohort``: a cohort request: one unit of ``quota`` (``None``: no monthly cap) in the
    month it is on the backend's clock, and a place in every rate window.
    """

    slot: bool
    cohort: bool
    quota: int | None = None


@attrs.frozen
class Permit:
    """A granted lease; hand it back with ``release``.

    ``token``: opaque, the backend's own. ``month``: for a cohort permit, the month (UTC
    ``YYYY-MM``, on the backend's clock) its quota unit was charged to, so that a refund
    goes back to that month even if the month turned meanwhile.
    """

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

    See the module documentation for the contract (one clock, leases, state loss).

    ``lease_ttl``: seconds a permit lives unless renewed (``None``: permits never expire and
    ``renew`` is never called).
    ``recheck``: how soon to ask again when waiting for a release that may happen elsewhere
    (``None``: every release happens in this process and ``wait_for_release`` hears it).
    ``state_losses``: how many times this backend has found its shared state lost; the
    scheduler compares it after each call (0 for a backend whose state cannot vanish).
    """

    lease_ttl: float | None
    recheck: float | None
    state_losses: int

    def bind(self, limits: Limits, app: str) -> None:
        """Called once per client: the limits to enforce and a hash naming the app.

        Several clients of one app may share one backend; binding it to other ``Limits``
        raises ``InvalidRequestError``.
        """
        ...

    async def acquire(self, request: PermitRequest) -> Permit | PermitWait:
        """Grant ``request`` whole, or say how long to wait; ``QuotaExceededError`` if over.

        A cohort permit charges one unit to the month it is now on the backend's clock
        (``Permit.month``) and counts in every window as in flight until released.
        ``PermitWait.seconds`` is exact when the backend knows it (a window stamp ageing out,
        a pause or a state-loss hold-off ending) and ``inf`` when only a release can help.
        """
        ...

    async def release(self, permits: Sequence[Permit], settlement: Settlement | None) -> int:
        """Hand ``permits`` back (a cohort permit settled as said); returns how many leases
        were found expired while held and not reported before (by ``renew``)."""
        ...

    async def renew(self, permits: Sequence[Permit]) -> int:
        """Extend the leases of ``permits`` by ``lease_ttl`` from now on the backend's clock.

        A lease found expired while held is put back (re-asserted, even over capacity) and
        counted in the result, once; a lease missing because the state was lost is put back
        without being counted.
        """
        ...

    async def pause(self, seconds: float) -> None:
        """Hold every slot grant for ``seconds`` (a 429 was answered)."""
        ...

    async def wait_for_release(self, at_most: float) -> None:
        """Return when a permit is released (here, at least), or after ``at_most`` seconds."""
        ...

    async def set_known_usage(self, month: str, usage: int) -> None:
        """Amplitude's count of ``month`` (the month its usage answer is about): the
        backend's count of that month never goes below it."""
        ...

    async def quota_used(self, month: str | None = None) -> int:
        """The units counted in ``month`` (``None``: the month it is now on the backend's
        clock)."""
        ...

    async def acquire_write(self, cohort_id: str) -> str | None:
        """The write lease of ``cohort_id``: one holder at a time among everyone sharing the
        backend (Amplitude answers 429 to concurrent writes to one cohort). Returns a token,
        or ``None`` while another holds it; ``wait_for_release`` hears its release here. With
        ``lease_ttl`` the lease lapses unless renewed."""
        ...

    async def renew_write(self, cohort_id: str, token: str) -> bool:
        """Extend the write lease by ``lease_ttl``; ``False`` if it had lapsed meanwhile."""
        ...

    async def release_write(self, cohort_id: str, token: str) -> None:
        """Give the write lease back (nothing happens if it lapsed and another holds it)."""
        ...

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
    ``wall_clock`` (an aware ``datetime``) is the clock that decides the quota month; its
    state lives in the process and is never lost while the process lives.
    """

    lease_ttl: float | None = None
    recheck: float | None = None
    state_losses: int = 0

    def __init__(self, *, wall_clock: Callable[[], datetime] | None = None) -> None:
        self.wall_clock: Callable[[], datetime] = wall_clock or (lambda: datetime.now(UTC))
        self.limits: Limits | None = None
        self.logs: list[SlidingWindowLog] = []
        self.slots_in_use = 0
        self.paused_until = -math.inf
        self._usage: dict[str, int] = {}
        self._tokens = itertools.count(1)
        self._released = ReleaseSignal()
        self._writers: dict[str, str] = {}  # cohort id -> token of its write lease

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
        month = ""
        if request.cohort:
            month = utc_month(self.wall_clock())
            used = self._usage.get(month, 0)
            if request.quota is not None and used + 1 > request.quota:
                raise QuotaExceededError(
                    f"monthly cohort-request quota reached: {used} of {request.quota} used in "
                    f"{month}"
                )
            wait = max((log.wait_time(now) for log in self.logs), default=0.0)
            if wait > 0:
                return PermitWait(wait, "window")
            self._usage[month] = used + 1
            for log in self.logs:
                log.in_flight += 1
        if request.slot:
            self.slots_in_use += 1
        return Permit(f"m{next(self._tokens)}", request.slot, request.cohort, month)

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

    async def quota_used(self, month: str | None = None) -> int:
        return self._usage.get(utc_month(self.wall_clock()) if month is None else month, 0)

    async def acquire_write(self, cohort_id: str) -> str | None:
        if cohort_id in self._writers:
            return None
        token = f"w{next(self._tokens)}"
        self._writers[cohort_id] = token
        return token

    async def renew_write(self, cohort_id: str, token: str) -> bool:
        return self._writers.get(cohort_id) == token

    async def release_write(self, cohort_id: str, token: str) -> None:
        if self._writers.get(cohort_id) == token:
            del self._writers[cohort_id]
            self._released.fire()

    async def aclose(self) -> None:
        return None
