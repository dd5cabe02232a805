"""CohortsClient: lifecycle, one coroutine per endpoint, and the download workflows."""

from __future__ import annotations

import enum
import os
import random
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from os import PathLike
from types import TracebackType
from typing import Any, Self

import anyio
import httpx

from ._batch import download_cohorts
from ._config import Limits, PollPolicy, RetryPolicy, resolve_base_url
from ._convert import CohortList, structure
from ._download import Downloader
from ._exceptions import InvalidRequestError
from ._http import Credentials, HttpBoundary, default_http_client
from ._models import (
    Cohort,
    CohortOutcome,
    CohortRequest,
    DownloadResult,
    MembershipChange,
    MembershipResult,
    ProgressEvent,
    RequestStatus,
    UploadResult,
    Usage,
)
from ._pipeline import Pipeline
from ._scheduler import LimitsBackend, RequestKind, Scheduler
from ._upload import Uploader
from ._validate import path_segment, require_bool, text_sequence

__all__ = ("CohortsClient",)

ProgressCallback = Callable[[ProgressEvent], None]


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


def _credential(value: str | None, env: str, name: str) -> str:
    if value is None:
        value = os.environ.get(env)
    if value is None:
        raise InvalidRequestError(f"{name} is required (pass it or set {env})")
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{name} must be a non-empty string")
    return value


