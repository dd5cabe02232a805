"""upload_cohort and update_membership at any size, split at max_ids_per_request.

Everything is validated before the first request. Writes to one cohort run one at a time
(Amplitude answers 429 to concurrent writes to one cohort). A failure after some chunks were
applied raises PartialWriteError saying exactly what was and was not applied.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from ._convert import MembershipWire, UploadWire, structure
from ._exceptions import AmplitudeError, InvalidRequestError, PartialWriteError
from ._models import (
    IdType,
    MembershipChange,
    MembershipIdType,
    MembershipOutcome,
    MembershipResult,
    Operation,
    UploadResult,
    coerce_enum,
)
from ._scheduler import RequestKind
from ._validate import require_bool, require_text

if TYPE_CHECKING:
    from ._client import CohortsClient

__all__ = ("Uploader", "chunked", "collect_ids")

_ID_TYPE_FOR_MEMBERSHIP = {
    IdType.BY_AMP_ID: MembershipIdType.BY_ID,
    IdType.BY_USER_ID: MembershipIdType.BY_NAME,
}
_SAMPLE_LIMIT = 1000


def _check_id(value: Any, position: int) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(
            f"ids[{position}] must be a string, got {type(value).__name__} {value!r}"
        )
    if not value.strip():
        raise InvalidRequestError(f"ids[{position}] is an empty string")
    return value


def _dedupe(values: Iterable[Any], limit: int) -> tuple[list[str], int]:
    """Distinct ids in first-seen order, and how many duplicates were dropped.

    The checks run at C speed (``dict.fromkeys``, ``map``); only when one fails does a Python
    loop look for the first offending position, for the error message.
    """
    items = values if isinstance(values, list) else list(values)
    if not items:
        raise InvalidRequestError("ids must not be empty")
    try:
        distinct = set(items)  # a set is the cheapest way to learn types, blanks and duplicates
    except TypeError:  # an unhashable item: certainly not a string
        distinct = set()
    if (not distinct or set(map(type, distinct)) != {str}
            or min(map(len, map(str.strip, distinct))) == 0):
        for position, value in enumerate(items):
            _check_id(value, position)
    if len(distinct) > limit:
        raise InvalidRequestError(
            f"more than {limit:,} distinct ids (max_cohort_size); split the cohort"
        )
    if len(distinct) == len(items):
        return items, 0
    return list(dict.fromkeys(items)), len(items) - len(distinct)


async def collect_ids(
    ids: Iterable[str] | AsyncIterable[str], limit: int
) -> tuple[list[str], int]:
    """All ids, validated and de-duplicated in first-seen order, and how many duplicates."""
    if isinstance(ids, str | bytes):
        raise InvalidRequestError("ids must be an iterable of strings, not a single string")
    if isinstance(ids, AsyncIterable):
        gathered = [value async for value in ids]
        return _dedupe(gathered, limit)
    if not isinstance(ids, Iterable):
        raise InvalidRequestError(f"ids must be an iterable of strings, got {ids!r}")
    return _dedupe(ids, limit)


def chunked(values: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _optional_text(value: Any, name: str) -> str | None:
    return None if value is None else require_text(value, name)


class Uploader:
    def __init__(self, client: CohortsClient) -> None:
        self.client = client
        self.boundary = client._boundary
        self.pipeline = client._pipeline
        self.limits = client.limits

    def _cohort_lock(self, cohort_id: str) -> anyio.Lock:
        locks = self.client._cohort_locks
        if cohort_id not in locks:
            locks[cohort_id] = anyio.Lock()
        return locks[cohort_id]

    async def _post(self, path: str, body: dict[str, Any], what: str) -> Any:
        return await self.pipeline.call_json(
            RequestKind.OTHER,
            lambda: self.boundary.build("POST", path, json_body=body),
            what=what,
        )

    # -- upload -----------------------------------------------------------------------------
    async def upload_cohort(
        self,
        *,
        name: str,
        app_id: int,
        id_type: Any,
        ids: Iterable[str] | AsyncIterable[str],
        owner: str,
        published: bool,
        cg: str | None,
        skip_save: bool,
        skip_invalid_ids: bool,
        existing_cohort_id: str | None,
    ) -> UploadResult:
        """Upload ``ids``: the first chunk to /upload, the rest as membership ADDs.

        With ``skip_save=True`` nothing is saved: every chunk is sent to /upload with
        ``skip_save`` so Amplitude validates all ids, and the counts are summed.
        """
        require_text(name, "name")
        require_text(owner, "owner")
        if isinstance(app_id, bool) or not isinstance(app_id, int) or app_id <= 0:
            raise InvalidRequestError(f"app_id must be a positive int, got {app_id!r}")
        kind = coerce_enum(IdType, id_type, "id_type")
        require_bool(published, "published")
        require_bool(skip_save, "skip_save")
        require_bool(skip_invalid_ids, "skip_invalid_ids")
        cg = _optional_text(cg, "cg")
        existing_cohort_id = _optional_text(existing_cohort_id, "existing_cohort_id")
        self.client._check_open()
        unique, duplicates = await collect_ids(ids, self.limits.max_cohort_size)
        chunks = list(chunked(unique, self.limits.max_ids_per_request))

        def upload_body(chunk: Sequence[str]) -> dict[str, Any]:
            body: dict[str, Any] = {
                "name": name, "app_id": app_id, "id_type": kind.value, "ids": list(chunk),
                "owner": owner, "published": published, "skip_save": skip_save,
                "skip_invalid_ids": skip_invalid_ids,
            }
            if cg is not None:
                body["cg"] = cg
            if existing_cohort_id is not None:
                body["existing_cohort_id"] = existing_cohort_id
            return body

        matched = totals = applied_ids = 0
        invalid: list[str] = []
        cohort_id: str | None = existing_cohort_id
        applied = 0
        lock = self._cohort_lock(existing_cohort_id) if existing_cohort_id else None
        try:
            async with lock if lock is not None else contextlib.nullcontext():
                for index, chunk in enumerate(chunks):
                    if index == 0 or skip_save:
                        data = await self._post("/api/3/cohorts/upload", upload_body(chunk),
                                                "upload_cohort")
                        wire = structure(data, UploadWire, what="upload_cohort")
                        if index == 0:
                            cohort_id = wire.cohort_id
                        matched += wire.metadata.matched
                        totals += wire.metadata.totals
                        invalid.extend(wire.metadata.invalid_ids_sample)
                    else:
                        assert cohort_id is not None
                        body = self._membership_body(
                            cohort_id,
                            [(chunk, _ID_TYPE_FOR_MEMBERSHIP[kind], Operation.ADD)],
                            cg, skip_invalid_ids,
                        )
                        data = await self._post("/api/3/cohorts/membership", body,
                                                "update_membership")
                        wire_m = structure(data, MembershipWire, what="update_membership")
                        skipped = [s for r in wire_m.memberships_result for s in r.skipped_ids]
                        matched += len(chunk) - len(skipped)
                        totals += len(chunk)
                        invalid.extend(skipped)
                    applied += 1
                    applied_ids += len(chunk)
        except AmplitudeError as error:
            if applied == 0:
                raise
            pending = [id_ for chunk in chunks[applied:] for id_ in chunk]
            raise PartialWriteError(
                f"upload stopped after {applied} of {len(chunks)} chunks "
                f"({applied_ids:,} of {len(unique):,} ids applied to cohort {cohort_id}): {error}",
                cohort_id=cohort_id, applied_chunks=applied, total_chunks=len(chunks),
                applied_ids=applied_ids, pending_ids=[pending],
            ) from error
        assert cohort_id is not None
        return UploadResult(
            cohort_id=cohort_id, matched=matched, totals=totals,
            invalid_ids_sample=invalid[:_SAMPLE_LIMIT], duplicates_removed=duplicates,
            requests_sent=len(chunks),
        )

    @staticmethod
    def _membership_body(
        cohort_id: str,
        pieces: Sequence[tuple[Sequence[str], MembershipIdType, Operation]],
        count_group: str | None,
        skip_invalid_ids: bool,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "cohort_id": cohort_id,
            "memberships": [
                {"ids": list(ids), "id_type": id_type.value, "operation": operation.value}
                for ids, id_type, operation in pieces
            ],
            "skip_invalid_ids": skip_invalid_ids,
        }
        if count_group is not None:
            body["count_group"] = count_group
        return body

    # -- membership -------------------------------------------------------------------------
    async def update_membership(
        self,
        cohort_id: str,
        memberships: Sequence[MembershipChange],
        *,
        count_group: str | None,
        skip_invalid_ids: bool,
    ) -> MembershipResult:
        require_text(cohort_id, "cohort_id")
        count_group = _optional_text(count_group, "count_group")
        require_bool(skip_invalid_ids, "skip_invalid_ids")
        if isinstance(memberships, MembershipChange) or not isinstance(memberships, Sequence):
            raise InvalidRequestError("memberships must be a sequence of MembershipChange")
        if not memberships:
            raise InvalidRequestError("memberships must not be empty")
        changes: list[tuple[list[str], MembershipIdType, Operation]] = []
        for position, change in enumerate(memberships):
            if not isinstance(change, MembershipChange):
                raise InvalidRequestError(
                    f"memberships[{position}] must be a MembershipChange, got {change!r}"
                )
            try:
                unique, _dupes = _dedupe(change.ids, self.limits.max_cohort_size)
            except InvalidRequestError as error:
                raise InvalidRequestError(f"memberships[{position}]: {error}") from None
            changes.append((unique, change.id_type, change.operation))
        self.client._check_open()

        # Pack consecutive pieces into requests of at most max_ids_per_request ids, in order.
        limit = self.limits.max_ids_per_request
        requests: list[list[tuple[int, Sequence[str]]]] = [[]]
        room = limit
        for index, (ids, _kind, _op) in enumerate(changes):
            start = 0
            while start < len(ids):
                if room == 0:
                    requests.append([])
                    room = limit
                piece = ids[start : start + room]
                requests[-1].append((index, piece))
                room -= len(piece)
                start += len(piece)

        skipped: list[list[str]] = [[] for _ in changes]
        applied = applied_ids = 0
        try:
            async with self._cohort_lock(cohort_id):
                for request in requests:
                    body = self._membership_body(
                        cohort_id,
                        [(piece, changes[i][1], changes[i][2]) for i, piece in request],
                        count_group, skip_invalid_ids,
                    )
                    data = await self._post("/api/3/cohorts/membership", body,
                                            "update_membership")
                    wire = structure(data, MembershipWire, what="update_membership")
                    for (index, _piece), outcome in zip(
                        request, wire.memberships_result, strict=False
                    ):
                        skipped[index].extend(outcome.skipped_ids)
                    applied += 1
                    applied_ids += sum(len(piece) for _, piece in request)
        except AmplitudeError as error:
            if applied == 0:
                raise
            pending: list[list[str]] = [[] for _ in changes]
            for request in requests[applied:]:
                for index, unsent in request:
                    pending[index].extend(unsent)
            raise PartialWriteError(
                f"membership update stopped after {applied} of {len(requests)} requests "
                f"({applied_ids:,} ids applied to cohort {cohort_id}): {error}",
                cohort_id=cohort_id, applied_chunks=applied, total_chunks=len(requests),
                applied_ids=applied_ids, pending_ids=pending,
            ) from error
        return MembershipResult(
            cohort_id=cohort_id,
            memberships_result=[
                MembershipOutcome(skipped_ids=skipped[i], id_type=kind, operation=op)
                for i, (_ids, kind, op) in enumerate(changes)
            ],
            requests_sent=len(requests),
        )

