"""The baseline the scheduler benchmark compares against: aiolimiter leaky buckets.

Same concurrency gate and pause as ours; only the cohort-request windows differ: one
``AsyncLimiter(max_requests, seconds)`` per RateWindow, acquired when the permit is granted.
"""

from __future__ import annotations

from collections.abc import Callable

from aiolimiter import AsyncLimiter

import amp_cohorts_async as amp
from amp_cohorts_async._scheduler import Scheduler


def use_scheduler(client: amp.CohortsClient, scheduler: Scheduler) -> None:
    """Swap the scheduler every layer of ``client`` asks for permits (benchmark only)."""
    client._scheduler = scheduler
    client._api.scheduler = scheduler
    client._api.sender.scheduler = scheduler
    client._downloader.scheduler = scheduler


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


class AiolimiterScheduler(Scheduler):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._limiters: list[AsyncLimiter] | None = None

    async def _admit_cohort_request(self, on_wait: Callable[[float], None] | None) -> str:
        if self._limiters is None:
            self._limiters = [_VirtualTimeSafeLimiter(w.max_requests, w.seconds)
                              for w in self.limits.cohort_requests]
        month = self.month()
        self.backend.reserve_quota(month, self.limits.monthly_quota)
        for limiter in self._limiters:
            await limiter.acquire()
        # Count as in flight so settle() stays balanced; no admission check is made.
        for log in self.backend.logs:  # type: ignore[attr-defined]
            log.in_flight += 1
        return month
