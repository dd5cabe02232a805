"""Request -> poll -> stream to disk, for one cohort or one request id.

``/file`` is fetched without following redirects. An inline body is streamed while the
Amplitude permit is held (it is an exchange with Amplitude); a 302 releases the permit and the
presigned S3 URL is fetched at once, without credentials. If the link expired or the transfer
broke, ``/file`` is asked again (it is valid for 7 days and costs no quota) and the transfer
resumes with a Range request where the bytes so far are intact.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from os import PathLike
from typing import TYPE_CHECKING

import anyio
import httpx

from ._exceptions import (
    CohortJobError,
    DownloadError,
    InvalidRequestError,
    ServerError,
    TransportError,
)
from ._files import AtomicWriter, safe_filename
from ._http import status_error, translate_transport_error
from ._models import CohortRequest, DownloadResult, Phase, ProgressEvent
from ._redact import redact_url
from ._retry import backoff
from ._scheduler import RequestKind
from ._validate import path_segment

if TYPE_CHECKING:
    from ._client import CohortsClient

__all__ = ("Downloader", "resolve_target")

logger = logging.getLogger("amp_cohorts_async")

ProgressCallback = Callable[[ProgressEvent], None]

_FAILED_STATES = re.compile(r"FAIL|ERROR|CANCEL|ABORT", re.IGNORECASE)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _Incomplete(TransportError):
    """The body ended before Content-Length said it would; retried like a dropped connection."""


class _LinkExpired(DownloadError):
    """S3 refused the presigned URL (expired): ask /file for a new one."""


def resolve_target(dest: str | PathLike[str], cohort_id: str | None) -> pathlib.Path:
    """``dest`` itself, or ``dest/<safe cohort id>.csv`` when ``dest`` is a directory."""
    if not isinstance(dest, str | PathLike):
        raise InvalidRequestError(f"dest must be a path, got {dest!r}")
    path = pathlib.Path(dest)
    if str(dest) == "":
        raise InvalidRequestError("dest must not be empty")
    if str(dest).endswith(("/", os.sep)) and not path.is_dir():
        raise InvalidRequestError(f"dest names a directory that does not exist: {dest}")
    if path.is_dir():
        if cohort_id is None:
            raise InvalidRequestError(f"dest {path} is a directory; pass a file path")
        return path / safe_filename(cohort_id)
    if not path.parent.is_dir():
        raise InvalidRequestError(f"the directory of dest does not exist: {path.parent}")
    return path


class Downloader:
    """One download workflow on a client; emits ProgressEvents to ``on_progress``."""

    def __init__(self, client: CohortsClient, on_progress: ProgressCallback | None = None) -> None:
        self.client = client
        self.pipeline = client._pipeline
        self.boundary = client._boundary
        self.on_progress = on_progress

    # -- progress -----------------------------------------------------------------------
    def emit(
        self,
        cohort_id: str | None,
        phase: Phase,
        *,
        bytes_done: int = 0,
        bytes_total: int | None = None,
        wait_seconds: float | None = None,
    ) -> None:
        if self.on_progress is None or cohort_id is None:
            return
        event = ProgressEvent(
            cohort_id=cohort_id,
            phase=phase,
            bytes_done=bytes_done,
            bytes_total=bytes_total,
            wait_seconds=wait_seconds,
        )
        try:
            self.on_progress(event)
        except Exception:
            logger.exception("on_progress callback raised; the download goes on")

    def waiting(self, cohort_id: str | None) -> Callable[[float], None]:
        return lambda seconds: self.emit(cohort_id, "waiting", wait_seconds=seconds)

    # -- workflow -----------------------------------------------------------------------
    async def download_cohort(
        self,
        cohort_id: str,
        dest: str | PathLike[str],
        *,
        props: bool,
        prop_keys: Sequence[str],
        request: CohortRequest | None = None,
        on_requested: Callable[[CohortRequest], Awaitable[None]] | None = None,
    ) -> DownloadResult:
        path_segment(cohort_id, "cohort_id")
        self.client._export_params(props, prop_keys)
        target = resolve_target(dest, cohort_id)
        self.client._check_open()
        jobs = self.client._scheduler.jobs
        try:
            if jobs is not None:
                await jobs.acquire()
            try:
                if request is None:
                    request = await self.client._request_cohort(
                        cohort_id, props=props, prop_keys=prop_keys,
                        on_wait=self.waiting(cohort_id),
                    )
                    if on_requested is not None:
                        await on_requested(request)
                self.emit(cohort_id, "requested")
                await self.wait_for_job(request.request_id, cohort_id)
                result = await self.fetch(request.request_id, target, cohort_id)
            finally:
                if jobs is not None:
                    jobs.release()
        except BaseException:
            self.emit(cohort_id, "failed")
            raise
        self.emit(cohort_id, "done", bytes_done=result.size_bytes, bytes_total=result.size_bytes)
        return result

    async def wait_for_job(self, request_id: str, cohort_id: str | None) -> None:
        """Poll until the export job is done, with growing, jittered intervals."""
        policy = self.client.poll
        rng = self.client._rng
        started = anyio.current_time()
        deadline = None if policy.deadline is None else started + policy.deadline
        interval = policy.initial_interval
        while True:
            delay = interval * rng.uniform(1 - policy.jitter, 1 + policy.jitter)
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - anyio.current_time()))
            await anyio.sleep(delay)
            self.emit(cohort_id, "polling")
            parsed = await self.client._get_request_status(
                request_id, on_wait=self.waiting(cohort_id)
            )
            if parsed.done:
                return
            if parsed.async_status and _FAILED_STATES.search(parsed.async_status):
                raise CohortJobError(
                    f"export job {request_id} failed: {parsed.async_status}"
                )
            if deadline is not None and anyio.current_time() >= deadline:
                raise CohortJobError(
                    f"export job {request_id} not finished after {policy.deadline:g}s "
                    f"(last status {parsed.async_status!r})"
                )
            interval = min(policy.max_interval, interval * policy.multiplier)

    async def download_file(self, request_id: str, dest: str | PathLike[str]) -> DownloadResult:
        path_segment(request_id, "request_id")
        cohort_id = self.client._request_cohorts.get(request_id)
        target = resolve_target(dest, None)
        self.client._check_open()
        return await self.fetch(request_id, target, cohort_id)

    # -- the transfer ---------------------------------------------------------------------
    async def fetch(
        self, request_id: str, target: pathlib.Path, cohort_id: str | None
    ) -> DownloadResult:
        """Fetch the file of ``request_id`` into ``target`` atomically."""
        segment = path_segment(request_id, "request_id")
        policy = self.client.retry
        async with AtomicWriter(target) as writer:
            attempt = 0
            while True:
                attempt += 1
                try:
                    location = await self.pipeline.call(
                        RequestKind.FILE,
                        lambda: self._file_request(segment, writer),
                        lambda response: self._receive(response, writer, cohort_id),
                        on_wait=self.waiting(cohort_id),
                    )
                    if location is not None:
                        await self._fetch_presigned(location, writer, cohort_id)
                    break
                except (_LinkExpired, TransportError, ServerError) as error:
                    if attempt >= policy.max_attempts:
                        raise DownloadError(
                            f"could not fetch the file of request {request_id} after "
                            f"{attempt} attempts: {error}"
                        ) from None
                    delay = 0.0 if isinstance(error, _LinkExpired) else backoff(
                        policy, attempt, self.client._rng
                    )
                    logger.info("re-requesting file of %s in %.2fs: %s", request_id, delay, error)
                    await anyio.sleep(delay)
            sha256 = await writer.commit()
        return DownloadResult(
            cohort_id=cohort_id,
            request_id=request_id,
            path=target,
            size_bytes=writer.size_bytes,
            sha256=sha256,
        )

    def _file_request(self, segment: str, writer: AtomicWriter) -> httpx.Request:
        request = self.boundary.build("GET", f"/api/5/cohorts/request/{segment}/file")
        # We decode gzip ourselves (so a resumed transfer can go on decoding); nothing else.
        request.headers["Accept-Encoding"] = "gzip"
        request.headers["Accept"] = "*/*"
        if writer.raw_bytes:
            request.headers["Range"] = f"bytes={writer.raw_bytes}-"
        return request

    async def _receive(
        self, response: httpx.Response, writer: AtomicWriter, cohort_id: str | None
    ) -> str | None:
        """Handle /file's answer: the Location of a redirect, or stream the inline body."""
        if response.status_code in (301, 302, 303, 307, 308):
            location = response.headers.get("Location")
            if not location:
                raise DownloadError("/file redirected without a Location")
            return str(response.url.join(location))
        await self._stream_body(response, writer, cohort_id)
        return None

    async def _fetch_presigned(
        self, url: str, writer: AtomicWriter, cohort_id: str | None
    ) -> None:
        headers = {"Range": f"bytes={writer.raw_bytes}-"} if writer.raw_bytes else {}
        request = self.boundary.build_external(url, headers)
        logger.debug("GET %s", redact_url(request.url))
        try:
            response = await self.boundary.http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, request) from None
        try:
            if response.status_code >= 400:
                body = await self._read_error_body(response)
                error = status_error(response, body)
                if response.status_code == 403:
                    # Expired (or otherwise refused) link: /file hands out a fresh one.
                    raise _LinkExpired(f"presigned link refused: {error.message}")
                if response.status_code < 500 and response.status_code != 408:
                    raise DownloadError(f"S3 refused the download: {error}")
                raise error
            await self._stream_body(response, writer, cohort_id)
        finally:
            await response.aclose()

    @staticmethod
    async def _read_error_body(response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError:
            return b""

    async def _stream_body(
        self, response: httpx.Response, writer: AtomicWriter, cohort_id: str | None
    ) -> None:
        """Append a 200/206 body to ``writer``; raise _Incomplete if it ends short."""
        encoding = response.headers.get("Content-Encoding", "").strip().lower() or None
        preloaded = response.is_stream_consumed  # a mock transport already read (and decoded) it
        if preloaded:
            encoding = None
        if response.status_code == 206:
            start, end, total = self._content_range(response)
            if start != writer.raw_bytes:
                await writer.restart(encoding)
                raise _Incomplete("server resumed at the wrong offset; restarting")
            expected: int | None = end - start + 1
            bytes_total = total
        elif response.status_code == 200:
            if writer.raw_bytes:
                await writer.restart(encoding)  # the server ignored Range: start over
            else:
                writer.start_representation(encoding)
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() and not preloaded else None
            bytes_total = expected
        else:
            raise DownloadError(f"unexpected HTTP {response.status_code} for the cohort file")
        def report() -> None:
            self.emit(cohort_id, "downloading", bytes_done=writer.raw_bytes,
                      bytes_total=bytes_total)

        body = _preloaded(response.content) if preloaded else response.aiter_raw()
        try:
            received = await writer.pump(body, report)
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, response.request) from None
        if expected is not None and received < expected:
            raise _Incomplete(f"body ended after {received} of {expected} bytes")
        if expected is not None and received > expected:
            await writer.restart(encoding)
            raise _Incomplete(f"body longer than Content-Length ({received} > {expected})")
        report()

    @staticmethod
    def _content_range(response: httpx.Response) -> tuple[int, int, int | None]:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None:
            raise DownloadError("206 answer without a valid Content-Range")
        total = None if match.group(3) == "*" else int(match.group(3))
        return int(match.group(1)), int(match.group(2)), total



async def _preloaded(content: bytes) -> AsyncIterator[bytes]:
    yield content
