"""download_cohorts: fan out under the scheduler, one outcome per id, resumable by journal."""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Callable, Iterable, Sequence
from os import PathLike
from typing import TYPE_CHECKING

import anyio

from ._download import Downloader
from ._exceptions import AmplitudeError, InvalidRequestError, NotFoundError, QuotaExceededError
from ._files import safe_filename
from ._journal import Journal, journal_key, utc_now_iso
from ._models import Cohort, CohortOutcome, CohortRequest, DownloadResult, ProgressEvent
from ._validate import path_segment, text_sequence

if TYPE_CHECKING:
    from ._client import CohortsClient

__all__ = ("download_cohorts",)


def _sha256_of(path: pathlib.Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


async def download_cohorts(
    client: CohortsClient,
    cohort_ids: Iterable[str | Cohort],
    dest_dir: str | PathLike[str],
    *,
    props: bool,
    prop_keys: Sequence[str],
    on_progress: Callable[[ProgressEvent], None] | None,
    resume: bool,
) -> list[CohortOutcome]:
    if isinstance(cohort_ids, str):
        raise InvalidRequestError("cohort_ids must be an iterable of ids, not one string")
    items = list(cohort_ids)
    ids = [item.id if isinstance(item, Cohort) else item for item in items]
    for cohort_id in ids:
        path_segment(cohort_id, "cohort_id")
    # Export time grows with cohort size: when sizes are known, start the largest first so the
    # long jobs overlap the rate-limit waits instead of trailing at the end of the batch.
    sizes = {item.id: item.size for item in items
             if isinstance(item, Cohort) and item.size is not None}
    client._export_params(props, prop_keys)
    keys = text_sequence(prop_keys, "prop_keys")
    directory = pathlib.Path(dest_dir)
    if not await anyio.Path(directory).is_dir():
        raise InvalidRequestError(f"dest_dir must be an existing directory: {directory}")
    client._check_open()

    journal = Journal(directory)
    if resume:
        await journal.load()
    unique = list(dict.fromkeys(ids))
    downloader = Downloader(client, on_progress)
    finished: dict[str, DownloadResult] = {}
    reusable: dict[str, CohortRequest] = {}
    now = client._scheduler.wall_clock()
    for cohort_id in unique:
        entry = journal.entries.get(journal_key(cohort_id, props, keys))
        if entry is None:
            continue
        if not entry.request_is_fresh(now):
            continue  # older than the export's validity: this run makes a fresh export
        # Only the name this batch would write: a journal edited by hand cannot point outside.
        if entry.file == safe_filename(cohort_id) and entry.sha256 and entry.request_id:
            path = directory / entry.file
            if path.is_file() and await anyio.to_thread.run_sync(_sha256_of, path) == entry.sha256:
                finished[cohort_id] = DownloadResult(
                    cohort_id=cohort_id, request_id=entry.request_id, path=path,
                    size_bytes=path.stat().st_size, sha256=entry.sha256,
                )
                continue
        if entry.request_id:
            reusable[cohort_id] = CohortRequest(request_id=entry.request_id, cohort_id=cohort_id)

    needed = sum(1 for c in unique if c not in finished and c not in reusable)
    quota = client.limits.monthly_quota
    if quota is not None and needed:
        usage = await client.get_usage()
        allowed = min(quota, usage.limit)
        used = max(usage.usage, client._scheduler.quota_used())
        if used + needed > allowed:
            raise QuotaExceededError(
                f"this batch needs {needed} cohort requests but only {max(0, allowed - used)} "
                f"of {allowed} remain this month; nothing was requested"
            )

    results: dict[str, CohortOutcome] = {
        c: CohortOutcome(cohort_id=c, result=r) for c, r in finished.items()
    }
    for cohort_id in unique:
        if cohort_id in finished:
            downloader.emit(cohort_id, "done", bytes_done=finished[cohort_id].size_bytes,
                            bytes_total=finished[cohort_id].size_bytes)
        else:
            downloader.emit(cohort_id, "queued")

    async def one(cohort_id: str) -> None:
        key = journal_key(cohort_id, props, keys)
        target = directory / safe_filename(cohort_id)

        async def record_request(request: CohortRequest) -> None:
            await journal.update(
                key, cohort_id=cohort_id, request_id=request.request_id,
                requested_at=utc_now_iso(client._scheduler.wall_clock()),
                file=None, sha256=None, size_bytes=None,
            )

        async def attempt(request: CohortRequest | None) -> DownloadResult:
            return await downloader.download_cohort(
                cohort_id, target, props=props, prop_keys=keys,
                request=request, on_requested=record_request,
            )

        try:
            try:
                result = await attempt(reusable.get(cohort_id))
            except NotFoundError:
                if cohort_id not in reusable:
                    raise
                result = await attempt(None)  # the old export is gone; pay for a fresh one
            await journal.update(key, cohort_id=cohort_id, file=result.path.name,
                                 size_bytes=result.size_bytes, sha256=result.sha256)
            results[cohort_id] = CohortOutcome(cohort_id=cohort_id, result=result)
        except AmplitudeError as error:
            results[cohort_id] = CohortOutcome(cohort_id=cohort_id, error=error)

    order = sorted(unique, key=lambda c: -sizes.get(c, -1))  # stable: unknown sizes keep order
    async with anyio.create_task_group() as group:
        for cohort_id in order:
            if cohort_id not in finished:
                group.start_soon(one, cohort_id)
    return [results[c] for c in ids]
