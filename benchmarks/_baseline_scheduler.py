"""The baseline the scheduler benchmark compares against: aiolimiter leaky buckets.

Same concurrency gate and pause as ours; only the cohort-request windows differ: one
``AsyncLimiter(max_requests, seconds)`` per RateWindow, acquired when the permit is asked for,
instead of the exact sliding log. Plugged in as a ``LimitsBackend``.
"""

from __future__ import annotations

import math

from aiolimiter import AsyncLimiter

import amp_cohorts_async as amp
from amp_cohorts_async._limits import utc_month as amp_month


class _VirtualTimeSafeLimiter(AsyncLimiter):
    """AsyncLimiter with its wake-up timer moved 1 µs later.

    Under virtual time its float wake-up can land a hair before its own deadline, find no
    capacity, and re-arm a timer that is already due: a livelock. One microsecond of slack
    avoids that without changing what it admits.
    """

    def _wake_next(self, *args: object) -> None:
        super()._wake_next(*args)
        handle = self._waker_handle
        if handle is not None:
            handle.cancel()
            self._waker_handle = self._loop.call_at(handle.when() + 1e-6, self._wake_next)


class AiolimiterLimits(amp.InMemoryLimits):
    """The in-memory backend with its exact windows replaced by leaky buckets."""

    def __init__(self) -> None:
        super().__init__()
        self._limiters: list[AsyncLimiter] | None = None
        self._granted = 0

    async def acquire(self, request: amp.PermitRequest) -> amp.Permit | amp.PermitWait:
        if not request.cohort:
            return await super().acquire(request)
        if request.slot:
            # Not both at once: the scheduler then asks for the cohort part alone, then the slot.
            return amp.PermitWait(math.inf, "slots")
        assert self.limits is not None
        if self._limiters is None:
            self._limiters = [_VirtualTimeSafeLimiter(w.max_requests, w.seconds)
                              for w in self.limits.cohort_requests]
        month = amp_month(self.wall_clock())
        used = await self.quota_used(month)
        if request.quota is not None and used + 1 > request.quota:
            raise amp.QuotaExceededError(f"{used} of {request.quota} used")
        for limiter in self._limiters:
            await limiter.acquire()
        await self.set_known_usage(month, used + 1)
        for log in self.logs:  # counted in flight so that release() stays balanced
            log.in_flight += 1
        self._granted += 1
        return amp.Permit(f"a{self._granted}", slot=False, cohort=True, month=month)
