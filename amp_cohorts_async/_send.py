"""The one send path: a permit from the scheduler, one HTTP exchange, the one retry loop.

``Sender.exchange`` is one attempt: it holds a scheduler permit for exactly one exchange with
the Amplitude host and reports what became of it (for the quota and the rate windows).
``Sender.retrying`` is the only retry loop in the library: it runs an attempt, asks the pure
policy in ``_retry.py`` whether and when to try again, and gives up with the error, whose
``attempts`` then says how many attempts were made. An attempt may be more than one exchange
(a ``/file`` answer and the S3 transfer it points to), so every request is attempted at most
``RetryPolicy.max_attempts`` times, whatever it is made of.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import attrs

from ._config import RetryPolicy
from ._exceptions import AmplitudeError, RateLimitError, TransportError
from ._http import ROUTE, HttpBoundary, Request, Response, parse_json
from ._retry import decide
from ._scheduler import Outcome, RequestKind, Scheduler, WaitCallback
from ._telemetry import OFF, Telemetry

__all__ = ("SendCount", "Sender")

logger = logging.getLogger("amp_cohorts_async")

T = TypeVar("T")


@attrs.define
class SendCount:
    """How many requests left this machine (retries included; refused connections not)."""

    sent: int = 0


class Sender:
    """Sends requests to the Amplitude host under the limits, retrying as the policy says.

    ``on_wait`` (see ``observed``) hears every wait the request goes through: the limits, a
    shared pause after a 429, a backoff before a retry. ``telemetry`` hears them too, and
    each request and its answer.
    """

    def __init__(
        self,
        boundary: HttpBoundary,
        scheduler: Scheduler,
        retry: RetryPolicy,
        rng: random.Random,
        on_wait: WaitCallback | None = None,
        count: SendCount | None = None,
        telemetry: Telemetry = OFF,
    ) -> None:
        self.boundary = boundary
        self.scheduler = scheduler
        self.retry = retry
        self.rng = rng
        self.on_wait = on_wait
        self.count = count
        self.telemetry = telemetry

    def observed(self, on_wait: WaitCallback | None) -> Sender:
        """The same sender, telling ``on_wait`` how long each wait will be."""
        return Sender(self.boundary, self.scheduler, self.retry, self.rng, on_wait, self.count,
                      self.telemetry)

    def counted(self, count: SendCount) -> Sender:
        """The same sender, adding each request that leaves this machine to ``count``."""
        return Sender(self.boundary, self.scheduler, self.retry, self.rng, self.on_wait, count,
                      self.telemetry)

    async def retrying(self, attempt: Callable[[], Awaitable[T]], *, what: str) -> T:
        """Run ``attempt`` until it succeeds or the policy gives up; the only retry loop.

        Quota rule for cohort requests (kept by ``exchange``): a request the server refused
        (429, 4xx) or that never left this machine is not counted; one that failed after it may
        have reached the server (5xx, a dropped connection, a read timeout) is counted as spent,
        and its retry spends another unit, so the local count never under-states Amplitude's.
        """
        number = 0
        with self.telemetry.call():
            while True:
                number += 1
                try:
                    return await attempt()
                except AmplitudeError as error:
                    delay = decide(error, number, self.retry, self.rng)
                    if delay is None:
                        error.attempts = number
                        raise
                    logger.info(
                        "retrying %s in %.2fs after attempt %d: %s", what, delay, number, error
                    )
                    if isinstance(error, RateLimitError):
                        await self.scheduler.pause(delay)  # one shared pause: everyone waits
                    elif delay > 0:
                        if self.on_wait is not None:
                            self.on_wait(delay, "retry")
                        with self.telemetry.waiting("retry"):
                            await anyio.sleep(delay)

    async def exchange(
        self,
        kind: RequestKind,
        build: Callable[[], Request],
        handle: Callable[[Response], Awaitable[T]],
    ) -> T:
        """One exchange under a permit: ``handle`` reads a 2xx/3xx response; errors raise."""
        request = build()  # before the permit: a request that cannot be built costs nothing
        with self.telemetry.waits(self.on_wait) as waits:
            async with self.scheduler.exchange(kind, on_wait=waits.on_wait) as ticket:
                waits.over()
                with self.telemetry.http(request.method, request.url,
                                         request.extensions.get(ROUTE)) as call:
                    try:
                        response = await self.boundary.send(request)
                    except TransportError as error:
                        ticket.outcome = (Outcome.NOT_SENT if error.never_sent
                                          else Outcome.UNKNOWN)
                        if not error.never_sent and self.count is not None:
                            self.count.sent += 1
                        raise
                    if self.count is not None:
                        self.count.sent += 1
                    code = response.status_code
                    call.answered(code)
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

    async def call(
        self,
        kind: RequestKind,
        build: Callable[[], Request],
        handle: Callable[[Response], Awaitable[T]],
        *,
        what: str,
    ) -> T:
        """``exchange`` under the retry loop."""
        return await self.retrying(lambda: self.exchange(kind, build, handle), what=what)

    async def exchange_json(
        self, kind: RequestKind, build: Callable[[], Request], *, what: str
    ) -> Any:
        """``exchange`` that returns the parsed JSON body: one attempt, no retry."""

        async def read_json(response: Response) -> Any:
            return parse_json(response, await self.boundary.read(response), what=what)

        return await self.exchange(kind, build, read_json)

    async def call_json(self, kind: RequestKind, build: Callable[[], Request], *, what: str) -> Any:
        """``call`` that returns the parsed JSON body."""
        return await self.retrying(lambda: self.exchange_json(kind, build, what=what), what=what)
