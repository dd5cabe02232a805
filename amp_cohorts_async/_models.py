"""Typed, frozen models of what the API sends and what the workflows return."""

from __future__ import annotations

import enum
import pathlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

import attrs

from ._exceptions import AmplitudeError, InvalidRequestError

__all__ = (
    "Cohort",
    "CohortOutcome",
    "CohortRequest",
    "DownloadResult",
    "IdType",
    "MembershipChange",
    "MembershipIdType",
    "MembershipOutcome",
    "MembershipResult",
    "Operation",
    "Phase",
    "ProgressEvent",
    "RequestStatus",
    "SyncAction",
    "SyncEntry",
    "SyncMetadata",
    "SyncReport",
    "UploadResult",
    "Usage",
)


E = TypeVar("E", bound=enum.StrEnum)


class IdType(enum.StrEnum):
    """The kind of ids sent to ``upload_cohort``."""

    BY_AMP_ID = "BY_AMP_ID"
    BY_USER_ID = "BY_USER_ID"


class MembershipIdType(enum.StrEnum):
    """The kind of ids in a membership change (``BY_ID`` = Amplitude/group id)."""

    BY_ID = "BY_ID"
    BY_NAME = "BY_NAME"


class Operation(enum.StrEnum):
    """What a membership change does to the cohort."""

    ADD = "ADD"
    REMOVE = "REMOVE"


def coerce_enum(kind: type[E], value: object, what: str) -> E:
    """``kind(value)``, raising InvalidRequestError that lists the valid values."""
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return kind(value)
    except ValueError:
        valid = ", ".join(member.value for member in kind)
        raise InvalidRequestError(f"{what} must be one of {valid}; got {value!r}") from None


def _wire(name: str) -> dict[str, str]:
    return {"wire": name}


@attrs.frozen(kw_only=True)
class SyncMetadata:
    """Where a cohort is synced to (``list_cohorts(include_sync_info=True)``)."""

    target: str | None = None
    frequency: str | None = None
    last_successful: datetime | None = None
    last_failure: datetime | None = None
    params: dict[str, Any] | None = None


@attrs.frozen(kw_only=True)
class Cohort:
    """One cohort as ``list_cohorts`` returns it. Unknown fields are ignored."""

    id: str
    name: str | None = None
    app_id: int | None = attrs.field(default=None, metadata=_wire("appId"))
    archived: bool | None = None
    definition: dict[str, Any] | None = None
    description: str | None = None
    finished: bool | None = None
    owners: list[str] | None = None
    viewers: list[str] | None = None
    published: bool | None = None
    size: int | None = None
    type: str | None = None
    last_mod: datetime | None = attrs.field(default=None, metadata=_wire("lastMod"))
    created_at: datetime | None = attrs.field(default=None, metadata=_wire("createdAt"))
    last_computed: datetime | None = attrs.field(default=None, metadata=_wire("lastComputed"))
    hidden: bool | None = None
    metadata: Any = None
    view_count: int | None = None
    popularity: float | None = None
    last_viewed: datetime | None = None
    chart_id: str | None = None
    edit_id: str | None = None
    is_predictive: bool | None = None
    is_official_content: bool | None = None
    location_id: str | None = None
    shortcut_ids: list[str] | None = None
    sync_metadata: list[SyncMetadata] = attrs.field(
        factory=list, metadata=_wire("syncMetadata")
    )


@attrs.frozen(kw_only=True)
class CohortRequest:
    """The handle of an export job started by ``request_cohort``."""

    request_id: str
    cohort_id: str | None = None


@attrs.frozen(kw_only=True)
class RequestStatus:
    """An export job's state; ``done`` once its file can be fetched."""

    request_id: str
    cohort_id: str | None = None
    async_status: str | None = None
    done: bool = False


@attrs.frozen(kw_only=True)
class DownloadResult:
    """A cohort file in place: where, how big, its sha256, and how many members it holds.

    ``members`` is counted as the file was written (rows after the header) when the client's
    ``DownloadPolicy(count_members=True)`` asks for it; ``None`` otherwise, and when the file
    was not written by this call (kept from an earlier batch).

    What the export went through, for a caller to report without telemetry: ``attempts``,
    the tries of all its requests (the cohort request, each status poll, the file; a try of
    the file includes the S3 transfer it leads to), ``retries`` how many of those were
    retries, and ``waited`` the seconds spent held, by reason: ``"limits"`` (the rate
    windows, the concurrency limit), ``"amplitude"`` (the pause after a 429) and ``"retry"``
    (backoff before a retry). All zero and empty when this call made no request (a file
    kept from an earlier batch).
    """

    cohort_id: str | None
    request_id: str
    path: pathlib.Path
    size_bytes: int
    sha256: str
    members: int | None = None
    attempts: int = 0
    retries: int = 0
    waited: Mapping[str, float] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class CohortOutcome:
    """One cohort's fate in ``download_cohorts``: exactly one of result / error is set.

    ``attempts``, ``retries`` and ``waited`` say what this call's export of the cohort went
    through (as on ``DownloadResult``), for a failed one too; zero and empty when the call
    made no request for it (a file kept from an earlier batch).
    """

    cohort_id: str
    result: DownloadResult | None = None
    error: AmplitudeError | None = None
    attempts: int = 0
    retries: int = 0
    waited: Mapping[str, float] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


