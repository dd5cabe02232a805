"""upload_cohort and update_membership at any size, split at max_ids_per_request.

Everything is validated before the first request. Writes to one cohort run one at a time
(Amplitude answers 429 to concurrent writes to one cohort). A failure after some chunks were
applied raises PartialWriteError saying exactly what was and was not applied.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio
import attrs

from ._api import Api
from ._config import Limits
from ._create import create_by_upload
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
from ._send import SendCount
from ._validate import require_bool, require_encodable_each, require_id, require_text

__all__ = ("Uploader", "collect_ids", "membership_body", "pack")

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
    require_encodable_each(items, "ids")
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


def _optional_text(value: Any, name: str) -> str | None:
    return None if value is None else require_text(value, name)


@attrs.frozen
class Chunk:
    """One request's ids: pieces of the input changes, as (change index, ids), in order."""

    pieces: list[tuple[int, Sequence[str]]]

    @property
    def size(self) -> int:
        return sum(len(ids) for _, ids in self.pieces)


def pack(changes: Sequence[Sequence[str]], limit: int) -> list[Chunk]:
    """Consecutive pieces of ``changes`` packed into chunks of at most ``limit`` ids, in order."""
    chunks = [Chunk([])]
    room = limit
    for index, ids in enumerate(changes):
        start = 0
        while start < len(ids):
            if room == 0:
                chunks.append(Chunk([]))
                room = limit
            piece = ids[start : start + room]
            chunks[-1].pieces.append((index, piece))
            room -= len(piece)
            start += len(piece)
    return chunks


async def _apply_in_order(
    chunks: Sequence[Chunk],
    send: Callable[[Chunk], Awaitable[None]],
    *,
    lock: contextlib.AbstractAsyncContextManager[None] | None,
    changes: int,
    what: str,
    cohort_id: Callable[[], str | None],
) -> None:
    """Send ``chunks`` one after another under ``lock``; a failure after the first applied
    chunk is a PartialWriteError saying what was applied and what is pending, per change."""
    applied = applied_ids = 0
    try:
        async with lock if lock is not None else contextlib.nullcontext():
            for chunk in chunks:
                await send(chunk)
                applied += 1
                applied_ids += chunk.size
    except AmplitudeError as error:
        if applied == 0:
            raise
        pending: list[list[str]] = [[] for _ in range(changes)]
        for chunk in chunks[applied:]:
            for index, ids in chunk.pieces:
                pending[index].extend(ids)
        total_ids = applied_ids + sum(map(len, pending))
        raise PartialWriteError(
            f"{what} stopped after {applied} of {len(chunks)} requests "
            f"({applied_ids:,} of {total_ids:,} ids applied to cohort {cohort_id()}): {error}",
            cohort_id=cohort_id(), applied_chunks=applied, total_chunks=len(chunks),
            applied_ids=applied_ids, pending_ids=pending,
        ) from error


