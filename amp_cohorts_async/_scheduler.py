"""Permits for every exchange with the Amplitude host.

Three guards, all shared by every coroutine of one client and, through a shared
``LimitsBackend``, by every process using one account:

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
import functools
import heapq
import itertools
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeVar

import anyio
import attrs

from ._background import alongside
from ._config import Limits
from ._exceptions import AmplitudeError
from ._limits import (
    InMemoryLimits,
    LimitsBackend,
    LimitsBackendError,
    Permit,
    PermitRequest,
    Settlement,
    utc_month,
)

__all__ = ("Outcome", "PriorityGate", "RequestKind", "Scheduler", "Ticket")

logger = logging.getLogger("amp_cohorts_async")

T = TypeVar("T")


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
    #: Seconds the exchange was held before it could be sent, by why: ``"limits"`` (the
    #: gate, the rate windows, the slots) and ``"amplitude"`` (the shared pause after a 429).
    held: dict[WaitReason, float] = attrs.field(factory=dict)

    def answered(self, at: float, outcome: Outcome) -> None:
        self.answered_at = at
        self.outcome = outcome


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

    @property
    def queued(self) -> int:
        """Waiters in line (some may have given up and not been collected yet)."""
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot only if one is free now and nobody is queued for it."""
        if self.in_use < self.capacity and not self._waiters:
            self.in_use += 1
            return True
        return False

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


WaitReason = Literal["limits", "amplitude", "retry"]
# Told (seconds left, why) when a request starts waiting, and again as a long wait runs down.
WaitCallback = Callable[[float, WaitReason], None]
# A long wait is re-announced (and re-checked with the backend) at least this often.
WAIT_STEP = 5.0
PAUSE_SLACK = 1e-3  # the least one turn of _sleep_out_pause sleeps, so a pause always ends


def usage_month(resets_at: datetime) -> str:
    """The month a usage answer counts: the one before ``resets_at`` (the first of the next
    month, UTC), on Amplitude's clock, whatever the clocks here say."""
    return utc_month(resets_at - timedelta(microseconds=1))