@attrs.frozen(kw_only=True)
class Usage:
    """This month's cohort requests: ``usage`` of ``limit`` spent, ``remaining`` left until
    ``resets_at``."""

    limit: int
    usage: int
    resets_at: datetime
    remaining: int


@attrs.frozen(kw_only=True)
class UploadResult:
    """An upload, summed over the requests it was split into."""

    cohort_id: str
    matched: int
    totals: int
    invalid_ids_sample: list[str]
    duplicates_removed: int = 0
    requests_sent: int = 1


def _ids_sequence(value: Any) -> Sequence[str]:
    if isinstance(value, str | bytes):
        raise InvalidRequestError("ids must be a sequence of strings, not a single string")
    if not isinstance(value, Sequence):
        try:
            return tuple(value)
        except TypeError:
            raise InvalidRequestError(f"ids must be a sequence of strings; got {value!r}") from None
    return value


def _membership_id_type(value: object) -> MembershipIdType:
    return coerce_enum(MembershipIdType, value, "id_type")


def _operation(value: object) -> Operation:
    return coerce_enum(Operation, value, "operation")


@attrs.frozen(kw_only=True)
class MembershipChange:
    """Add or remove ``ids`` (of ``id_type``) in a cohort."""

    ids: Sequence[str] = attrs.field(converter=_ids_sequence)
    id_type: MembershipIdType = attrs.field(converter=_membership_id_type)
    operation: Operation = attrs.field(converter=_operation)


@attrs.frozen(kw_only=True)
class MembershipOutcome:
    """One input change's result: the ids Amplitude skipped (unknown or invalid)."""

    skipped_ids: list[str]
    id_type: MembershipIdType | str
    operation: Operation | str


@attrs.frozen(kw_only=True)
class MembershipResult:
    """``update_membership``'s result: one outcome per input change, in input order."""

    cohort_id: str
    memberships_result: list[MembershipOutcome]
    requests_sent: int = 1


@attrs.frozen
class ExportOptions:
    """What an export includes (validated by ``_validate.export_options``); internal."""

    props: bool = False
    prop_keys: tuple[str, ...] = ()

    def query(self) -> list[tuple[str, str]]:
        params = [("props", "1")] if self.props else []
        params.extend(("propKeys", key) for key in self.prop_keys)
        return params


Phase = Literal["queued", "requested", "polling", "waiting", "downloading", "done", "failed"]


@attrs.frozen(kw_only=True)
class ProgressEvent:
    """Where one cohort of a download stands; passed to ``on_progress``.

    ``phase``: ``queued``, ``requested`` (an export exists), ``polling``, ``waiting`` (held),
    ``downloading``, ``done`` or ``failed``. ``bytes_done`` / ``bytes_total`` count the file
    as it arrives (``bytes_total`` is None when unknown). For a wait, ``wait_seconds`` is the
    time left when the event was emitted (a long wait emits again as it runs down) and
    ``wait_reason`` says why: ``"limits"`` (the rate windows or the concurrency limit),
    ``"amplitude"`` (Amplitude answered 429 and asked everyone to wait) or ``"retry"`` (a
    backoff before retrying a failed request). ``error``: on ``failed``, the error the cohort's
    outcome will carry, so a display can say why at once.
    """

    cohort_id: str
    phase: Phase
    bytes_done: int = 0
    bytes_total: int | None = None
    wait_seconds: float | None = None
    wait_reason: str | None = None
    error: AmplitudeError | None = None


SyncAction = Literal["unchanged", "too_large", "missing", "downloaded", "over_budget",
                     "planned", "failed"]


@attrs.frozen(kw_only=True)
class SyncEntry:
    """What ``sync_cohorts`` did with one cohort.

    ``action``: ``unchanged`` (the copy in place was exported at the ``last_computed`` the
    list shows now), ``too_large``, ``missing`` (not in the list), ``downloaded``,
    ``over_budget`` (it needed a cohort request the budget had no room for), ``planned`` (a
    dry run would request it) or ``failed`` (``error`` says why). ``last_computed`` is the
    list's; ``path`` the current verified copy after the run, whatever the action (None when
    there is none); ``previous_path`` the version this run's download replaced;
    ``result`` the download (``downloaded``) or the copy found in place (``unchanged``).
    ``attempts``, ``retries`` and ``waited`` say what this run's export went through (as on
    ``DownloadResult``), for ``downloaded`` and ``failed`` entries alike; zero and empty when
    the run made no request for the cohort.
    """

    cohort_id: str
    action: SyncAction
    last_computed: datetime | None = None
    path: pathlib.Path | None = None
    previous_path: pathlib.Path | None = None
    result: DownloadResult | None = None
    error: AmplitudeError | None = None
    attempts: int = 0
    retries: int = 0
    waited: Mapping[str, float] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class SyncReport:
    """A sync run: one entry per input cohort (input order), the cohort requests it spent,
    and the month's quota left after it (None with ``Limits(monthly_quota=None)``)."""

    entries: list[SyncEntry]
    requests_spent: int
    quota_remaining: int | None

    def count(self, action: SyncAction) -> int:
        """How many entries have ``action``."""
        return sum(1 for entry in self.entries if entry.action == action)