class CohortsClient:
    """Async client for Amplitude's Behavioral Cohorts API.

    Every request obeys ``limits`` (5 concurrent, exact cohort-request windows, monthly quota),
    retries as ``retry`` says and polls export jobs as ``poll`` says. Use it as an async
    context manager, or call ``aclose()``. A borrowed ``http_client`` is never closed.
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
        wall_clock: Callable[[], datetime] | None = None,
        seed: int | None = None,
    ) -> None:
        credentials = Credentials(
            _credential(api_key, "AMPLITUDE_API_KEY", "api_key"),
            _credential(secret_key, "AMPLITUDE_SECRET_KEY", "secret_key"),
        )
        self._base_url = resolve_base_url(region, base_url)
        self._region = region
        for value, kind, name in (
            (limits, Limits, "limits"),
            (retry, RetryPolicy, "retry"),
            (poll, PollPolicy, "poll"),
        ):
            if value is not None and not isinstance(value, kind):
                raise InvalidRequestError(f"{name} must be a {kind.__name__}")
        if http_client is not None and transport is not None:
            raise InvalidRequestError("pass either http_client or transport, not both")
        self.limits = limits or Limits()
        self.retry = retry or RetryPolicy()
        self.poll = poll or PollPolicy()
        self._owns_http = http_client is None
        self._http = http_client or default_http_client(
            self.limits.max_concurrent_requests, transport
        )
        self._rng = random.Random(seed)
        self._scheduler = Scheduler(
            self.limits,
            backend=limits_backend,
            wall_clock=wall_clock or (lambda: datetime.now(UTC)),
            rng=self._rng,
        )
        self._boundary = HttpBoundary(self._http, self._base_url, credentials)
        self._pipeline = Pipeline(self._boundary, self._scheduler, self.retry, self._rng)
        self._state = _State.UNOPENED
        # Which cohort each request id we started belongs to, for DownloadResult.cohort_id.
        self._request_cohorts: dict[str, str] = {}
        # One lock per cohort being written: Amplitude refuses concurrent writes to one cohort.
        self._cohort_locks: dict[str, anyio.Lock] = {}

    def __repr__(self) -> str:
        return f"CohortsClient(base_url={str(self._base_url)!r}, state={self._state.value!r})"

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
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
        return self._scheduler

    # -- endpoints --------------------------------------------------------------------------
    async def list_cohorts(self, *, include_sync_info: bool = False) -> list[Cohort]:
        """GET /api/3/cohorts: every discoverable cohort of the project."""
        require_bool(include_sync_info, "include_sync_info")
        self._check_open()
        params = [("includeSyncInfo", "true")] if include_sync_info else []
        data = await self._pipeline.call_json(
            RequestKind.OTHER,
            lambda: self._boundary.build("GET", "/api/3/cohorts", params=params),
            what="list_cohorts",
        )
        return structure(data, CohortList, what="list_cohorts").cohorts

    async def request_cohort(
        self, cohort_id: str, *, props: bool = False, prop_keys: Sequence[str] = ()
    ) -> CohortRequest:
        """GET /api/5/cohorts/request/{id}: start an export job. Costs one unit of quota."""
        return await self._request_cohort(cohort_id, props=props, prop_keys=prop_keys)

    async def _request_cohort(
        self,
        cohort_id: str,
        *,
        props: bool,
        prop_keys: Sequence[str],
        on_wait: Callable[[float], None] | None = None,
    ) -> CohortRequest:
        segment = path_segment(cohort_id, "cohort_id")
        params = self._export_params(props, prop_keys)
        self._check_open()
        data = await self._pipeline.call_json(
            RequestKind.COHORT_REQUEST,
            lambda: self._boundary.build("GET", f"/api/5/cohorts/request/{segment}", params=params),
            what="request_cohort",
            on_wait=on_wait,
        )
        if isinstance(data, dict) and data.get("cohort_id") is None:
            data = {**data, "cohort_id": cohort_id}
        request = structure(data, CohortRequest, what="request_cohort")
        self._request_cohorts[request.request_id] = cohort_id
        return request

    @staticmethod
    def _export_params(props: bool, prop_keys: Sequence[str]) -> list[tuple[str, str]]:
        require_bool(props, "props")
        keys = text_sequence(prop_keys, "prop_keys")
        if keys and not props:
            raise InvalidRequestError("prop_keys needs props=True")
        params = [("props", "1")] if props else []
        params.extend(("propKeys", key) for key in keys)
        return params

    async def get_request_status(self, request_id: str) -> RequestStatus:
        """GET /api/5/cohorts/request-status/{request_id}."""
        return await self._get_request_status(request_id)

    async def _get_request_status(
        self, request_id: str, *, on_wait: Callable[[float], None] | None = None
    ) -> RequestStatus:
        segment = path_segment(request_id, "request_id")
        self._check_open()
        data = await self._pipeline.call_json(
            RequestKind.POLL,
            lambda: self._boundary.build("GET", f"/api/5/cohorts/request-status/{segment}"),
            what="get_request_status",
            on_wait=on_wait,
        )
        return structure(data, RequestStatus, what="get_request_status")

    async def get_usage(self) -> Usage:
        """GET /api/3/cohorts/usage: this month's cohort-request usage and limit."""
        self._check_open()
        data = await self._pipeline.call_json(
            RequestKind.OTHER,
            lambda: self._boundary.build("GET", "/api/3/cohorts/usage"),
            what="get_usage",
        )
        usage = structure(data, Usage, what="get_usage")
        self._scheduler.record_usage(usage.usage)
        return usage

    async def download_file(self, request_id: str, dest: str | PathLike[str]) -> DownloadResult:
        """GET /api/5/cohorts/request/{request_id}/file, streamed atomically to ``dest``."""
        return await Downloader(self).download_file(request_id, dest)

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
        """POST /api/3/cohorts/upload, split into chunks of ``max_ids_per_request``."""
        return await Uploader(self).upload_cohort(
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
        return await Uploader(self).update_membership(
            cohort_id, memberships, count_group=count_group, skip_invalid_ids=skip_invalid_ids
        )

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
        """Request, poll and download one cohort to ``dest`` (a file, or a directory)."""
        return await Downloader(self, on_progress).download_cohort(
            cohort_id, dest, props=props, prop_keys=prop_keys
        )

    async def download_cohorts(
        self,
        cohort_ids: Iterable[str | Cohort],
        dest_dir: str | PathLike[str],
        *,
        props: bool = False,
        prop_keys: Sequence[str] = (),
        on_progress: ProgressCallback | None = None,
        resume: bool = True,
    ) -> list[CohortOutcome]:
        """Download many cohorts concurrently under the limits; one outcome per id, in order.

        ``cohort_ids`` may hold ``Cohort`` objects (from ``list_cohorts``): their sizes let the
        batch start the largest exports first, which shortens the whole batch.

        With ``resume=True`` (the default) a journal in ``dest_dir`` lets a rerun, for export
        requests younger than 6 days (inside Amplitude's 7-day validity), skip files already
        downloaded (verified by sha256) and fetch the others from the earlier request instead
        of spending quota again. Older entries are ignored. ``resume=False`` makes fresh
        exports of everything.
        """
        return await download_cohorts(
            self,
            cohort_ids,
            dest_dir,
            props=props,
            prop_keys=prop_keys,
            on_progress=on_progress,
            resume=resume,
        )
