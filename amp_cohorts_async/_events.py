"""Progress events of one cohort, delivered to the user's callback."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ._exceptions import AmplitudeError
from ._models import Phase, ProgressEvent

__all__ = ("Progress", "ProgressCallback")

logger = logging.getLogger("amp_cohorts_async")

ProgressCallback = Callable[[ProgressEvent], None]


class Progress:
    """Emits ProgressEvents for ``cohort_id``; silent without a callback or a cohort id.

    A callback that raises is logged and the download goes on.
    """

    def __init__(self, callback: ProgressCallback | None, cohort_id: str | None) -> None:
        self.callback = callback
        self.cohort_id = cohort_id

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

    @property
    def on_wait(self) -> Callable[[float, str], None] | None:
        """``waiting`` when anyone listens, for the send path to report its waits."""
        return self.waiting if self.callback is not None and self.cohort_id else None
