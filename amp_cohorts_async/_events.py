"""One cohort's observer: progress events for the user's callback, lifecycle log lines, and
the tally of attempts and waits its result reports.

The send path tells it every attempt, retry and wait (it is a ``SendObserver``); the
download workflow tells it the lifecycle (requested, ready, downloaded, failed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio

from ._exceptions import AmplitudeError
from ._logs import LOGGED_WAIT, TOLD_WAIT, describe, error_fields, log_event, log_retry
from ._models import DownloadResult, Phase, ProgressEvent

__all__ = ("Progress", "ProgressCallback")

logger = logging.getLogger("amp_cohorts_async")

ProgressCallback = Callable[[ProgressEvent], None]


class Progress:
    """Observes one cohort's export; emits ProgressEvents when there is a callback and a
    cohort id, and logs and tallies either way.

    A callback that raises is logged and the download goes on.
    """

    def __init__(self, callback: ProgressCallback | None, cohort_id: str | None) -> None:
        self.callback = callback
        self.cohort_id = cohort_id
        self.request_id: str | None = None
        #: Attempts of every request of the export (polls included), and how many of them
        #: were retries; seconds held by reason ("limits", "amplitude", "retry").
        self.attempts = 0
        self.retries = 0
        self.waits: dict[str, float] = {}
        self.polls = 0
        self._started: float | None = None
        self._requested_at: float | None = None
        self._ready_at: float | None = None

    def emit(
        self,
        phase: Phase,
        *,
        bytes_done: int = 0,
        bytes_total: int | None = None,
        wait_seconds: float | None = None,
        wait_reason: str | None = None,
        error: AmplitudeError | None = None,
    ) -> None:
        if self.callback is None or self.cohort_id is None:
            return
        event = ProgressEvent(
            cohort_id=self.cohort_id,
            phase=phase,
            bytes_done=bytes_done,
            bytes_total=bytes_total,
            wait_seconds=wait_seconds,
            wait_reason=wait_reason,
            error=error,
        )
        try:
            self.callback(event)
        except Exception:
            logger.exception("on_progress callback raised; the download goes on")

    def waiting(self, seconds: float, reason: str) -> None:
        self.emit("waiting", wait_seconds=seconds, wait_reason=reason)

    # -- SendObserver ---------------------------------------------------------------------
    @property
    def on_wait(self) -> Callable[[float, str], None] | None:
        """``waiting`` when anyone listens, for the send path to announce its waits."""
        return self.waiting if self.callback is not None and self.cohort_id else None

    def attempting(self, what: str, number: int) -> None:
        self.attempts += 1
        if number > 1:
            self.retries += 1

    def retrying(self, what: str, number: int, error: AmplitudeError, delay: float) -> None:
        log_retry(what, number, error, delay, cohort_id=self.cohort_id,
                  request_id=self.request_id)

    def waited(self, seconds: float, reason: str) -> None:
        self.waits[reason] = self.waits.get(reason, 0.0) + seconds
        if reason == "retry" or seconds < TOLD_WAIT:
            return  # the "retried" line already said how long; a moment is not news
        log_event("waited", "cohort %s: waited %.1fs (%s)", self.cohort_id, seconds, reason,
                  level=logging.INFO if seconds >= LOGGED_WAIT else logging.DEBUG,
                  cohort_id=self.cohort_id, request_id=self.request_id,
                  seconds=round(seconds, 3), wait_reason=reason)

    # -- lifecycle ------------------------------------------------------------------------
    def started(self) -> None:
        self._started = anyio.current_time()

    def requested(self, request_id: str, *, reused: bool) -> None:
        """An export request exists: made now, or ``reused`` from an earlier run."""
        self.request_id = request_id
        now = self._requested_at = anyio.current_time()
        seconds = _since(self._started, now)
        if reused:
            log_event("requested", "cohort %s: reusing export request %s", self.cohort_id,
                      request_id, cohort_id=self.cohort_id, request_id=request_id,
                      reused=True, seconds=seconds)
        else:
            log_event("requested", "cohort %s: export requested (request %s) after %.1fs",
                      self.cohort_id, request_id, seconds, cohort_id=self.cohort_id,
                      request_id=request_id, reused=False, seconds=seconds)
        self.emit("requested")

    def polled(self) -> None:
        self.polls += 1
        self.emit("polling")

    def ready(self) -> None:
        now = self._ready_at = anyio.current_time()
        seconds = _since(self._requested_at, now)
        log_event("ready", "cohort %s: export %s ready after %.1fs (polls: %d)", self.cohort_id,
                  self.request_id, seconds, self.polls, cohort_id=self.cohort_id,
                  request_id=self.request_id, seconds=seconds, polls=self.polls)

    def downloaded(self, result: DownloadResult) -> None:
        seconds = _since(self._ready_at, anyio.current_time())
        log_event("downloaded", "cohort %s: downloaded %d bytes in %.1fs to %s",
                  self.cohort_id, result.size_bytes, seconds, result.path,
                  cohort_id=self.cohort_id, request_id=result.request_id,
                  bytes=result.size_bytes, seconds=seconds, members=result.members,
                  path=str(result.path), attempts=self.attempts, retries=self.retries,
                  waited=self.rounded_waits(),
                  total_seconds=_since(self._started, anyio.current_time()))
        self.emit("done", bytes_done=result.size_bytes, bytes_total=result.size_bytes)

    def failed(self, error: BaseException) -> None:
        log_event("failed", "cohort %s: failed: %s", self.cohort_id, describe(error),
                  cohort_id=self.cohort_id, request_id=self.request_id,
                  attempts=self.attempts, retries=self.retries, waited=self.rounded_waits(),
                  **error_fields(error))
        self.emit("failed", error=error if isinstance(error, AmplitudeError) else None)

    def tally(self) -> dict[str, Any]:
        """``attempts``, ``retries`` and ``waited``, as results and entries carry them."""
        return {"attempts": self.attempts, "retries": self.retries, "waited": dict(self.waits)}

    def rounded_waits(self) -> dict[str, float]:
        return {reason: round(seconds, 3) for reason, seconds in self.waits.items()}


def _since(then: float | None, now: float) -> float:
    return 0.0 if then is None else round(now - then, 3)
