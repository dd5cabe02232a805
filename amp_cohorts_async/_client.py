"""CohortsClient: lifecycle, argument checks, and the public coroutines.

Every public coroutine validates its arguments here, once, and delegates down: to the
endpoint layer (``_api.py``), the download workflow (``_download.py``, ``_batch.py``) or the
uploader (``_upload.py``). Nothing below this module knows the client.
"""

from __future__ import annotations

import enum
import hashlib
import os
import pathlib
import random
import time
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from os import PathLike
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import attrs

from ._api import Api
from ._apply import apply_diff, check_diff
from ._batch import download_cohorts
from ._config import DownloadPolicy, Limits, PollPolicy, RetryPolicy, resolve_base_url
from ._diff import MembershipDiff
from ._download import Downloader
from ._events import Progress, ProgressCallback
from ._exceptions import InvalidRequestError, NotFoundError
from ._files import make_directory, remove_leftovers, resolve_target
from ._http import Credentials, HttpBoundary, http_client_for
from ._limits import LimitsBackend
from ._logs import configure_from_env
from ._models import (
    Cohort,
    CohortOutcome,
    CohortRequest,
    DownloadResult,
    MembershipChange,
    MembershipIdType,
    MembershipResult,
    RequestStatus,
    SyncEntry,
    SyncReport,
    UploadResult,
    Usage,
)
from ._scheduler import Scheduler
from ._send import Sender
from ._sync import sync_cohorts
from ._telemetry import telemetry_for
from ._upload import Uploader
from ._validate import (
    export_options,
    require_bool,
    require_id,
    require_key,
    require_text,
    text_path,
)

if TYPE_CHECKING:  # annotations of the public signature only; httpx is used by _http.py
    import httpx
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = ("CohortsClient",)


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


def _credential(value: str | None, env: str, name: str) -> str:
    if value is None:
        value = os.environ.get(env)
    if value is None:
        raise InvalidRequestError(f"{name} is required (pass it or set {env})")
    return require_key(value, name)


def _progress_callback(value: Any) -> ProgressCallback | None:
    if value is not None and not callable(value):
        raise InvalidRequestError(f"on_progress must be a callable or None, got {value!r}")
    return value  # type: ignore[no-any-return]


def _cohort_items(
    value: Any,
) -> tuple[list[str], dict[str, int], dict[str, InvalidRequestError]]:
    """Ids, the sizes that ``Cohort`` items carry, and the ids refused, each with its reason.

    An item that is not text (or a ``Cohort``) refuses the whole call; text that is not a valid
    id (blank, too long, not encodable...) fails that cohort only, so one bad line in a list
    of ids never costs the batch the others.
    """
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidRequestError(
            f"cohort_ids must be an iterable of ids or Cohort objects, got {type(value).__name__}"
        )
    ids: list[str] = []
    sizes: dict[str, int] = {}
    refused: dict[str, InvalidRequestError] = {}
    for position, item in enumerate(value):
        cohort_id, name = (item.id, f"cohort_ids[{position}].id") if isinstance(
            item, Cohort) else (item, f"cohort_ids[{position}]")
        if not isinstance(cohort_id, str):
            require_id(cohort_id, name)  # raises: not text at all
        try:
            require_id(cohort_id, name)
        except InvalidRequestError as error:
            refused[cohort_id] = error
        if isinstance(item, Cohort) and item.size is not None:
            sizes[cohort_id] = item.size
        ids.append(cohort_id)
    return ids, sizes, refused


