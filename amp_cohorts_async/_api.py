"""The endpoint layer: one coroutine per Amplitude endpoint, typed models out.

Arguments arrive validated (the public client checks them once); this layer only builds the
request, sends it through the one send path and structures the answer. It never retries on
its own and knows nothing of files, journals or progress events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from ._body import Body
from ._convert import CohortList, MembershipWire, UploadWire, structure
from ._http import HttpBoundary
from ._models import Cohort, CohortRequest, ExportOptions, RequestStatus, Usage
from ._scheduler import RequestKind, Scheduler
from ._send import SendCount, Sender, SendObserver
from ._validate import path_segment

__all__ = ("Api",)

T = TypeVar("T")


class Api:
    """Amplitude's Behavioral Cohorts endpoints over one ``Sender``."""

    def __init__(
        self,
        boundary: HttpBoundary,
        sender: Sender,
        scheduler: Scheduler,
        request_cohorts: dict[str, str] | None = None,
    ) -> None:
        self.boundary = boundary
        self.sender = sender
        self.scheduler = scheduler
        # Which cohort each request id we started belongs to, for DownloadResult.cohort_id.
        self._request_cohorts = {} if request_cohorts is None else request_cohorts

    def observed(self, observer: SendObserver | None) -> Api:
        """The same endpoints, telling ``observer`` (a cohort's ``Progress``) every attempt,
        retry and wait of their requests."""
        return Api(self.boundary, self.sender.observed(observer), self.scheduler,
                   self._request_cohorts)

    def counted(self, count: SendCount) -> Api:
        """The same endpoints, adding each request sent to ``count``."""
        return Api(self.boundary, self.sender.counted(count), self.scheduler,
                   self._request_cohorts)

    def cohort_of(self, request_id: str) -> str | None:
        return self._request_cohorts.get(request_id)

    async def list_cohorts(self, include_sync_info: bool) -> list[Cohort]:
        params = [("includeSyncInfo", "true")] if include_sync_info else []
        data = await self.sender.call_json(
            RequestKind.OTHER,
            lambda: self.boundary.build("GET", "/api/3/cohorts", params=params),
            what="list_cohorts",
        )
        return structure(data, CohortList, what="list_cohorts").cohorts

    async def request_cohort(self, cohort_id: str, export: ExportOptions) -> CohortRequest:
        """Start an export job; costs one unit of the monthly quota."""
        path = f"/api/5/cohorts/request/{path_segment(cohort_id)}"
        data = await self.sender.call_json(
            RequestKind.COHORT_REQUEST,
            lambda: self.boundary.build("GET", path, params=export.query(),
                                        route="/api/5/cohorts/request/{cohort_id}"),
            what="request_cohort",
        )
        if isinstance(data, dict) and data.get("cohort_id") is None:
            data = {**data, "cohort_id": cohort_id}
        request = structure(data, CohortRequest, what="request_cohort")
        self.sender.telemetry.quota_spent()
        self._request_cohorts[request.request_id] = cohort_id
        return request

    async def get_request_status(self, request_id: str) -> RequestStatus:
        path = f"/api/5/cohorts/request-status/{path_segment(request_id)}"
        data = await self.sender.call_json(
            RequestKind.POLL,
            lambda: self.boundary.build(
                "GET", path, route="/api/5/cohorts/request-status/{request_id}"),
            what="get_request_status",
        )
        return structure(data, RequestStatus, what="get_request_status")

    async def get_usage(self) -> Usage:
        data = await self.sender.call_json(
            RequestKind.OTHER,
            lambda: self.boundary.build("GET", "/api/3/cohorts/usage"),
            what="get_usage",
        )
        usage = structure(data, Usage, what="get_usage")
        self.sender.telemetry.quota_left(usage.remaining)
        await self.scheduler.record_usage(usage.usage, usage.resets_at)
        return usage

    async def file_exchange(
        self,
        request_id: str,
        headers: Mapping[str, str],
        handle: Callable[[Body], Awaitable[T]],
    ) -> T:
        """ONE exchange with ``/file``: no retry here, the transfer's attempt is retried whole.

        ``handle`` gets a 2xx/3xx answer; an error status raises before it is called.
        """
        path = f"/api/5/cohorts/request/{path_segment(request_id)}/file"
        return await self.sender.exchange(
            RequestKind.FILE,
            lambda: self.boundary.build("GET", path, headers=headers,
                                        route="/api/5/cohorts/request/{request_id}/file"),
            lambda response: handle(self.boundary.body(response)),
        )

    @asynccontextmanager
    async def open_presigned(self, url: str, headers: Mapping[str, str]) -> AsyncIterator[Body]:
        """The presigned URL ``/file`` pointed to (no credentials, no permit: not Amplitude)."""
        with self.sender.telemetry.http("GET", url, None) as call:
            async with self.boundary.open_presigned(url, headers) as body:
                call.answered(body.status)
                yield body

    async def upload(self, body: Mapping[str, Any], *, retried: bool = True) -> UploadWire:
        """POST /upload; ``retried=False``: ONE exchange, for a caller that decides itself
        whether sending it again is safe (an upload that creates a cohort)."""
        return await self._post("/api/3/cohorts/upload", body, UploadWire, "upload_cohort",
                                retried=retried)

    async def membership(self, body: Mapping[str, Any]) -> MembershipWire:
        return await self._post(
            "/api/3/cohorts/membership", body, MembershipWire, "update_membership"
        )

    async def _post(
        self, path: str, body: Mapping[str, Any], wire: type[T], what: str, *,
        retried: bool = True,
    ) -> T:
        send = self.sender.call_json if retried else self.sender.exchange_json
        data = await send(
            RequestKind.OTHER,
            lambda: self.boundary.build("POST", path, json_body=body),
            what=what,
        )
        return structure(data, wire, what=what)
