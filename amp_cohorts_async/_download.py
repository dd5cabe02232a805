"""One cohort's export: request -> poll until the job is done -> the transfer."""

from __future__ import annotations

import pathlib
import random
import re
from collections.abc import Awaitable, Callable

import anyio
import attrs

from ._api import Api
from ._config import DownloadPolicy, PollPolicy
from ._events import Progress
from ._exceptions import AmplitudeError, CohortJobError
from ._models import CohortRequest, DownloadResult, ExportOptions
from ._scheduler import Scheduler
from ._telemetry import Telemetry
from ._transfer import fetch_file

__all__ = ("Downloader", "ForeignRequestError")

class ForeignRequestError(CohortJobError):
    """The export request belongs to another cohort (a planted or stale journal entry)."""


_FAILED_STATES = re.compile(r"FAIL|ERROR|CANCEL|ABORT", re.IGNORECASE)


class Downloader:
    """Chains request -> poll -> fetch for one cohort, with progress events."""

    def __init__(
        self, api: Api, scheduler: Scheduler, poll: PollPolicy, download: DownloadPolicy,
        rng: random.Random,
    ) -> None:
        self.api = api
        self.scheduler = scheduler
        self.poll = poll
        self.download = download
        self.rng = rng

    @property
    def telemetry(self) -> Telemetry:
        return self.api.sender.telemetry

    async def download_cohort(
        self,
        cohort_id: str,
        target: pathlib.Path,
        export: ExportOptions,
        progress: Progress,
        *,
        request: CohortRequest | None = None,
        on_requested: Callable[[CohortRequest], Awaitable[None]] | None = None,
    ) -> DownloadResult:
        """Export ``cohort_id`` to ``target`` (or finish the export ``request`` made earlier)."""
        api = self.api.observed(progress)
        telemetry = self.telemetry
        jobs = self.scheduler.jobs
        reused = request is not None
        progress.started()
        try:
            if jobs is not None:
                await jobs.acquire()
            try:
                if request is None:
                    with telemetry.phase("request"):
                        request = await api.request_cohort(cohort_id, export)
                    if on_requested is not None:
                        # Amplitude accepted it: it is recorded even if the caller is being
                        # cancelled, so that a resume reuses it instead of paying again.
                        with anyio.CancelScope(shield=True):
                            await on_requested(request)
                telemetry.note("amplitude.cohort.request_id", request.request_id)
                progress.requested(request.request_id, reused=reused)
                with telemetry.phase("poll"):
                    await self.wait_for_job(api, request.request_id, cohort_id, progress,
                                            reused=reused)
                progress.ready()
                with telemetry.phase("download"):
                    result = await fetch_file(api, self.download, request.request_id, target,
                                              progress)
            finally:
                if jobs is not None:
                    jobs.release()
        except BaseException as error:
            if not isinstance(error, anyio.get_cancelled_exc_class()):
                # A cancelled download did not fail: it was stopped.
                progress.failed(error)
            raise
        return _reported(result, progress)

    async def wait_for_job(
        self, api: Api, request_id: str, cohort_id: str, progress: Progress, *, reused: bool
    ) -> None:
        """Poll until the export job is done, with growing, jittered intervals.

        A status that names another cohort is refused. A ``reused`` request id (from a journal,
        which is only a file on disk) is trusted only when the status names ``cohort_id``.
        """
        policy = self.poll
        started = anyio.current_time()
        deadline = None if policy.deadline is None else started + policy.deadline
        interval = policy.initial_interval
        while True:
            wait = interval
            if policy.idle_interval is not None and self.scheduler.idle():
                wait = min(wait, policy.idle_interval)  # nothing queued: a poll is free now
            delay = wait * self.rng.uniform(1 - policy.jitter, 1 + policy.jitter)
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - anyio.current_time()))
            await anyio.sleep(delay)
            progress.polled()
            status = await api.get_request_status(request_id)
            if status.cohort_id != cohort_id and (status.cohort_id is not None or reused):
                raise ForeignRequestError(
                    f"request {request_id} is an export of cohort {status.cohort_id!r}, "
                    f"not of {cohort_id!r}"
                )
            if status.done:
                return
            if status.async_status and _FAILED_STATES.search(status.async_status):
                raise CohortJobError(f"export job {request_id} failed: {status.async_status}")
            if deadline is not None and anyio.current_time() >= deadline:
                raise CohortJobError(
                    f"export job {request_id} not finished after {policy.deadline:g}s "
                    f"(last status {status.async_status!r})"
                )
            interval = min(policy.max_interval, interval * policy.multiplier)

    async def download_file(self, request_id: str, target: pathlib.Path) -> DownloadResult:
        """The file of an export request made earlier (by anyone) to ``target``."""
        progress = Progress(None, self.api.cohort_of(request_id))
        progress.started()
        progress.request_id = request_id
        try:
            result = await fetch_file(self.api.observed(progress), self.download, request_id,
                                      target, progress)
        except AmplitudeError as error:
            progress.failed(error)
            raise
        return _reported(result, progress)


def _reported(result: DownloadResult, progress: Progress) -> DownloadResult:
    """``result`` with what its export went through; the "downloaded" line and event."""
    result = attrs.evolve(result, **progress.tally())
    progress.downloaded(result)
    return result
