"""download_cohorts: plan from the journal -> check the quota -> fan out, one outcome per id."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence

import anyio

from ._api import Api
from ._download import Downloader
from ._events import Progress, ProgressCallback
from ._exceptions import AmplitudeError, CohortJobError, NotFoundError, QuotaExceededError
from ._files import safe_filename
from ._journal import Journal, Plan, journal_key, utc_now_iso
from ._models import CohortOutcome, CohortRequest, DownloadResult, ExportOptions
from ._scheduler import Scheduler

__all__ = ("download_cohorts",)

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
    journal = Journal(directory)
    if resume:
        await journal.load()
    unique = list(dict.fromkeys(cohort_ids))
    plan = await journal.plan(unique, export, scheduler.wall_clock())
    if plan.fresh:
        await _check_quota(api, scheduler, len(plan.fresh))

    results: dict[str, CohortOutcome] = {
        c: CohortOutcome(cohort_id=c, result=r) for c, r in plan.finished.items()
    }
    for cohort_id in unique:
        progress = Progress(on_progress, cohort_id)
        if cohort_id in plan.finished:
            size = plan.finished[cohort_id].size_bytes
            progress.emit("done", bytes_done=size, bytes_total=size)
        else:
            progress.emit("queued")

    async def one(cohort_id: str) -> None:
        try:
            result = await _download_one(downloader, journal, scheduler, plan, cohort_id,
                                         directory, export, Progress(on_progress, cohort_id))
            results[cohort_id] = CohortOutcome(cohort_id=cohort_id, result=result)
        except AmplitudeError as error:
            results[cohort_id] = CohortOutcome(cohort_id=cohort_id, error=error)

    # Export time grows with cohort size: when sizes are known, start the largest first so the
    # long jobs overlap the rate-limit waits instead of trailing at the end of the batch.
    if len(plan.fresh) + len(plan.reusable) > 1 and not sizes:
        sizes = await _sizes_from_the_list(api)
    order = sorted(unique, key=lambda c: -sizes.get(c, -1))  # stable: unknown sizes keep order
    async with anyio.create_task_group() as group:
        for cohort_id in order:
            if cohort_id not in plan.finished:
                group.start_soon(one, cohort_id)
    return [results[c] for c in cohort_ids]


async def _sizes_from_the_list(api: Api) -> dict[str, int]:
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


async def _download_one(
    downloader: Downloader,
    journal: Journal,
    scheduler: Scheduler,
    plan: Plan,
    cohort_id: str,
    directory: pathlib.Path,
    export: ExportOptions,
    progress: Progress,
) -> DownloadResult:
    key = journal_key(cohort_id, export)
    target = directory / safe_filename(cohort_id)

    async def record_request(request: CohortRequest) -> None:
        await journal.update(
            key, cohort_id=cohort_id, request_id=request.request_id,
            requested_at=utc_now_iso(scheduler.wall_clock()),
            file=None, sha256=None, size_bytes=None, members=None,
        )

    async def attempt(request: CohortRequest | None) -> DownloadResult:
        return await downloader.download_cohort(
            cohort_id, target, export, progress, request=request, on_requested=record_request
        )

    reusable = plan.reusable.get(cohort_id)
    try:
        result = await attempt(reusable)
    except (NotFoundError, CohortJobError) as error:
        if reusable is None:
            raise
        # The old export is gone, failed, or the journal named another cohort's (a
        # ForeignRequestError is a CohortJobError): pay for one fresh export.
        logger.warning("not reusing request %s for %s: %s", reusable.request_id, cohort_id,
                       error)
        result = await attempt(None)
    await journal.update(key, cohort_id=cohort_id, file=result.path.name,
                         size_bytes=result.size_bytes, sha256=result.sha256,
                         members=result.members)
    return result