def membership_body(
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


WriteLease = Callable[[str], contextlib.AbstractAsyncContextManager[None]]


class Uploader:
    """Uploads and membership changes through the endpoint layer; one writer per cohort.

    ``write_lease(cohort_id)`` is the limits backend's lease on writes to a cohort, so that
    processes and hosts sharing the backend never write to one cohort at once.
    """

    def __init__(self, api: Api, limits: Limits, write_lease: WriteLease) -> None:
        self.api = api
        self.limits = limits
        self._write_lease = write_lease
        # One lock per cohort being written: Amplitude refuses concurrent writes to one cohort.
        self._locks: dict[str, anyio.Lock] = {}

    @contextlib.asynccontextmanager
    async def writing(self, cohort_id: str) -> AsyncIterator[None]:
        """The right to write to ``cohort_id``: this process's lock, then the backend's lease
        (so a process asks the backend for one lease per cohort at a time)."""
        if cohort_id not in self._locks:
            self._locks[cohort_id] = anyio.Lock()
        async with self._locks[cohort_id], self._write_lease(cohort_id):
            yield

    # -- upload -----------------------------------------------------------------------------
    async def upload_cohort(
        self,
        *,
        name: Any,
        app_id: Any,
        id_type: Any,
        ids: Any,
        owner: Any,
        published: Any,
        cg: Any,
        skip_save: Any,
        skip_invalid_ids: Any,
        existing_cohort_id: Any,
        check_open: Callable[[], None],
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
        if existing_cohort_id is not None:
            existing_cohort_id = require_id(existing_cohort_id, "existing_cohort_id")
        check_open()
        unique, duplicates = await collect_ids(ids, self.limits.max_cohort_size)
        chunks = pack([unique], self.limits.max_ids_per_request)

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

        count = SendCount()
        api = self.api.counted(count)
        creating = existing_cohort_id is None and not skip_save
        cohort_id: str | None = None  # known once the first /upload answers
        matched = totals = 0
        invalid: list[str] = []

        async def add_members(ids: Sequence[str]) -> None:
            """ADD ``ids`` to the cohort: the same when sent twice, so retried as any request."""
            nonlocal matched, totals
            assert cohort_id is not None
            body = membership_body(
                cohort_id, [(ids, _ID_TYPE_FOR_MEMBERSHIP[kind], Operation.ADD)],
                cg, skip_invalid_ids,
            )
            membership = await api.membership(body)
            skipped = [s for r in membership.memberships_result for s in r.skipped_ids]
            matched += len(ids) - len(skipped)
            totals += len(ids)
            invalid.extend(skipped)

        async def adopt(ids: Sequence[str]) -> None:
            """The lost upload made the cohort with ``ids``: ADD them again to learn which
            matched. If that fails, the cohort exists all the same: a partial write."""
            try:
                await add_members(ids)
            except AmplitudeError as error:
                rest = [i for chunk in chunks[1:] for _, piece in chunk.pieces for i in piece]
                raise PartialWriteError(
                    f"upload created cohort {cohort_id} (its answer was lost), but the ADD "
                    f"that counts its first {len(ids):,} ids failed: {error}",
                    cohort_id=cohort_id, applied_chunks=1, total_chunks=len(chunks),
                    applied_ids=len(ids), pending_ids=[rest],
                ) from error

        async def send(chunk: Chunk) -> None:
            nonlocal cohort_id, matched, totals
            ((_, ids),) = chunk.pieces
            if cohort_id is not None and not skip_save:
                await add_members(ids)
                return
            if creating:  # the first chunk makes the cohort: never twice (see _create.py)
                created = await create_by_upload(api, upload_body(ids))
                cohort_id = created.cohort_id
                if created.answer is None:
                    await adopt(ids)
                    return
                wire = created.answer
            else:  # replacing a cohort's members or validating only: the same if sent twice
                wire = await api.upload(upload_body(ids))
                cohort_id = cohort_id or wire.cohort_id
            matched += wire.metadata.matched
            totals += wire.metadata.totals
            invalid.extend(wire.metadata.invalid_ids_sample)

        await _apply_in_order(
            chunks, send,
            lock=self.writing(existing_cohort_id) if existing_cohort_id else None,
            changes=1, what="upload", cohort_id=lambda: cohort_id or existing_cohort_id,
        )
        assert cohort_id is not None
        return UploadResult(
            cohort_id=cohort_id, matched=matched, totals=totals,
            invalid_ids_sample=invalid[:_SAMPLE_LIMIT], duplicates_removed=duplicates,
            requests_sent=count.sent,
        )

    # -- membership -------------------------------------------------------------------------
    async def update_membership(
        self,
        cohort_id: Any,
        memberships: Any,
        *,
        count_group: Any,
        skip_invalid_ids: Any,
        check_open: Callable[[], None],
    ) -> MembershipResult:
        require_id(cohort_id, "cohort_id")
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
        check_open()

        count = SendCount()
        api = self.api.counted(count)
        chunks = pack([ids for ids, _, _ in changes], self.limits.max_ids_per_request)
        skipped: list[list[str]] = [[] for _ in changes]

        async def send(chunk: Chunk) -> None:
            body = membership_body(
                cohort_id,
                [(piece, changes[i][1], changes[i][2]) for i, piece in chunk.pieces],
                count_group, skip_invalid_ids,
            )
            wire = await api.membership(body)  # ADD and REMOVE: the same if sent twice
            for (index, _piece), outcome in zip(chunk.pieces, wire.memberships_result,
                                                strict=False):
                skipped[index].extend(outcome.skipped_ids)

        await _apply_in_order(
            chunks, send, lock=self.writing(cohort_id), changes=len(changes),
            what="membership update", cohort_id=lambda: cohort_id,
        )
        return MembershipResult(
            cohort_id=cohort_id,
            memberships_result=[
                MembershipOutcome(skipped_ids=skipped[i], id_type=kind, operation=op)
                for i, (_ids, kind, op) in enumerate(changes)
            ],
            requests_sent=count.sent,
        )
