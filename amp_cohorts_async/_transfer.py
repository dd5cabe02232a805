"""The transfer: the file of one export request, from ``/file`` (and S3) into a body sink.

``/file`` is fetched without following redirects. An inline body is streamed while the
Amplitude permit is held (it is an exchange with Amplitude); a 302 releases the permit and the
presigned S3 URL is fetched at once, without credentials. One attempt is the ``/file``
exchange plus the S3 GET it points to, and the send path's one retry loop retries attempts:
an expired link at once (``/file`` is valid for 7 days and costs no quota, and hands out a
fresh link), a broken transfer after a backoff, resuming with ``Range`` where the bytes so far
are intact.

Both answers arrive as a ``Body`` (``_body.py``), whichever HTTP stack the boundary used; the
bytes go into a ``BodySink`` (decoding, checks, hash, resume offset) over an ``AtomicFile``.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from typing import NoReturn

from ._api import Api
from ._body import Body
from ._config import DownloadPolicy
from ._events import Progress
from ._exceptions import (
    APIStatusError,
    DownloadError,
    IncompleteBodyError,
    LinkExpiredError,
    ServerError,
    TransportError,
)
from ._files import AtomicFile
from ._models import DownloadResult
from ._sink import BodySink

__all__ = ("fetch_file",)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED = re.compile(r"bytes \*/(\d+)")
# Media types that are plainly a page or an error document, never a cohort file.
_NOT_AN_EXPORT = frozenset(("text/html", "application/xhtml+xml", "application/json",
                            "application/xml", "text/xml"))


async def fetch_file(
    api: Api, policy: DownloadPolicy, request_id: str, target: pathlib.Path, progress: Progress
) -> DownloadResult:
    """Fetch the file of ``request_id`` into ``target`` atomically (nothing there on failure)."""
    async with AtomicFile(target) as file, BodySink(
        file, max_gzip_ratio=policy.max_gzip_ratio, count_members=policy.count_members
    ) as sink:
        transfer = _Transfer(api, sink, progress)
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
        sha256 = await sink.finish()
        return DownloadResult(
            cohort_id=progress.cohort_id,
            request_id=request_id,
            path=target,
            size_bytes=sink.size_bytes,
            sha256=sha256,
            members=sink.rows,
        )


class _Transfer:
    def __init__(self, api: Api, sink: BodySink, progress: Progress) -> None:
        self.api = api
        self.sink = sink
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

    async def _receive(self, body: Body) -> str | None:
        """Handle /file's answer: the Location of a redirect, or pour the inline body."""
        location = body.location()
        if location is None:
            await self._pour(body)
        return location

    async def _fetch_presigned(self, url: str) -> None:
        async with self.api.open_presigned(url, self._range()) as body:
            if body.status == 416:
                await self._not_satisfiable(body.headers.get("content-range") or "")
                return
            if body.status >= 400:
                _refused(await body.error())
            await self._pour(body)

    async def _not_satisfiable(self, content_range: str) -> None:
        """A 416 to our ``Range``: the server has nothing past the bytes we hold.

        When it says the file is exactly that long, the connection broke after the last byte
        and the file is whole; otherwise start over from the first byte.
        """
        match = _UNSATISFIED.fullmatch(content_range.strip())
        if match is not None and int(match.group(1)) == self.sink.raw_bytes > 0:
            return
        await self.sink.restart(None)
        raise IncompleteBodyError("the server could not resume the transfer; starting over")

    def _range(self) -> dict[str, str]:
        return {"Range": f"bytes={self.sink.raw_bytes}-"} if self.sink.raw_bytes else {}

    async def _pour(self, body: Body) -> None:
        """Append a 200/206 body to the sink; raise IncompleteBodyError if it ends short."""
        expected, bytes_total, encoding = await self._begin_body(body.status, body.headers)

        def report() -> None:
            self.progress.emit("downloading", bytes_done=self.sink.raw_bytes,
                               bytes_total=bytes_total)

        received = await body.pour_into(self.sink, report)
        if expected is not None and received < expected:
            raise IncompleteBodyError(f"body ended after {received} of {expected} bytes")
        if expected is not None and received > expected:
            await self.sink.restart(encoding)
            raise IncompleteBodyError(f"body longer than Content-Length ({received} > {expected})")
        report()

    async def _begin_body(
        self, status: int, headers: Mapping[str, str]
    ) -> tuple[int | None, int | None, str | None]:
        """Check a 200/206 answer against what the sink holds, preparing it for the body.

        Returns (bytes this body should carry, the whole file's size, content encoding).
        """
        sink = self.sink
        media_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
        if media_type in _NOT_AN_EXPORT:
            raise DownloadError(f"the answer is {media_type}, not a cohort export")
        encoding = (headers.get("content-encoding") or "").strip().lower() or None
        if status == 206:
            start, end, total = _content_range(headers.get("content-range") or "")
            if start != sink.raw_bytes:
                await sink.restart(encoding)
                raise IncompleteBodyError("server resumed at the wrong offset; restarting")
            return end - start + 1, total, encoding
        if status == 200:
            if sink.raw_bytes:
                await sink.restart(encoding)  # the server ignored Range: start over
            else:
                sink.begin(encoding)
            length = headers.get("content-length")
            expected = int(length) if length and length.isdigit() else None
            return expected, expected, encoding
        raise DownloadError(f"unexpected HTTP {status} for the cohort file")


def _refused(error: APIStatusError) -> NoReturn:
    """S3 said no: an expired link gets a fresh one from /file, other refusals end it."""
    if error.status_code == 403:
        raise LinkExpiredError(f"presigned link refused: {error.message}")
    if error.status_code < 500 and error.status_code != 408:
        raise DownloadError(f"S3 refused the download: {error}")
    raise error


def _content_range(value: str) -> tuple[int, int, int | None]:
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        raise DownloadError("206 answer without a valid Content-Range")
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)), total
