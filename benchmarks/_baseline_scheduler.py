"""The baseline the scheduler benchmark compares against: aiolimiter leaky buckets.

Same concurrency gate and pause as ours; only the cohort-request windows differ: one
``AsyncLimiter(max_requests, seconds)`` per RateWindow, acquired when the permit is granted.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from aiolimiter import AsyncLimiter

from amp_cohorts_async._scheduler import Scheduler


class AiolimiterScheduler(Scheduler):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._limiters: list[AsyncLimiter] | None = None

    async def _admit_cohort_request(self, on_wait: Callable[[float], None] | None) -> str:
        if self._limiters is None:
            self._limiters = [AsyncLimiter(w.max_requests, w.seconds)
                              for w in self.limits.cohort_requests]
        month = self.month()
        self.backend.reserve_quota(month, self.limits.monthly_quota)
        for limiter in self._limiters:
            await limiter.acquire()
        # Count as in flight so settle() stays balanced; no admission check is made.
        for log in self.backend.logs:  # type: ignore[attr-defined]
            log.in_flight += 1
        return month


def utc_now() -> datetime:
    from datetime import UTC

    return datetime.now(UTC)
