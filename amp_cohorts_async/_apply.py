"""apply_diff: a membership diff's files sent as REMOVE, then ADD, resumable after a failure.

The exiting members go first (REMOVE), then the entering ones (ADD), one operation per request
and at most ``max_ids_per_request`` ids each, read from the diff's files as they are sent, so
memory does not grow with the diff. The whole apply holds the cohort's write guard (this
process's lock and the limits backend's lease): no other write to that cohort overlaps it.

Progress is kept beside the diff's files (``.applied-<cohort>.json``), rewritten atomically
after each request that succeeded: a rerun with the same diff (the same files, unchanged)
starts where the last one stopped, so it sends only the rest; a crash between a request and
its record re-sends that one request, which is harmless (a second REMOVE or ADD of the same
ids changes nothing). Once every request succeeded, a rerun sends none.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs

from ._api import Api
from ._diff import MembershipDiff
from ._exceptions import AmplitudeError, InvalidRequestError, PartialWriteError
from ._files import safe_filename
from ._members import iter_member_batches
from ._models import (
    MembershipIdType,
    MembershipOutcome,
    MembershipResult,
    Operation,
    coerce_enum,
)
from ._send import SendCount
from ._upload import Uploader, membership_body

__all__ = ("ID_TYPE_OF_KEY", "apply_diff", "check_diff")


@attrs.define
class _Progress:
    """How many ids of each file were applied to the cohort, for this version of the diff."""

    path: pathlib.Path
    diff_files: list[list[int]]  # (size, mtime_ns) of the exiting and entering files
    removed: int = 0
    added: int = 0

    @classmethod
    def load(cls, directory: pathlib.Path, cohort_id: str, diff: MembershipDiff) -> _Progress:
        path = directory / f".applied-{safe_filename(cohort_id, '.json')}"
        files = []
        for file in (diff.exiting_path, diff.entering_path):
            try:
                stat = file.stat()
            except OSError as exc:
                raise InvalidRequestError(
                    f"the diff's file {file} cannot be read: {exc.strerror or exc}") from None
            files.append([stat.st_size, stat.st_mtime_ns])
        progress = cls(path, files)
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            recorded = json.loads(path.read_text("utf-8"))
            # Another diff in the same files (rewritten since) starts from nothing.
            if recorded["cohort_id"] == cohort_id and recorded["diff_files"] == files:
                progress.removed = int(recorded["removed"])
                progress.added = int(recorded["added"])
        return progress

    def save(self, cohort_id: str) -> None:
        """Rewritten through a fresh temp file and a rename: never half written."""
        temp = self.path.with_name(f"{self.path.name}.{secrets.token_hex(4)}.part")
        record = {"cohort_id": cohort_id, "diff_files": self.diff_files,
                  "removed": self.removed, "added": self.added}
        try:
            with open(temp, "x", encoding="utf-8") as file:
                json.dump(record, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.path)
        finally:
            temp.unlink(missing_ok=True)


async def _id_chunks(path: pathlib.Path, key: str, skip: int, size: int
                     ) -> AsyncIterator[list[str]]:
    """The ``key`` values of the file after the first ``skip``, ``size`` at a time."""
    chunk: list[str] = []
    batches = iter_member_batches(path)
    try:
        async for batch in batches:
            columns = list(batch.columns)
            index = len(columns) - 1 - columns[::-1].index(key)
            for row in batch.rows:
                if skip:
                    skip -= 1
                    continue
                chunk.append(row[index])
                if len(chunk) == size:
                    yield chunk
                    chunk = []
    finally:
        await batches.aclose()  # type: ignore[attr-defined]
    if chunk:
        yield chunk


# The id a key column holds, as a membership change names it: for the User count group BY_ID
# is the Amplitude id and BY_NAME the user id; for any other, the group id and the group name.
ID_TYPE_OF_KEY = {
    "amplitude_id": MembershipIdType.BY_ID,
    "user_id": MembershipIdType.BY_NAME,
    "group_id": MembershipIdType.BY_ID,
    "group_name": MembershipIdType.BY_NAME,
}


def check_diff(diff: Any, id_type: Any) -> MembershipIdType:
    """The diff is a MembershipDiff; the id type given, or the one its key implies."""
    if not isinstance(diff, MembershipDiff):
        raise InvalidRequestError(f"diff must be a MembershipDiff (from diff_members), "
                                  f"got {type(diff).__name__}")
    if id_type is not None:
        return coerce_enum(MembershipIdType, id_type, "id_type")
    if diff.key not in ID_TYPE_OF_KEY:
        raise InvalidRequestError(f"id_type is needed for a diff by {diff.key!r} (BY_ID or "
                                  f"BY_NAME)")
    return ID_TYPE_OF_KEY[diff.key]


async def apply_diff(
    api: Api,
    uploader: Uploader,
    cohort_id: str,
    diff: MembershipDiff,
    id_type: MembershipIdType,
    count_group: str | None,
) -> MembershipResult:
    limit = uploader.limits.max_ids_per_request
    directory = diff.entering_path.parent
    skipped: dict[Operation, list[str]] = {Operation.REMOVE: [], Operation.ADD: []}
    count = SendCount()  # every request sent, retries included
    api = api.counted(count)
    async with uploader.writing(cohort_id):
        progress = await anyio.to_thread.run_sync(_Progress.load, directory, cohort_id, diff)
        plan = ((Operation.REMOVE, diff.exiting_path, "removed"),
                (Operation.ADD, diff.entering_path, "added"))
        try:
            for operation, path, field in plan:
                async for ids in _id_chunks(path, diff.key, getattr(progress, field), limit):
                    body = membership_body(cohort_id, [(ids, id_type, operation)],
                                           count_group, True)
                    answer = await api.membership(body)
                    for outcome in answer.memberships_result:
                        skipped[operation].extend(outcome.skipped_ids)
                    setattr(progress, field, getattr(progress, field) + len(ids))
                    await anyio.to_thread.run_sync(progress.save, cohort_id)
        except AmplitudeError as error:
            raise await _partial(error, cohort_id, diff, progress, count.sent, limit) from error
    return MembershipResult(
        cohort_id=cohort_id,
        memberships_result=[
            MembershipOutcome(skipped_ids=skipped[operation], id_type=id_type,
                              operation=operation)
            for operation in (Operation.REMOVE, Operation.ADD)
        ],
        requests_sent=count.sent,
    )


async def _partial(error: AmplitudeError, cohort_id: str, diff: MembershipDiff,
                   progress: _Progress, requests: int, limit: int) -> AmplitudeError:
    """What was applied and what was not, as a PartialWriteError (the error itself when
    nothing of this diff had been applied to the cohort yet)."""
    if progress.removed == 0 and progress.added == 0:
        return error
    pending: list[list[str]] = []
    for path, done in ((diff.exiting_path, progress.removed),
                       (diff.entering_path, progress.added)):
        pending.append([i async for chunk in _id_chunks(path, diff.key, done, limit)
                        for i in chunk])
    total_chunks = -(-diff.exiting // limit) + -(-diff.entering // limit)
    applied_chunks = -(-progress.removed // limit) + -(-progress.added // limit)
    return PartialWriteError(
        f"apply_diff to cohort {cohort_id} stopped: {progress.removed:,} of {diff.exiting:,} "
        f"exiting members removed, {progress.added:,} of {diff.entering:,} entering members "
        f"added ({requests} requests this run); run apply_diff again with the same diff to "
        f"apply the rest: {error}",
        cohort_id=cohort_id, applied_chunks=applied_chunks, total_chunks=total_chunks,
        applied_ids=progress.removed + progress.added, pending_ids=pending,
    )
