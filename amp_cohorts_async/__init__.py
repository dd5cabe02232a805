"""amp_cohorts_async: an asyncio client for Amplitude's Behavioral Cohorts API."""

from ._arrow import iter_arrow_batches
from ._client import CohortsClient
from ._config import DownloadPolicy, Limits, PollPolicy, RateWindow, RetryPolicy
from ._diff import MembershipDiff, diff_members
from ._exceptions import (
    AmplitudeError,
    APIStatusError,
    AuthenticationError,
    CohortJobError,
    DiskError,
    DownloadError,
    InvalidRequestError,
    NotFoundError,
    PartialWriteError,
    QuotaExceededError,
    RateLimitError,
    ResponseValidationError,
    ServerError,
    TransportError,
    UncertainUploadError,
)
from ._file_limits import FileLimits
from ._limits import (
    InMemoryLimits,
    LimitsBackend,
    LimitsBackendError,
    Permit,
    PermitRequest,
    PermitWait,
    Settlement,
)
from ._members import MemberBatch, iter_member_batches, iter_members
from ._mirror import MirrorResult, mirror_cohort
from ._models import (
    Cohort,
    CohortOutcome,
    CohortRequest,
    DownloadResult,
    IdType,
    MembershipChange,
    MembershipIdType,
    MembershipOutcome,
    MembershipResult,
    Operation,
    ProgressEvent,
    RequestStatus,
    SyncEntry,
    SyncMetadata,
    SyncReport,
    UploadResult,
    Usage,
)

__all__ = (
    "APIStatusError",
    "AmplitudeError",
    "AuthenticationError",
    "Cohort",
    "CohortJobError",
    "CohortOutcome",
    "CohortRequest",
    "CohortsClient",
    "DiskError",
    "DownloadError",
    "DownloadPolicy",
    "DownloadResult",
    "FileLimits",
    "IdType",
    "InMemoryLimits",
    "InvalidRequestError",
    "Limits",
    "LimitsBackend",
    "LimitsBackendError",
    "MemberBatch",
    "MembershipChange",
    "MembershipDiff",
    "MembershipIdType",
    "MembershipOutcome",
    "MembershipResult",
    "MirrorResult",
    "NotFoundError",
    "Operation",
    "PartialWriteError",
    "Permit",
    "PermitRequest",
    "PermitWait",
    "PollPolicy",
    "ProgressEvent",
    "QuotaExceededError",
    "RateLimitError",
    "RateWindow",
    "RequestStatus",
    "ResponseValidationError",
    "RetryPolicy",
    "ServerError",
    "Settlement",
    "SyncEntry",
    "SyncMetadata",
    "SyncReport",
    "TransportError",
    "UncertainUploadError",
    "UploadResult",
    "Usage",
    "diff_members",
    "iter_arrow_batches",
    "iter_member_batches",
    "iter_members",
    "mirror_cohort",
)


def __getattr__(name: str) -> str:
    # A lazy __version__: no importlib.metadata work at import time.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("amp-cohorts-async")
        except PackageNotFoundError:
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
