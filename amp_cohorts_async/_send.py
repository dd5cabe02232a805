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

import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import anyio
import attrs

from ._config import RetryPolicy
from ._exceptions import AmplitudeError, RateLimitError, TransportError
from ._http import ROUTE, HttpBoundary, Request, Response, parse_json
from ._logs import log_retry
from ._retry import decide
from ._scheduler import Outcome, RequestKind, Scheduler, WaitCallback, WaitReason
from ._telemetry import OFF, Telemetry

__all__ = ("SendCount", "SendObserver", "Sender")


T = TypeVar("T")


@attrs.define
class SendCount:
    """How many requests left this machine (retries included; refused connections not)."""

    sent: int = 0


class SendObserver(Protocol):
    """Hears what the requests of one piece of work (a cohort's export) go through.

    ``on_wait`` is told each wait as it starts and again as a long one runs down (for a
    progress display; None when nobody listens, so long waits are not chopped up for it);
    ``waited`` is told each wait once it is over, with the seconds it really took;
    ``attempting`` each attempt before it is made (``number`` 1 is the first, 2 the first
    retry); ``retrying`` each failed attempt that will be tried again after ``delay`` seconds.
    """

    @property
    def on_wait(self) -> WaitCallback | None: ...

    def waited(self, seconds: float, reason: WaitReason) -> None: ...

    def attempting(self, what: str, number: int) -> None: ...

    def retrying(self, what: str, number: int, error: AmplitudeError, delay: float) -> None: ...


class Sender:
    """Sends requests to the Amplitude host under the limits, retrying as the policy says.

    ``observer`` (see ``observed``) hears every attempt, retry and wait the request goes
    through: the limits, a shared pause after a 429, a backoff before a retry. ``telemetry``
    hears the waits too, and each request and its answer.
    """

    def __init__(
        self,
        boundary: HttpBoundary,
        scheduler: Scheduler,
        retry: RetryPolicy,
        rng: random.Random,
        observer: SendObserver | None = None,
        count: SendCount | None = None,
        telemetry: Telemetry = OFF,
    ) -> None:
        self.boundary = boundary
        self.scheduler = scheduler
        self.retry = retry
        self.rng = rng
        self.observer = observer
        self.count = count
        self.telemetry = telemetry

    @property
    def on_wait(self) -> WaitCallback | None:
        return None if self.observer is None else self.observer.on_wait

    def observed(self, observer: SendObserver | None) -> Sender:
        """The same sender, telling ``observer`` what each request goes through."""
        return Sender(self.boundary, self.scheduler, self.retry, self.rng, observer, self.count,
                      self.telemetry)

    def counted(self, count: SendCount) -> Sender:
        """The same sender, adding each request that leaves this machine to ``count``."""
        return Sender(self.boundary, self.scheduler, self.retry, self.rng, self.observer, count,
                      self.telemetry)

    async def retrying(self, attempt: Callable[[], Awaitable[T]], *, what: str) -> T:
        """Run ``attempt`` until it succeeds or the policy gives up; the only retry loop.

        Quota rule for cohort requests (kept by ``exchange``): a request the server refused
        (429, 4xx) or that never left this machine is not counted; one that failed after it may
        have reached the server (5xx, a dropped connection, a read timeout) is counted as spent,
        and its retry spends another unit, so the local count never under-states Amplitude's.
        """
        observer = self.observer
        number = 0
        with self.telemetry.call():
            while True:
                number += 1
                if observer is not None:
                    observer.attempting(what, number)
                try:
                    return await attempt()
                except AmplitudeError as error:
                    delay = decide(error, number, self.retry, self.rng)
                    if delay is None:
                        error.attempts = number
                        raise
                    if observer is not None:
                        observer.retrying(what, number, error, delay)
                    else:
                        log_retry(what, number, error, delay)
                    if isinstance(error, RateLimitError):
                        await self.scheduler.pause(delay)  # one shared pause: everyone waits
                    elif delay > 0:
                        on_wait = self.on_wait
                        if on_wait is not None:
                            on_wait(delay, "retry")
                        started = anyio.current_time()
                        await anyio.sleep(delay)
                        slept = anyio.current_time() - started
                        if observer is not None:
                            observer.waited(slept, "retry")
                        self.telemetry.waited({"retry": slept})

    async def exchange(
        self,
        kind: RequestKind,
        build: Callable[[], Request],
        handle: Callable[[Response], Awaitable[T]],
    ) -> T:
        """One exchange under a permit: ``handle`` reads a 2xx/3xx response; errors raise."""
        request = build()  # before the permit: a request that cannot be built costs nothing
        async with self.scheduler.exchange(kind, on_wait=self.on_wait) as ticket:
            if self.observer is not None:
                for reason, seconds in ticket.held.items():
                    self.observer.waited(seconds, reason)
            self.telemetry.waited(ticket.held)
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
