"""The transfer: the file of one export request, from ``/file`` (and S3) into an AtomicWriter.

``/file`` is fetched without following redirects. An inline body is streamed while the
Amplitude permit is held (it is an exchange with Amplitude); a 302 releases the permit and the
presigned S3 URL is fetched at once, without credentials. One attempt is the ``/file``
exchange plus the S3 GET it points to, and the send path's one retry loop retries attempts:
an expired link at once (``/file`` is valid for 7 days and costs no quota, and hands out a
fresh link), a broken transfer after a backoff, resuming with ``Range`` where the bytes so far
are intact.
"""

from __future__ import annotations

import http.client
import logging
import pathlib
import re
from collections.abc import Mapping
from typing import NoReturn

import anyio

from ._api import Api
from ._background import alongside
from ._events import Progress
from ._exceptions import (
    APIStatusError,
    DownloadError,
    IncompleteBodyError,
    LinkExpiredError,
    ServerError,
    TransportError,
)
from ._files import AtomicWriter
from ._http import HttpBoundary, Response, status_error, status_error_from
from ._models import DownloadResult
from ._redact import redact_url
from ._s3_leg import BlockingGetter, Leg, run_abortable

__all__ = ("fetch_file",)

logger = logging.getLogger("amp_cohorts_async")

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED = re.compile(r"bytes \*/(\d+)")
_REDIRECTS = frozenset((301, 302, 303, 307, 308))
# Media types that are plainly a page or an error document, never a cohort file.
_NOT_AN_EXPORT = frozenset(("text/html", "application/xhtml+xml", "application/json",
                            "application/xml", "text/xml"))


async def fetch_file(
    api: Api, request_id: str, target: pathlib.Path, progress: Progress
) -> DownloadResult:
    """Fetch the file of ``request_id`` into ``target`` atomically (nothing there on failure)."""
    policy = api.boundary.download_policy
    async with AtomicWriter(target, max_gzip_ratio=policy.max_gzip_ratio,
                            count_members=policy.count_members) as writer:
        transfer = _Transfer(api, writer, progress)
        try:
            await api.sender.retrying(
                lambda: transfer.attempt(request_id), what=f"file of request {request_id}"
            )
        except (LinkExpiredError, TransportError, ServerError) as error:
            failure = DownloadError(
                f"could not fetch the file of request {request_id}: {error.describe()}"
            )
            failure.attempts = error.attempts
            raise failure from error
        sha256 = await writer.commit()
    return DownloadResult(
        cohort_id=progress.cohort_id,
        request_id=request_id,
        path=target,
        size_bytes=writer.size_bytes,
        sha256=sha256,
        members=writer.rows,
    )


