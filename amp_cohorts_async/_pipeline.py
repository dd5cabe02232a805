"""One loop that sends a request under a scheduler permit and retries as the policy decides."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import httpx

from ._config import RetryPolicy
from ._exceptions import AmplitudeError, RateLimitError, TransportError
from ._http import HttpBoundary, never_sent, parse_json
from ._retry import decide
from ._scheduler import Outcome, RequestKind, Scheduler, WaitCallback

__all__ = ("Pipeline",)

logger = logging.getLogger("amp_cohorts_async")

T = TypeVar("T")


class Pipeline:
    def __init__(
        self,
        boundary: HttpBoundary,
        scheduler: Scheduler,
        retry: RetryPolicy,
        rng: random.Random,
    ) -> None:
        self.boundary = boundary
        self.scheduler = scheduler
        self.retry = retry
        self.rng = rng

    async def call(
        self,
        kind: RequestKind,
        build: Callable[[], httpx.Request],
        handle: Callable[[httpx.Response], Awaitable[T]],
        *,
        on_wait: WaitCallback | None = None,
    ) -> T:
        """Send ``build()`` under a permit; ``handle`` reads the (2xx/3xx) response.

        Quota rule for cohort requests: a request the server refused (429, 4xx) or that never
        left this machine is not counted; one that failed after it may have reached the server
        (5xx, a dropped connection, a read timeout) is counted as spent, and its retry spends
        another unit, so the local count never under-states what Amplitude may have counted.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(kind, build, handle, on_wait)
            except AmplitudeError as error:
                delay = decide(error, attempt, self.retry, self.rng)
                if delay is None:
                    raise
                logger.info(
                    "retrying %s in %.2fs after attempt %d: %s", kind.value, delay, attempt, error
                )
                if isinstance(error, RateLimitError):
                    self.scheduler.pause(delay)  # one shared pause: everyone waits
                else:
                    if on_wait is not None:
                        on_wait(delay)
                    await anyio.sleep(delay)

    async def _attempt(
        self,
        kind: RequestKind,
        build: Callable[[], httpx.Request],
        handle: Callable[[httpx.Response], Awaitable[T]],
        on_wait: WaitCallback | None,
    ) -> T:
        async with self.scheduler.exchange(kind, on_wait=on_wait) as ticket:
            try:
                response = await self.boundary.send(build())
            except TransportError as error:
                ticket.outcome = Outcome.NOT_SENT if never_sent(error) else Outcome.UNKNOWN
                raise
            code = response.status_code
            if code < 400:
                outcome = Outcome.ACCEPTED
            elif code < 500:
                outcome = Outcome.REFUSED
            else:
                outcome = Outcome.UNKNOWN
            ticket.answered(anyio.current_time(), outcome)
            try:
                await self.boundary.raise_for_status(response)
                return await handle(response)
            finally:
                await response.aclose()

    async def call_json(
        self,
        kind: RequestKind,
        build: Callable[[], httpx.Request],
        *,
        what: str,
        on_wait: WaitCallback | None = None,
    ) -> Any:
        async def read_json(response: httpx.Response) -> Any:
            return parse_json(response, await self.boundary.read(response), what=what)

        return await self.call(kind, build, read_json, on_wait=on_wait)