class Scheduler:
    """Grants exchange permits under Limits. One per client; primitives are made lazily.

    The priority order is local (``PriorityGate``); the limits themselves live in the
    backend, which may be shared by other processes (``LimitsBackend``).
    """

    def __init__(
        self,
        limits: Limits,
        *,
        backend: LimitsBackend | None = None,
        app: str = "",
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> None:
        self.limits = limits
        self.backend: LimitsBackend = (
            backend if backend is not None else InMemoryLimits(wall_clock=wall_clock))
        self.backend.bind(limits, app)
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()
        self._gate: PriorityGate | None = None
        self._admission: anyio.Lock | None = None
        self._jobs: anyio.Semaphore | None = None
        self.paused_until = -math.inf  # what this process knows of the shared pause
        #: Leases the backend found expired while held (a stalled process): reported, since
        #: another process may have been granted the same slot meanwhile.
        self.leases_lost = 0
        #: Cohort requests this scheduler let through that count against the quota (sent and
        #: not refused), whatever other processes spent.
        self.cohort_requests_spent = 0
        #: The backend lost its shared state since the quota was last read from Amplitude:
        #: the next cohort request first calls ``refresh_usage``.
        self.quota_unknown = False
        self._state_losses_seen = self.backend.state_losses
        #: Reads the usage from Amplitude (``get_usage``, which calls ``record_usage``). Set
        #: by the client that owns this scheduler: the scheduler sits below the endpoints.
        self.refresh_usage: Callable[[], Awaitable[object]] | None = None

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

    def idle(self) -> bool:
        """Whether an exchange could start here right now without queueing."""
        gate = self.gate
        return gate.in_use < gate.capacity and not gate.queued

    def _admission_lock(self) -> anyio.Lock:
        if self._admission is None:
            self._admission = anyio.Lock()
        return self._admission

    # -- quota ----------------------------------------------------------------------------
    async def record_usage(self, usage: int, resets_at: datetime) -> None:
        """Amplitude's count of cohort requests in the month that ends at ``resets_at``."""
        await self._call(self.backend.set_known_usage(usage_month(resets_at), usage))
        self.quota_unknown = False

    async def quota_used(self, month: str | None = None) -> int:
        """Units the limits count in ``month`` (``None``: this month on the backend's clock,
        which for a shared backend is not this process's clock)."""
        return await self._call(self.backend.quota_used(month))

    # -- the shared pause -----------------------------------------------------------------
    async def pause(self, seconds: float) -> None:
        """Hold every exchange for ``seconds`` (a 429 was answered), here and in the backend."""
        until = anyio.current_time() + seconds
        if until > self.paused_until:
            self.paused_until = until
        await self._call(self.backend.pause(seconds))

    async def _sleep_out_pause(self, remaining: float, on_wait: WaitCallback | None) -> float:
        """Sleep until the shared pause is over; returns the seconds slept."""
        started = anyio.current_time()
        # Spread the restart a little so a crowd does not hit the server at one instant.
        end = anyio.current_time() + remaining + self.rng.uniform(0.0, min(1.0, remaining * 0.1))
        # Every turn sleeps at least PAUSE_SLACK: a clock that rounds (virtual time does) could
        # otherwise wake a hair early forever, and a turn that slept nothing would leave the
        # caller asking the backend again at once, without the clock moving (a spin).
        while (left := end - anyio.current_time()) > 0:
            if on_wait is not None:
                on_wait(left, "amplitude")  # a 429: Amplitude asked everyone to wait
            await anyio.sleep(max(min(left, WAIT_STEP), PAUSE_SLACK))
        return anyio.current_time() - started

    # -- permits --------------------------------------------------------------------------
    async def _acquire(
        self, request: PermitRequest, on_wait: WaitCallback | None, held: _Held, *,
        gate_too: bool = False,
    ) -> tuple[Permit, bool]:
        """Ask the backend until it grants ``request``, sleeping as long as it says (the
        shared pause's part of it added to ``held``).

        ``gate_too``: whenever the local gate is free at once, take it and ask for the slot in
        the same round trip; the second value says whether the gate and a slot came with it.
        """
        while True:
            if (request.cohort and self.quota_unknown and request.quota is not None
                    and self.refresh_usage is not None):
                # The shared count was lost with the backend's state: Amplitude's own count
                # comes first (a slot of its own, before this request takes the gate).
                await self.refresh_usage()
            gated = (gate_too and self.paused_until <= anyio.current_time()
                     and self.gate.try_acquire())
            try:
                result = await self._call(self.backend.acquire(
                    attrs.evolve(request, slot=True) if gated else request))
            except BaseException:
                if gated:
                    self.gate.release()
                raise
            if isinstance(result, Permit):
                return result, gated
            if gated:
                self.gate.release()
                if result.reason != "window":
                    gate_too = False  # the slot said no: ask for the rest alone, then queue
                    continue
            if result.reason == "pause":
                held.paused += await self._sleep_out_pause(result.seconds, on_wait)
                continue
            if on_wait is not None and math.isfinite(result.seconds):
                on_wait(result.seconds, "limits")
            wait = min(result.seconds, WAIT_STEP) if on_wait is not None else result.seconds
            if self.backend.recheck is not None:
                wait = min(wait, self.backend.recheck)
            await self.backend.wait_for_release(wait)

    async def _call(self, operation: Awaitable[T]) -> T:
        """A backend operation shielded from cancellation (a grant must not be lost halfway
        through its round trip), its failures raised as the library's errors."""
        with anyio.CancelScope(shield=True):
            try:
                result = await operation
            except AmplitudeError:
                raise
            except Exception as exc:
                raise LimitsBackendError(
                    f"the limits backend failed: {type(exc).__name__}: {exc}"
                ) from exc
            finally:
                if self.backend.state_losses != self._state_losses_seen:
                    self._state_losses_seen = self.backend.state_losses
                    self.quota_unknown = True
        return result

    async def _settle(self, leases: _Leases, ticket: Ticket) -> None:
        """Hand the leases back, settled as ``ticket`` says. Never raises: the exchange's own
        outcome (an answer, or the error that stopped it) is what its caller must hear. A
        backend that cannot be told lets the leases run out by their TTL; a cohort request
        it still counts in flight then counts as answered at the end of its lease, which is
        never earlier than the truth, and its quota unit stays spent."""
        permits, leases.permits = leases.permits, []
        if not permits:
            return
        settlement = None
        if any(permit.cohort for permit in permits):
            if ticket.outcome in (Outcome.ACCEPTED, Outcome.UNKNOWN):
                self.cohort_requests_spent += 1
            settlement = Settlement(
                stamp=ticket.outcome is not Outcome.NOT_SENT,
                refund=ticket.outcome in (Outcome.NOT_SENT, Outcome.REFUSED),
                # Unknown fate: the backend assumes the server counted it as late as now.
                at=ticket.answered_at,
            )
        try:
            self._report_lost(await self._call(self.backend.release(permits, settlement)))
        except LimitsBackendError as error:
            logger.warning("could not hand %d limits lease(s) back (%s); they run out by "
                           "themselves", len(permits), error)

    def _report_lost(self, lost: int) -> None:
        if lost:
            self.leases_lost += lost
            logger.warning("%d limits lease(s) expired while held; another process may have "
                           "used the same slot meanwhile (is this process stalling?)", lost)

    async def _renew(self, leases: _Leases) -> int:
        """Renew every lease held now (good for a TTL from ``started`` then); returns how many
        the backend found expired while held."""
        if not leases.permits:
            return 0
        started = anyio.current_time()
        lost = await self.backend.renew(list(leases.permits))
        leases.renewed_at = started
        if lost:
            leases.lost = True
        return lost

    @asynccontextmanager
    async def _renewing(self, renew_once: Callable[[], Awaitable[int]]) -> AsyncIterator[None]:
        """Keep leases alive while the block runs (backends with a TTL), whatever the holder
        is doing: waiting for a slot, sending, reading a slow answer. ``renew_once()`` renews
        them and says how many it found expired while held."""
        ttl = self.backend.lease_ttl
        if ttl is None:
            yield
            return

        async def renew() -> None:
            while True:
                await anyio.sleep(ttl / 3)
                try:
                    self._report_lost(await self._call(renew_once()))
                except LimitsBackendError as error:
                    # Not fatal to the holder: an answer on its way still counts. A lease
                    # that runs out meanwhile is caught before sending, or reported.
                    logger.warning("could not renew limits leases: %s", error)

        async with alongside(renew):
            yield

    async def _still_held(self, leases: _Leases) -> bool:
        """Whether the leases are surely ours right before sending.

        The renewer keeps them alive, but a process that stalled (a paused VM, a blocked loop)
        may have let them run out, and another holder may have the slot now: then nothing is
        sent. When the last renewal is older than half the TTL, ask the backend first.
        """
        ttl = self.backend.lease_ttl
        if ttl is not None and leases.permits and (
                anyio.current_time() - leases.renewed_at > ttl / 2):
            self._report_lost(await self._call(self._renew(leases)))
        return not leases.lost

    @asynccontextmanager
    async def cohort_write(self, cohort_id: str) -> AsyncIterator[None]:
        """Hold the backend's write lease of ``cohort_id`` while the body runs: no other
        holder sharing the backend (another process or host, with a shared one) writes to
        that cohort meanwhile. The lease is renewed while held (backends with a TTL)."""
        while (token := await self._call(self.backend.acquire_write(cohort_id))) is None:
            wait = WAIT_STEP if self.backend.recheck is None else self.backend.recheck
            await self.backend.wait_for_release(wait)

        async def renew_once() -> int:
            return 0 if await self.backend.renew_write(cohort_id, token) else 1

        try:
            async with self._renewing(renew_once):
                yield
        finally:
            try:
                await self._call(self.backend.release_write(cohort_id, token))
            except LimitsBackendError as error:
                # What the writes did stands; the lease runs out by itself.
                logger.warning("could not hand the write lease of a cohort back (%s); it "
                               "runs out by itself", error)

    @asynccontextmanager
    async def exchange(
        self, kind: RequestKind, *, on_wait: WaitCallback | None = None
    ) -> AsyncIterator[Ticket]:
        """Hold a permit for one HTTP exchange with the Amplitude host.

        Every permit is handed back on every path (an answer, an error, a cancellation, a
        failing backend), the local gate last, and a failure to hand it back never hides
        what became of the exchange. Leases are renewed from the grant until they are
        settled. If one was lost before sending (the process stalled past the TTL), nothing
        is sent: the permits go back and are asked for again.
        """
        held = _Held(since=anyio.current_time())
        while True:
            ticket = Ticket()
            leases = _Leases(renewed_at=anyio.current_time())
            gated = False  # this exchange holds a place in the local gate
            try:
                if kind is RequestKind.COHORT_REQUEST:
                    # FIFO among this process's cohort requests: the window wait is not a
                    # race. When the gate is free, the slot comes in the same round trip.
                    async with self._admission_lock():
                        permit, gated = await self._acquire(PermitRequest(
                            slot=False, cohort=True, quota=self.limits.monthly_quota),
                            on_wait, held, gate_too=True)
                        leases.add(permit)
                async with self._renewing(functools.partial(self._renew, leases)):
                    if not gated:
                        while (remaining := self.paused_until - anyio.current_time()) > 0:
                            held.paused += await self._sleep_out_pause(remaining, on_wait)
                        await self.gate.acquire(PRIORITY[kind])
                        gated = True
                        slot, _ = await self._acquire(PermitRequest(slot=True, cohort=False),
                                                      on_wait, held)
                        leases.add(slot)
                    if await self._still_held(leases):
                        ticket.held = held.by_reason(anyio.current_time())
                        ticket.outcome = Outcome.UNKNOWN  # from here the server may see it
                        yield ticket
                        return
            finally:
                try:
                    # Back to the backend before the local gate opens, so the next local
                    # holder finds the slot free.
                    await self._settle(leases, ticket)
                finally:
                    if gated:
                        self.gate.release()
            logger.warning("a limits lease ran out before the request was sent; nothing "
                           "was sent, asking for the permits again")


@attrs.define
class _Held:
    """How long one exchange has waited for its permits, and how much of it in the pause."""

    since: float
    paused: float = 0.0

    def by_reason(self, now: float) -> dict[WaitReason, float]:
        held: dict[WaitReason, float] = {}
        limits = now - self.since - self.paused
        if limits > 0:
            held["limits"] = limits
        if self.paused > 0:
            held["amplitude"] = self.paused
        return held


@attrs.define
class _Leases:
    """The permits one exchange holds, and when their leases were last known good."""

    renewed_at: float
    permits: list[Permit] = attrs.field(factory=list)
    lost: bool = False  # the backend found one expired while held

    def add(self, permit: Permit) -> None:
        if not self.permits:
            self.renewed_at = anyio.current_time()
        self.permits.append(permit)