class _Transfer:
    def __init__(self, api: Api, writer: AtomicWriter, progress: Progress) -> None:
        self.api = api
        self.writer = writer
        self.progress = progress

    async def attempt(self, request_id: str) -> None:
        """One attempt: ask ``/file``; follow its redirect to S3 at once."""
        # We decode gzip ourselves (so a resumed transfer can go on decoding); nothing else.
        headers = {"Accept-Encoding": "gzip", "Accept": "*/*", **self._range()}
        try:
            location = await self.api.file_exchange(request_id, headers, self._receive)
        except APIStatusError as error:
            if error.status_code != 416 or error.response is None:
                raise
            await self._not_satisfiable(error.response.headers.get("content-range") or "")
            return
        if location is not None:
            await self._fetch_presigned(location)

    async def _not_satisfiable(self, content_range: str) -> None:
        """A 416 to our ``Range``: the server has nothing past the bytes we hold.

        When it says the file is exactly that long, the connection broke after the last byte
        and the file is whole; otherwise start over from the first byte.
        """
        match = _UNSATISFIED.fullmatch(content_range.strip())
        if match is not None and int(match.group(1)) == self.writer.raw_bytes > 0:
            return
        await self.writer.restart(None)
        raise IncompleteBodyError("the server could not resume the transfer; starting over")

    def _range(self) -> dict[str, str]:
        return {"Range": f"bytes={self.writer.raw_bytes}-"} if self.writer.raw_bytes else {}

    async def _receive(self, response: Response) -> str | None:
        """Handle /file's answer: the Location of a redirect, or stream the inline body."""
        if response.status_code in _REDIRECTS:
            return self.api.boundary.redirect_location(response)
        await self._stream_body(response)
        return None

    async def _fetch_presigned(self, url: str) -> None:
        boundary = self.api.boundary
        if boundary.blocking is not None:
            await self._fetch_presigned_in_thread(url, boundary.blocking)
            return
        response = await boundary.send_external(url, self._range())
        try:
            if response.status_code == 416:
                await self._not_satisfiable(response.headers.get("content-range") or "")
                return
            if response.status_code >= 400:
                _refused(status_error(response, await _error_body(boundary, response)))
            await self._stream_body(response)
        finally:
            await response.aclose()

    async def _fetch_presigned_in_thread(self, url: str, getter: BlockingGetter) -> None:
        """The S3 leg in one worker thread (see ``_s3_leg``); the loop reports progress."""
        self.api.boundary.check_external(url)
        leg = Leg()
        try:
            status, headers = await run_abortable(
                lambda: getter.open(url, self._range(), leg), leg)
            if status == 416:
                await self._not_satisfiable(headers.get("content-range") or "")
                return
            if status >= 400:
                assert leg.response is not None
                response = leg.response
                body = await run_abortable(lambda: _read_error(response), leg)
                _refused(status_error_from(status, headers, body, f"GET {redact_url(url)}"))
            expected, bytes_total, encoding = await self._begin_body(status, headers)
            async with alongside(lambda: self._report_every(0.25, bytes_total)):
                received = await run_abortable(
                    lambda: self.writer.pump_blocking(leg.read_into), leg)
            await self._end_body(received, expected, bytes_total, encoding)
        finally:
            leg.close()  # a socket close, quick; on the loop so a cancellation cannot skip it

    async def _report_every(self, seconds: float, bytes_total: int | None) -> None:
        while True:
            await anyio.sleep(seconds)
            self.progress.emit("downloading", bytes_done=self.writer.raw_bytes,
                               bytes_total=bytes_total)

    async def _stream_body(self, response: Response) -> None:
        """Append a 200/206 body to the writer; raise IncompleteBodyError if it ends short."""
        expected, bytes_total, encoding = await self._begin_body(response.status_code,
                                                                 response.headers)
        writer = self.writer

        def report() -> None:
            self.progress.emit("downloading", bytes_done=writer.raw_bytes,
                               bytes_total=bytes_total)

        received = await writer.pump(self.api.boundary.iter_raw(response), report)
        await self._end_body(received, expected, bytes_total, encoding)

    async def _begin_body(
        self, status: int, headers: Mapping[str, str]
    ) -> tuple[int | None, int | None, str | None]:
        """Check a 200/206 answer against what the writer holds, preparing it for the body.

        Returns (bytes this body should carry, the whole file's size, content encoding).
        """
        writer = self.writer
        media_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
        if media_type in _NOT_AN_EXPORT:
            raise DownloadError(f"the answer is {media_type}, not a cohort export")
        encoding = (headers.get("content-encoding") or "").strip().lower() or None
        if status == 206:
            start, end, total = _content_range(headers.get("content-range") or "")
            if start != writer.raw_bytes:
                await writer.restart(encoding)
                raise IncompleteBodyError("server resumed at the wrong offset; restarting")
            return end - start + 1, total, encoding
        if status == 200:
            if writer.raw_bytes:
                await writer.restart(encoding)  # the server ignored Range: start over
            else:
                writer.start_representation(encoding)
            length = headers.get("content-length")
            expected = int(length) if length and length.isdigit() else None
            return expected, expected, encoding
        raise DownloadError(f"unexpected HTTP {status} for the cohort file")

    async def _end_body(self, received: int, expected: int | None, bytes_total: int | None,
                        encoding: str | None) -> None:
        if expected is not None and received < expected:
            raise IncompleteBodyError(f"body ended after {received} of {expected} bytes")
        if expected is not None and received > expected:
            await self.writer.restart(encoding)
            raise IncompleteBodyError(f"body longer than Content-Length ({received} > {expected})")
        self.progress.emit("downloading", bytes_done=self.writer.raw_bytes,
                           bytes_total=bytes_total)


def _refused(error: APIStatusError) -> NoReturn:
    """S3 said no: an expired link gets a fresh one from /file, other refusals end it."""
    if error.status_code == 403:
        raise LinkExpiredError(f"presigned link refused: {error.message}")
    if error.status_code < 500 and error.status_code != 408:
        raise DownloadError(f"S3 refused the download: {error}")
    raise error


def _read_error(response: http.client.HTTPResponse) -> bytes:
    try:
        return response.read(1 << 16)
    except (OSError, http.client.HTTPException):
        return b""


async def _error_body(boundary: HttpBoundary, response: Response) -> bytes:
    try:
        return await boundary.read(response)
    except TransportError:  # the error status is what matters; a broken error body is not
        return b""


def _content_range(value: str) -> tuple[int, int, int | None]:
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        raise DownloadError("206 answer without a valid Content-Range")
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)), total
