"""download_cohorts: plan from the journal -> check the quota -> fan out, one outcome per id.

``fan_out`` and ``export_one`` are the batch machinery ``sync_cohorts`` shares: the order of
starts, one cohort's failure kept to itself, the export recorded in the directory's store.
"""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio

from ._api import Api
from ._background import single_error
from ._download import Downloader
from ._events import Progress, ProgressCallback
from ._exceptions import AmplitudeError, CohortJobError, NotFoundError, QuotaExceededError
from ._files import disk_error, remove_leftovers, safe_filename
from ._logs import log_batch
from ._models import CohortOutcome, CohortRequest, DownloadResult, ExportOptions
from ._scheduler import Scheduler
from ._store import DirectoryStore, journal_key, utc_now_iso

__all__ = ("download_cohorts", "export_one", "fan_out", "sizes_from_the_list")

T = TypeVar("T")

logger = logging.getLogger("amp_cohorts_async")


async def download_cohorts(
    api: Api,
    downloader: Downloader,
    scheduler: Scheduler,
    cohort_ids: Sequence[str],
    sizes: dict[str, int],
    directory: pathlib.Path,
    export: ExportOptions,
    on_progress: ProgressCallback | None,
    *,
    resume: bool,
) -> list[CohortOutcome]:
    """Arguments arrive validated; ``sizes`` (where known) order the largest exports first."""
    started = time.time()  # temp files last written before this are a dead run's
    store = DirectoryStore(directory)
    await store.check_writable()  # before anything is spent
    await remove_leftovers(directory, started)
    if resume:
        await store.load()
    unique = list(dict.fromkeys(cohort_ids))
    plan = await store.plan(unique, export, scheduler.wall_clock())
    if plan.fresh:
        await _check_quota(api, scheduler, len(plan.fresh))

    for cohort_id in unique:
        progress = Progress(on_progress, cohort_id)
        if cohort_id in plan.finished:
            size = plan.finished[cohort_id].size_bytes
            progress.emit("done", bytes_done=size, bytes_total=size)
        else:
            progress.emit("queued")

    observers: dict[str, Progress] = {}  # for what a failed export went through

    async def one(cohort_id: str) -> DownloadResult:
        progress = observers[cohort_id] = Progress(on_progress, cohort_id)
        return await export_one(downloader, store, scheduler, cohort_id, export, progress,
                                reusable=plan.reusable.get(cohort_id))

    pending = [c for c in unique if c not in plan.finished]
    if len(pending) > 1 and not sizes:
        sizes = await sizes_from_the_list(api)
    done = await fan_out(pending, sizes, one)
    results = {c: CohortOutcome(cohort_id=c, result=r) for c, r in plan.finished.items()}
    for cohort_id, value in done.items():
        results[cohort_id] = (CohortOutcome(cohort_id=cohort_id, error=value,
                                            **observers[cohort_id].tally())
                              if isinstance(value, AmplitudeError)
                              else CohortOutcome(cohort_id=cohort_id, result=value,
                                                 **observers[cohort_id].tally()))
    log_batch(list(results.values()), kept=len(plan.finished))
    return [results[c] for c in cohort_ids]


async def fan_out(
    cohort_ids: Sequence[str], sizes: dict[str, int], job: Callable[[str], Awaitable[T]]
) -> dict[str, T | AmplitudeError]:
    """Run ``job`` for every cohort at once (the scheduler paces them); one cohort's
    AmplitudeError (an OSError too, as a DiskError) is its own result and never cancels the
    others; anything else (a bug) is raised as itself, never as an exception group.

    Export time grows with cohort size: the largest start first (unknown sizes keep their
    order), so the long jobs overlap the rate-limit waits instead of trailing at the end.
    """
    results: dict[str, T | AmplitudeError] = {}

    async def run(cohort_id: str) -> None:
        try:
            results[cohort_id] = await job(cohort_id)
        except AmplitudeError as error:
            results[cohort_id] = error
        except OSError as error:  # a disk below the cohort's export: this cohort's failure
            results[cohort_id] = disk_error(error, None)

    order = sorted(cohort_ids, key=lambda c: -sizes.get(c, -1))  # stable
    try:
        async with anyio.create_task_group() as group:
            for cohort_id in order:
                group.start_soon(run, cohort_id)
    except BaseExceptionGroup as failure:  # a cancellation, or a bug: never a group
        raise single_error(failure) from None
    return results


async def sizes_from_the_list(api: Api) -> dict[str, int]:
    """Cohort sizes from one ``list_cohorts`` call (no quota), to order a batch given ids.

    Only an optimisation: if the list cannot be had, the batch keeps its input order.
    """
    try:
        cohorts = await api.list_cohorts(False)
    except AmplitudeError as error:
        logger.info("no cohort sizes to order the batch by (%s); keeping the input order",
                    error)
        return {}
    return {c.id: c.size for c in cohorts if c.size is not None}


async def _check_quota(api: Api, scheduler: Scheduler, needed: int) -> None:
    """Refuse the whole batch up front if its fresh exports would pass the monthly quota."""
    quota = scheduler.limits.monthly_quota
    if quota is None:
        return
    usage = await api.get_usage()
    allowed = min(quota, usage.limit)
    used = max(usage.usage, await scheduler.quota_used())
    if used + needed > allowed:
        raise QuotaExceededError(
            f"this batch needs {needed} cohort requests but only {max(0, allowed - used)} "
            f"of {allowed} remain this month; nothing was requested"
        )


async def export_one(
    downloader: Downloader,
    store: DirectoryStore,
    scheduler: Scheduler,
    cohort_id: str,
    export: ExportOptions,
    progress: Progress,
    *,
    reusable: CohortRequest | None = None,
    last_computed: str | None = None,
    on_new_request: Callable[[], None] | None = None,
) -> DownloadResult:
    """Export ``cohort_id`` to ``<directory>/<safe id>.csv``, or finish the ``reusable``
    request; the request is journaled the moment it is accepted, the file once it is in place.

    ``last_computed``: what the list showed before the request (a sync's; None otherwise).
    ``on_new_request`` is called for each cohort request accepted (quota spent).
    """
    key = journal_key(cohort_id, export)
    target = store.directory / safe_filename(cohort_id)

    async def record_request(request: CohortRequest) -> None:
        if on_new_request is not None:
            on_new_request()
        await store.update(
            key, cohort_id=cohort_id, request_id=request.request_id,
            requested_at=utc_now_iso(scheduler.wall_clock()),
            request_last_computed=last_computed,
        )  # the file fields still describe the copy in place until the new one replaces it

    async def attempt(request: CohortRequest | None) -> DownloadResult:
        return await downloader.download_cohort(
            cohort_id, target, export, progress, request=request, on_requested=record_request
        )

    # One export span for the cohort, a stale request and its fresh export included.
    with downloader.telemetry.export(cohort_id):
        try:
            result = await attempt(reusable)
        except (NotFoundError, CohortJobError) as error:
            if reusable is None:
                raise
            # The old export is gone, failed, or the journal named another cohort's (a
            # ForeignRequestError is a CohortJobError): pay for one fresh export.
            logger.warning("not reusing request %s for %s: %s", reusable.request_id,
                           cohort_id, error)
            result = await attempt(None)
    written = await anyio.Path(result.path).stat()
    await store.update(key, cohort_id=cohort_id, copy_request_id=result.request_id,
                       file=result.path.name, size_bytes=result.size_bytes,
                       sha256=result.sha256, members=result.members,
                       mtime_ns=written.st_mtime_ns, last_computed=last_computed)
    return result
