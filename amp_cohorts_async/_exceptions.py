"""The one error tree of amp_cohorts_async.

```
AmplitudeError                      base of everything raised
├── InvalidRequestError (also ValueError)   bad input caught before any request is sent
├── TransportError                  connection / timeout failures after retries
├── APIStatusError                  .status_code .type .message .metadata .response
│   │                               (.message: the server's message as sent; str() adds
│   │                                the status and the request line)
│   ├── AuthenticationError         401 / 403
│   ├── NotFoundError               404
│   ├── RateLimitError              429  (.retry_after: float | None)
│   └── ServerError                 5xx
├── ResponseValidationError         a body that does not match the documented shape
├── QuotaExceededError              the monthly quota would be exceeded
├── CohortJobError                  export job failed or passed its deadline
├── DownloadError                   the file could not be fetched intact
│   └── DiskError                   the file could not be written here (.errno: ENOSPC...)
├── PartialWriteError               an upload/membership update stopped part-way (what was applied)
└── UncertainUploadError            an upload may have created a cohort; which, if any, is unknown
```

Errors are raised from ``_http.py`` (the HTTP boundary) and the workflow modules; no
``httpx`` or ``cattrs`` exception ever reaches a caller. The retry loop (``_send.py``) sets
``attempts`` on the error it gives up with, and ``str()`` says how many were made.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

__all__ = (
    "APIStatusError",
    "AmplitudeError",
    "AuthenticationError",
    "CohortJobError",
    "DiskError",
    "DownloadError",
    "InvalidRequestError",
    "NotFoundError",
    "PartialWriteError",
    "QuotaExceededError",
    "RateLimitError",
    "ResponseValidationError",
    "ServerError",
    "TransportError",
    "UncertainUploadError",
)


class AmplitudeError(Exception):
    """Base class of every error this library raises.

    ``attempts`` is how many attempts the request made before this error was raised (set by
    the retry loop; ``None`` when no request was retried).
    """

    attempts: int | None = None

    def describe(self) -> str:
        """The message without the attempt count."""
        return super().__str__()

    def __str__(self) -> str:
        text = self.describe()
        if self.attempts is not None and self.attempts > 1:
            text += f" (after {self.attempts} attempts)"
        return text


class InvalidRequestError(AmplitudeError, ValueError):
    """Bad input, caught before any request was sent."""


class TransportError(AmplitudeError):
    """The connection failed or timed out, after the retries allowed.

    ``never_sent`` is true when the failure came before a byte of the request left this
    machine (connection refused, pool timeout): the server cannot have acted on it.
    """

    def __init__(self, message: str, *, never_sent: bool = False, refused: bool = False,
                 unresolved: bool = False) -> None:
        super().__init__(message)
        self.never_sent = never_sent or refused or unresolved
        #: Nothing listens at that address (connection refused): retrying will not help.
        self.refused = refused
        #: The host name did not resolve (DNS): a typo or no network; said at once.
        self.unresolved = unresolved


class APIStatusError(AmplitudeError):
    """Amplitude (or S3) answered with an error status."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: str | None = None,
        metadata: Any = None,
        response: httpx.Response | None = None,
        request_line: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.metadata = metadata
        self.response = response
        #: ``"GET https://host/path"`` of the refused request, query string redacted.
        self.request_line = request_line

    def describe(self) -> str:
        kind = f" {self.type}" if self.type else ""
        where = f" ({self.request_line})" if self.request_line else ""
        return f"HTTP {self.status_code}{kind}: {self.message}{where}"


class AuthenticationError(APIStatusError):
    """401 or 403: the credentials were refused.

    ``hint`` says which host refused them and, for Amplitude's own hosts, that keys of the
    other region's projects are refused there; ``str()`` ends with it.
    """

    def __init__(self, message: str, *, hint: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.hint = hint

    def describe(self) -> str:
        text = super().describe()
        return f"{text}; {self.hint}" if self.hint else text


class NotFoundError(APIStatusError):
    """404: no such cohort, request id or file."""


class RateLimitError(APIStatusError):
    """429: a limit was hit. ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(APIStatusError):
    """5xx: the server failed."""


class ResponseValidationError(AmplitudeError):
    """A 2xx body that does not have the documented shape."""


class QuotaExceededError(AmplitudeError):
    """The monthly cohort-request quota would be exceeded."""


class CohortJobError(AmplitudeError):
    """An export job failed or passed its deadline."""


class DownloadError(AmplitudeError):
    """The cohort file could not be fetched intact."""


class DiskError(DownloadError):
    """The file could not be written where it was asked for: a full disk, a read-only or
    vanished directory, a quota. ``errno`` is the operating system's code (``errno.ENOSPC``...)
    and ``path`` the file or directory concerned. Nothing is left behind when it is raised."""

    def __init__(self, message: str, *, errno: int | None = None, path: str | None = None
                 ) -> None:
        super().__init__(message)
        self.errno = errno
        self.path = path


class PartialWriteError(AmplitudeError):
    """An upload or membership update failed part-way: some chunks were applied, some not.

    ``applied_chunks`` of ``total_chunks`` requests succeeded (``applied_ids`` ids);
    ``pending_ids`` lists, per input change (or the one upload), the ids not applied, so the
    caller can resume with exactly those. ``__cause__`` is the error that stopped it.
    """

    def __init__(
        self,
        message: str,
        *,
        cohort_id: str | None,
        applied_chunks: int,
        total_chunks: int,
        applied_ids: int,
        pending_ids: list[list[str]],
    ) -> None:
        super().__init__(message)
        self.cohort_id = cohort_id
        self.applied_chunks = applied_chunks
        self.total_chunks = total_chunks
        self.applied_ids = applied_ids
        self.pending_ids = pending_ids


class UncertainUploadError(AmplitudeError):
    """An upload that creates a cohort failed after Amplitude may have created it, and the
    cohort list could not settle whether it did.

    ``name``, ``owner`` and ``app_id`` are the upload's; ``since`` (aware, UTC) is when the
    first attempt Amplitude may have acted on began; ``candidates`` are the ids of the cohorts
    that match, when the list shows several. Look for the cohort before uploading again.
    """

    def __init__(
        self,
        reason: str,
        *,
        name: str,
        owner: str,
        app_id: int,
        since: datetime,
        candidates: list[str],
    ) -> None:
        super().__init__(
            f"the upload creating cohort {name!r} (owner {owner}, app {app_id}) failed after "
            f"Amplitude may have created it, at or after "
            f"{since.astimezone(UTC).isoformat(timespec='seconds')}; {reason}. Look for it "
            f"in list_cohorts() before uploading again"
        )
        self.name = name
        self.owner = owner
        self.app_id = app_id
        self.since = since
        self.candidates = candidates


# -- internal signals between the transfer and the retry loop (never reach a caller) ----------


class LinkExpiredError(DownloadError):
    """S3 refused the presigned URL (it lives one minute): ask /file for a fresh one at once."""


class IncompleteBodyError(TransportError):
    """The body ended before its length said it would; retried like a dropped connection."""
