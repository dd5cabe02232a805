"""What the ``amp_cohorts_async`` logger says, and the ways to see it without code.

Each cohort's lifecycle is told at INFO, one line per event (requested, ready, downloaded,
retried, waited, failed), with its values also as ``extra`` fields on the record (``event``,
``cohort_id``, ``request_id``, ``bytes``, ``seconds``, ...; the README lists them), so a JSON
formatter or a log pipeline can read them without parsing the text. Wire detail (each exchange,
its URL without the query string) is at DEBUG. Nothing here logs a key, a token or a presigned
signature: URLs lose their query, error text goes through ``redact``.

httpx logs every request URL at INFO (a 200-cohort batch: about 4,000 lines, presigned URLs
among them). Its records for the library's own requests are dropped, through a filter on the
``httpx`` logger that recognises them by a context variable set around the library's sends,
unless the user asks for httpx's lines by giving that logger a level of its own
(``logging.getLogger("httpx").setLevel(logging.INFO)``); a user's own httpx requests are
never touched.

``AMP_COHORTS_LOG=info|debug`` sends the lines to stderr without code: one handler, installed
once, and only when the ``amp_cohorts_async`` logger has neither a handler nor a level of the
user's (when the root logger has handlers, only the level is set, so the lines go where the
user's logs go instead of twice).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import IO, Any

from ._exceptions import AmplitudeError
from ._models import CohortOutcome, SyncReport
from ._redact import redact

__all__ = (
    "ENV_VAR",
    "LOGGED_WAIT",
    "TOLD_WAIT",
    "JsonFormatter",
    "configure_from_env",
    "describe",
    "error_fields",
    "install_httpx_quieting",
    "library_request",
    "log_batch",
    "log_event",
    "log_retry",
    "log_sync",
    "log_to_stream",
)

logger = logging.getLogger("amp_cohorts_async")

ENV_VAR = "AMP_COHORTS_LOG"
LEVELS = {"info": logging.INFO, "debug": logging.DEBUG}
#: Waits shorter than this are told at DEBUG only: a queue of a few milliseconds for the
#: concurrency gate is not news to an operator, and there would be one for many exchanges.
LOGGED_WAIT = 1.0
#: Shorter than this, a wait is not told at all (it is still counted in the result): every
#: exchange spends a moment getting its permits, a round trip to a shared backend included.
TOLD_WAIT = 0.05
HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_event(event: str, message: str, *args: object, level: int = logging.INFO,
              **extra: Any) -> None:
    """One lifecycle line: ``message % args`` as text, ``event`` and ``extra`` as fields."""
    if logger.isEnabledFor(level):
        logger.log(level, message, *args, extra={"event": event, **extra})


def describe(error: BaseException) -> str:
    """An error's type and text, redacted (library errors are clean; others may not be)."""
    return redact(f"{type(error).__name__}: {error}")


def error_fields(error: BaseException) -> dict[str, Any]:
    return {"error_type": type(error).__name__,
            "status_code": getattr(error, "status_code", None)}


def log_retry(what: str, number: int, error: AmplitudeError, delay: float, *,
              cohort_id: str | None = None, request_id: str | None = None) -> None:
    """A failed attempt that will be tried again after ``delay`` seconds."""
    prefix = "" if cohort_id is None else f"cohort {cohort_id}: "
    log_event("retried", "%sretrying %s in %.2fs after attempt %d: %s", prefix, what, delay,
              number, describe(error), cohort_id=cohort_id, request_id=request_id,
              attempt=number, what=what, retry_in=round(delay, 3), **error_fields(error))


# The sync actions an operator may have to act on: told one line each.
_NOTEWORTHY = ("missing", "too_large", "over_budget")


def log_sync(report: SyncReport, *, dry_run: bool) -> None:
    """A sync run's closing line (counts by action, quota), after one line per cohort that
    was missing, too large or over the budget."""
    for entry in report.entries:
        if entry.action in _NOTEWORTHY:
            log_event("skipped", "cohort %s: %s", entry.cohort_id,
                      entry.action.replace("_", " "), cohort_id=entry.cohort_id,
                      action=entry.action)
    actions: dict[str, int] = {}
    for entry in report.entries:
        actions[entry.action] = actions.get(entry.action, 0) + 1
    counts = ", ".join(f"{count} {action.replace('_', ' ')}"
                       for action, count in sorted(actions.items()))
    left = "" if report.quota_remaining is None else f", {report.quota_remaining} left"
    log_event("synced", "%s of %d cohorts: %s; %d cohort requests spent%s",
              "dry run" if dry_run else "sync", len(report.entries), counts or "nothing",
              report.requests_spent, left, cohorts=len(report.entries), actions=actions,
              requests_spent=report.requests_spent, quota_remaining=report.quota_remaining,
              dry_run=dry_run)


def log_batch(outcomes: list[CohortOutcome], kept: int) -> None:
    """A batch's closing line: how many cohorts were downloaded, kept, failed."""
    failed = sum(1 for outcome in outcomes if not outcome.ok)
    downloaded = len(outcomes) - failed - kept
    log_event("batch", "batch of %d cohorts: %d downloaded, %d kept from an earlier run, "
              "%d failed", len(outcomes), downloaded, kept, failed, cohorts=len(outcomes),
              downloaded=downloaded, kept=kept, failed=failed)


# -- httpx's own lines for the library's requests ------------------------------------------

_LIBRARY_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "amp_cohorts_async_request", default=False)


@contextlib.contextmanager
def library_request() -> Iterator[None]:
    """Mark what runs inside as the library's own request, for the httpx filter."""
    token = _LIBRARY_REQUEST.set(True)
    try:
        yield
    finally:
        _LIBRARY_REQUEST.reset(token)


class _QuietHttpx(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not _LIBRARY_REQUEST.get():
            return True  # the user's own request through httpx: theirs to see
        # A level of the httpx logger's own is the user asking for its lines.
        return logging.getLogger("httpx").level != logging.NOTSET


_QUIET = _QuietHttpx(name="")


def install_httpx_quieting() -> None:
    """Attach the filter to httpx's logger (idempotent)."""
    httpx_logger = logging.getLogger("httpx")
    if _QUIET not in httpx_logger.filters:
        httpx_logger.addFilter(_QUIET)


# -- output ----------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in data:
                data[key] = _plain(value)
        if record.exc_info:
            data["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(data, default=str)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return redact(str(value))


def log_to_stream(level: int, stream: IO[str] | None = None, *, as_json: bool = False,
                  ) -> logging.Handler:
    """Send the library's lines at ``level`` and above to ``stream`` (stderr by default)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(HUMAN_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


_env_applied = False


def configure_from_env() -> None:
    """Apply ``AMP_COHORTS_LOG`` once per process (see the module docstring)."""
    global _env_applied
    if _env_applied:
        return
    _env_applied = True
    asked = os.environ.get(ENV_VAR, "").strip().lower()
    level = LEVELS.get(asked)
    if asked and level is None:  # a typo must not look like "no lines today"
        logger.warning("%s=%r is not one of %s: ignored", ENV_VAR, asked, ", ".join(LEVELS))
    if level is None or logger.handlers or logger.level != logging.NOTSET:
        return  # not asked, or the user configured the logger: theirs to decide
    if logging.getLogger().handlers:
        logger.setLevel(level)
    else:
        log_to_stream(level)