class CohortsClient:
    """Async client for Amplitude's Behavioral Cohorts API.

    Every request obeys ``limits`` (5 concurrent, exact cohort-request windows, monthly quota),
    retries as ``retry`` says and polls export jobs as ``poll`` says. Use it as an async
    context manager, or call ``aclose()``.

    Parameters:
        api_key, secret_key: the project's keys; default: env ``AMPLITUDE_API_KEY`` /
            ``AMPLITUDE_SECRET_KEY``. Never shown in ``repr``, errors or logs.
        region: ``"us"`` (https://amplitude.com) or ``"eu"``
            (https://analytics.eu.amplitude.com).
        base_url: another origin (a proxy, the emulator); default: env ``AMPLITUDE_BASE_URL``,
            else the region's. Plain ``http://`` only for loopback hosts; a path in it is kept
            as a prefix.
        limits: Amplitude's limits to obey (``Limits()``: the documented ones).
        retry: how 429s, 5xx and connection failures are retried (``RetryPolicy()``).
        poll: how export jobs are polled and how long one may take (``PollPolicy()``).
        http_client: an ``httpx.AsyncClient`` to borrow (never closed by us). Its ``auth``,
            default headers and cookies are not sent: requests carry our credentials, and the
            S3 download carries none.
        transport: an ``httpx.AsyncBaseTransport`` for the client we own (tests,
            ``FakeAmplitude.transport()``); not with ``http_client``.
        limits_backend: where the limits state lives (``amp.LimitsBackend``): default
            ``InMemoryLimits()``, this process only; ``amp_cohorts_async.redis.RedisLimits``
            shares it with every process and host using the same Redis and app.
        download: where presigned download links may lead, how far a gzip body may inflate,
            whether members are counted (``DownloadPolicy()``: https to ``*.amazonaws.com``,
            100:1, not counted).
        wall_clock: the clock (aware ``datetime``) that decides the age of resume journal
            entries and, with the default in-memory limits, the quota month (UTC); a shared
            backend counts months on its own clock. Default ``datetime.now(UTC)``. For replays
            and tests.
        seed: seeds the random jitter of retries, polls and restarts after a pause, so a run
            can be reproduced; default: unseeded.
        tracer_provider, meter_provider: where OpenTelemetry spans and metrics go (needs
            ``opentelemetry-api``, extra ``otel``); default: the global providers, as they are
            when the client is created. Without an SDK behind them nothing is recorded and
            nothing is spent on telemetry.
    """

    def __init__(
        self,
        api_key: str | None = None,
        secret_key: str | None = None,
        *,
        region: str = "us",
        base_url: str | None = None,
        limits: Limits | None = None,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        limits_backend: LimitsBackend | None = None,
        download: DownloadPolicy | None = None,
        wall_clock: Callable[[], datetime] | None = None,
        seed: int | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        configure_from_env()  # AMP_COHORTS_LOG=info|debug: lines on stderr without code
        credentials = Credentials(
            _credential(api_key, "AMPLITUDE_API_KEY", "api_key"),
            _credential(secret_key, "AMPLITUDE_SECRET_KEY", "secret_key"),
        )
        if base_url is None:
            base_url = os.environ.get("AMPLITUDE_BASE_URL") or None
        base = resolve_base_url(region, base_url)
        for value, kind, name in (
            (limits, Limits, "limits"),
            (retry, RetryPolicy, "retry"),
            (poll, PollPolicy, "poll"),
            (download, DownloadPolicy, "download"),
        ):
            if value is not None and not isinstance(value, kind):
                raise InvalidRequestError(f"{name} must be a {kind.__name__}")
        if wall_clock is not None and not callable(wall_clock):
            raise InvalidRequestError("wall_clock must be a callable returning a datetime")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidRequestError(f"seed must be an int or None, got {seed!r}")
        self._telemetry = telemetry_for(tracer_provider, meter_provider)
        self.limits = limits or Limits()
        self.retry = retry or RetryPolicy()
        self.poll = poll or PollPolicy()
        self.download = download or DownloadPolicy()
        self._http, self._owns_http, blocking = http_client_for(
            http_client, transport, self.limits.max_concurrent_requests
        )
        if limits_backend is not None and not isinstance(limits_backend, LimitsBackend):
            raise InvalidRequestError(
                f"limits_backend must implement amp.LimitsBackend, got {limits_backend!r}"
            )
        rng = random.Random(seed)
        self._scheduler = Scheduler(
            self.limits,
            backend=limits_backend,
            # Names the app in a shared store without storing its key.
            app=hashlib.sha256(credentials.api_key.encode()).hexdigest()[:16],
            wall_clock=wall_clock or (lambda: datetime.now(UTC)),
            rng=rng,
        )
        boundary = HttpBoundary(self._http, base, credentials, self.download, blocking)
        sender = Sender(boundary, self._scheduler, self.retry, rng, telemetry=self._telemetry)
        self._api = Api(boundary, sender, self._scheduler)
        # After a shared-state loss the scheduler re-reads the quota through the endpoint.
        self._scheduler.refresh_usage = self._api.get_usage
        self._downloader = Downloader(self._api, self._scheduler, self.poll, self.download, rng)
        self._uploader = Uploader(self._api, self.limits, self._scheduler.cohort_write)
        self._base_url = base
        self._state = _State.UNOPENED

    def __repr__(self) -> str:
        return f"CohortsClient(base_url={self._base_url!r}, state={self._state.value!r})"

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        """Open the client (once); ``async with`` closes it on the way out."""
        if self._state is _State.OPENED:
            raise RuntimeError("CohortsClient is already open")
        if self._state is _State.CLOSED:
            raise RuntimeError("CohortsClient is closed; create a new one")
        self._state = _State.OPENED
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client; the owned httpx client is closed, a borrowed one is not."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._owns_http:
            await self._http.aclose()

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise RuntimeError("CohortsClient is closed; create a new one")

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler that grants this client's permits (for inspection)."""
        return self._scheduler

    # -- endpoints --------------------------------------------------------------------------
    async def list_cohorts(self, *, include_sync_info: bool = False) -> list[Cohort]:
        """GET /api/3/cohorts: every discoverable cohort of the project."""
        require_bool(include_sync_info, "include_sync_info")
        self._check_open()
        return await self._api.list_cohorts(include_sync_info)

    async def get_cohort(self, cohort_id: str) -> Cohort:
        """One cohort, as GET /api/3/cohorts shows it (spends no quota).

        Raises ``NotFoundError`` when the list does not show ``cohort_id``.
        """
        cohort_id = require_id(cohort_id, "cohort_id")
        self._check_open()
        for cohort in await self._api.list_cohorts(False):
            if cohort.id == cohort_id:
                return cohort
        raise NotFoundError(f"cohort {cohort_id!r} is not among the project's cohorts",
                            status_code=404, type="not_found",
                            request_line="GET /api/3/cohorts")

    async def request_cohort(
        self, cohort_id: str, *, props: bool = False, prop_keys: Sequence[str] = ()
    ) -> CohortRequest:
        """GET /api/5/cohorts/request/{id}: start an export job. Costs one unit of quota."""
        cohort_id = require_id(cohort_id, "cohort_id")
        export = export_options(props, prop_keys)
        self._check_open()
        return await self._api.request_cohort(cohort_id, export)

    async def get_request_status(self, request_id: str) -> RequestStatus:
        """GET /api/5/cohorts/request-status/{request_id}."""
        request_id = require_id(request_id, "request_id")
        self._check_open()
        return await self._api.get_request_status(request_id)

    async def get_usage(self) -> Usage:
        """GET /api/3/cohorts/usage: this month's cohort-request usage and limit."""
        self._check_open()
        return await self._api.get_usage()

    async def download_file(self, request_id: str, dest: str | PathLike[str]) -> DownloadResult:
        """GET /api/5/cohorts/request/{request_id}/file, streamed atomically to ``dest``."""
        request_id = require_id(request_id, "request_id")
        target = resolve_target(dest, None)
        self._check_open()
        return await self._downloader.download_file(request_id, target)

    async def upload_cohort(
        self,
        *,
        name: str,
        app_id: int,
        id_type: Any,
        ids: Iterable[str] | AsyncIterable[str],
        owner: str,
        published: bool,
        cg: str | None = None,
        skip_save: bool = False,
        skip_invalid_ids: bool = True,
        existing_cohort_id: str | None = None,
    ) -> UploadResult:
        """POST /api/3/cohorts/upload, split into chunks of ``max_ids_per_request``.

        ``id_type`` is an ``IdType`` (or its value); ``ids`` any iterable or async iterable of
        strings, de-duplicated in first-seen order. A failure after some chunks were applied
        raises ``PartialWriteError`` saying what was applied and what is pending.

        An upload that creates a cohort is never sent twice blindly: when its answer is lost
        after Amplitude may have acted, the cohort list decides whether it made the cohort
        (adopted) or not (sent again); ``UncertainUploadError`` when the list cannot tell.
        ``UploadResult.requests_sent`` counts every request sent, retries included.
        """
        return await self._uploader.upload_cohort(
            name=name,
            app_id=app_id,
            id_type=id_type,
            ids=ids,
            owner=owner,
            published=published,
            cg=cg,
            skip_save=skip_save,
            skip_invalid_ids=skip_invalid_ids,
            existing_cohort_id=existing_cohort_id,
            check_open=self._check_open,
        )

    async def update_membership(
        self,
        cohort_id: str,
        memberships: Sequence[MembershipChange],
        *,
        count_group: str | None = None,
        skip_invalid_ids: bool = True,
    ) -> MembershipResult:
        """POST /api/3/cohorts/membership, each change split into chunks as needed."""
        return await self._uploader.update_membership(
            cohort_id, memberships, count_group=count_group, skip_invalid_ids=skip_invalid_ids,
            check_open=self._check_open,
        )

    async def apply_diff(
        self,
        cohort_id: str,
        diff: MembershipDiff,
        *,
        id_type: MembershipIdType | str | None = None,
        count_group: str | None = None,
    ) -> MembershipResult:
        """Apply ``diff`` to a cohort: its exiting members as REMOVE, then its entering ones
        as ADD, at most ``max_ids_per_request`` ids a request, in order.

        ``id_type`` defaults from the diff's key (``amplitude_id`` -> ``BY_ID``, ``user_id``
        -> ``BY_NAME``; ``group_id`` / ``group_name`` likewise, with ``count_group`` naming
        the group type). No other write to the cohort overlaps the apply: in this process,
        and in every process and host sharing the client's limits backend. A failure part way
        raises ``PartialWriteError`` saying what was applied; the progress is kept beside the
        diff's files, so calling ``apply_diff`` again with the same diff applies only the rest.
        """
        cohort_id = require_id(cohort_id, "cohort_id")
        kind = check_diff(diff, id_type)
        if count_group is not None:
            count_group = require_text(count_group, "count_group")
        self._check_open()
        return await apply_diff(self._api, self._uploader, cohort_id, diff, kind, count_group)

    # -- workflows ------------------------------------------------------------------------
    async def download_cohort(
        self,
        cohort_id: str,
        dest: str | PathLike[str],
        *,
        props: bool = False,
        prop_keys: Sequence[str] = (),
        on_progress: ProgressCallback | None = None,
    ) -> DownloadResult:
        """Request, poll and download one cohort to ``dest`` (a file, or a directory).

        Into a directory, temp files that killed runs left there are removed first.
        """
        started = time.time()
        cohort_id = require_id(cohort_id, "cohort_id")
        export = export_options(props, prop_keys)
        progress = Progress(_progress_callback(on_progress), cohort_id)
        target = resolve_target(dest, cohort_id)
        self._check_open()
        if target != pathlib.Path(os.fspath(dest)):  # dest named the directory
            await remove_leftovers(target.parent, started)
        with self._telemetry.export(cohort_id):
            return await self._downloader.download_cohort(cohort_id, target, export, progress)

    async def download_cohorts(
        self,
        cohort_ids: Iterable[str | Cohort],
        dest_dir: str | PathLike[str],
        *,
        props: bool = False,
        prop_keys: Sequence[str] = (),
        on_progress: ProgressCallback | None = None,
        resume: bool = False,
    ) -> list[CohortOutcome]:
        """Download many cohorts concurrently under the limits; one outcome per id, in order.

        ``dest_dir`` is created if missing. The largest exports start first (sizes from
        ``Cohort`` objects, or from one ``list_cohorts()`` call when given ids). Temp files
        that killed runs left in ``dest_dir`` are removed first (only this library's, only
        those no live run holds).

        Fresh exports by default. ``resume=True`` continues the previous batch in ``dest_dir``
        from its journal: files it finished (sha256 verified) are kept, its export requests
        that ``/file`` still serves (younger than 6 days) are fetched again at no quota, and
        only what failed or never started is requested anew.
        """
        ids, sizes, refused = _cohort_items(cohort_ids)
        export = export_options(props, prop_keys)
        callback = _progress_callback(on_progress)
        require_bool(resume, "resume")
        directory = await make_directory(dest_dir, "dest_dir")
        self._check_open()
        for cohort_id in refused:
            Progress(callback, cohort_id).emit("failed")
        valid = [c for c in ids if c not in refused]
        outcomes = await download_cohorts(
            self._api, self._downloader, self._scheduler, valid, sizes, directory, export,
            callback, resume=resume,
        ) if valid else []
        done = {outcome.cohort_id: outcome for outcome in outcomes}
        return [done[c] if c in done else CohortOutcome(cohort_id=c, error=refused[c])
                for c in ids]

    async def sync_cohorts(
        self,
        cohorts: Iterable[str | Cohort],
        dest_dir: str | PathLike[str],
        *,
        props: bool = False,
        prop_keys: Sequence[str] = (),
        max_requests: int | None = None,
        dry_run: bool = False,
        keep_versions: int = 2,
        on_progress: ProgressCallback | None = None,
    ) -> SyncReport:
        """Keep a copy of each cohort in ``dest_dir``, spending quota only on change.

        One ``list_cohorts()`` and one ``get_usage()`` call (both free) decide, per cohort:
        ``unchanged`` (the copy was exported at the ``last_computed`` the list shows now),
        ``too_large``, ``missing``, or a cohort request -- within the budget, the smaller of
        ``max_requests`` and the month's quota left (never-copied cohorts first, then the
        oldest copies; the rest ``over_budget``). ``dry_run=True`` requests nothing and says
        what a run would (``planned``). Exports run as ``download_cohorts`` runs them; the
        current copy stays ``<dest_dir>/<safe id>.csv`` and ``keep_versions`` (>= 1, the
        current one included) versions are kept under ``<dest_dir>/versions/`` as hard links.
        Runs sharing ``dest_dir`` (tasks, processes, hosts) spend one request per change in
        all: a run that finds another exporting a cohort waits for its copy.
        """
        ids, _sizes, refused = _cohort_items(cohorts)
        export = export_options(props, prop_keys)
        callback = _progress_callback(on_progress)
        if max_requests is not None and (isinstance(max_requests, bool)
                                         or not isinstance(max_requests, int)
                                         or max_requests < 0):
            raise InvalidRequestError(
                f"max_requests must be None or an int >= 0, got {max_requests!r}")
        require_bool(dry_run, "dry_run")
        if (isinstance(keep_versions, bool) or not isinstance(keep_versions, int)
                or keep_versions < 1):
            raise InvalidRequestError(f"keep_versions must be an int >= 1, got {keep_versions!r}")
        directory = await _dest_dir(dest_dir, create=not dry_run)
        self._check_open()
        with self._telemetry.sync() as span:
            report = await sync_cohorts(
                self._api, self._downloader, self._scheduler,
                [c for c in ids if c not in refused], directory, export, callback,
                max_requests=max_requests, dry_run=dry_run, keep_versions=keep_versions,
            )
            span.set("amplitude.cohorts.count", len(ids))
            span.set("amplitude.cohorts.requests_spent", report.requests_spent)
        if not refused:
            return report
        entries = {entry.cohort_id: entry for entry in report.entries}
        return attrs.evolve(report, entries=[
            entries[c] if c in entries else SyncEntry(cohort_id=c, action="failed",
                                                      error=refused[c])
            for c in ids])


async def _dest_dir(value: Any, *, create: bool) -> pathlib.Path:
    """``dest_dir`` as a path, created (with its parents) when ``create``."""
    if create:
        return await make_directory(value, "dest_dir")
    directory = pathlib.Path(text_path(value, "dest_dir"))
    if await anyio.Path(directory).exists() and not await anyio.Path(directory).is_dir():
        raise InvalidRequestError(f"dest_dir is not a directory: {directory}")
    return directory
