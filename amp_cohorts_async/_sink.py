"""The body sink: what the bytes of a response body become on their way into the atomic file.

One write path for every way a body arrives (a blocking reader in a worker thread, batches of
an async stream): decode gzip ourselves in bounded pieces and refuse a decompression bomb,
check that the file starts like a cohort export, write, and hand each piece to the digest
thread that hashes it and counts its line breaks. ``raw_bytes`` counts the representation as
it came off the wire and is the resume offset: it moves only with what reached the file, so it
is true even when the awaiting task is cancelled after a write.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import anyio

from ._digest import BackgroundDigest
from ._exceptions import DownloadError
from ._files import AtomicFile

__all__ = ("BodySink",)

READ_SIZE = 1 << 20  # one blocking read into a pool buffer
_INFLATE_PIECE = 4 << 20

# The export's first line: every column name double-quoted, separated by commas.
_HEADER_ROW = re.compile(rb'(\xef\xbb\xbf)?"(?:[^"\r\n]|"")*"(?:,"(?:[^"\r\n]|"")*")*\r?')
_HEADER_LIMIT = 64 << 10
# Small gzip bodies may inflate far beyond the ratio (a header and a few rows); let them be.
_INFLATE_SLACK = 1 << 20


class BodySink:
    """Receives raw (possibly gzip-encoded) bytes; writes them decoded, checked and hashed.

    What it writes must look like a cohort export: its first line is a quoted CSV header row
    (anything else, an HTML page say, is a DownloadError), and a gzip body may not inflate
    beyond ``max_gzip_ratio`` times its size (plus 1 MiB of slack for tiny files).

    ``write_batch`` and ``pump`` block: call them from a worker thread, one at a time.
    """

    def __init__(self, file: AtomicFile, *, max_gzip_ratio: float = 100.0,
                 count_members: bool = False) -> None:
        self.file = file
        self.max_gzip_ratio = max_gzip_ratio
        self.count_members = count_members
        self._digest = BackgroundDigest(hashlib.sha256(), size=READ_SIZE,
                                        count_lines=count_members)
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.raw_bytes = 0  # of the representation on the wire (for Range and Content-Length)
        self._gunzip: Any = None
        self._head: bytes | None = b""  # the first line while it arrives; None once checked

    @property
    def size_bytes(self) -> int:
        """Decoded bytes written to the file."""
        return self.file.size

    @property
    def rows(self) -> int | None:
        """Members written (None unless counted): line breaks after the header's.

        A single-byte count runs at memory speed (a two-byte '"\\n' count, exact for quoted
        line breaks inside values, measured 3x slower and was the leg's largest cost); a
        property value holding a line break, which Amplitude exports rarely carry, counts one
        extra member. Read after ``finish()``.
        """
        return max(0, self._digest.line_breaks - 1) if self.count_members else None

    async def __aenter__(self) -> BodySink:
        self._digest.__enter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        with anyio.CancelScope(shield=True):  # the digest thread only hashes: a short wait
            await anyio.to_thread.run_sync(self._digest.__exit__, None, None, None)

    # -- between bodies, on the loop ------------------------------------------------------
    def begin(self, encoding: str | None) -> None:
        """A fresh body begins (status 200) with nothing written yet: decode it as ``encoding``."""
        if encoding == "gzip":
            self._gunzip = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        elif encoding in (None, "identity"):
            self._gunzip = None
        else:
            raise DownloadError(f"unsupported Content-Encoding {encoding!r}")

    async def restart(self, encoding: str | None) -> None:
        """Throw away what was written: the server sends the whole body again."""
        await anyio.to_thread.run_sync(self._restart)
        self.begin(encoding)

    def _restart(self) -> None:
        self._digest.drain()
        self.file.truncate()
        self._digest.reset(hashlib.sha256())
        self._reset_counters()

    async def finish(self) -> str:
        """The body is complete: check its end, commit the file; returns the sha256 hex."""
        await anyio.to_thread.run_sync(self._finish)
        await self.file.commit()
        return str(self._digest.hash.hexdigest())  # type: ignore[attr-defined]

    def _finish(self) -> None:
        with self._decode_errors():
            if self._gunzip is not None:
                if not self._gunzip.eof:
                    raise DownloadError("gzip body ended early")
                self._write_decoded(self._gunzip.flush())
            if self._head is not None:
                self._check_head(b"", final=True)  # a body shorter than one line
            self._digest.drain()

    # -- blocking, in a worker thread -------------------------------------------------------
    def write_batch(self, chunks: list[bytes]) -> None:
        """Write raw ``chunks`` (one batch of an async stream)."""
        # One join, then one pass: each call gives up the GIL and must win it back from the
        # event loop's thread, so per-chunk calls would spend more time waiting than hashing.
        with self._decode_errors():
            self._write_raw(b"".join(chunks))

    def pump(self, read_into: Callable[[memoryview], int]) -> int:
        """Read with ``read_into`` into pool buffers until it returns 0; returns bytes read.

        Each read is written from its buffer in this thread and handed to the digest thread,
        which hashes it while this one reads the next: no copy, no per-chunk work on the loop.
        """
        received = 0
        digest = self._digest
        with self._decode_errors():
            while True:
                buffer = digest.take()
                try:
                    count = read_into(memoryview(buffer))
                except BaseException:
                    digest.give_back(buffer)
                    raise
                if not count:
                    digest.give_back(buffer)
                    return received
                if self._gunzip is None:
                    self._write_plain(buffer, count)
                else:
                    try:
                        self._inflate(memoryview(buffer)[:count])
                    finally:
                        digest.give_back(buffer)
                received += count

    @contextlib.contextmanager
    def _decode_errors(self) -> Iterator[None]:
        try:
            yield
        except zlib.error as exc:
            raise DownloadError(f"corrupt gzip body: {exc}") from None

    def _write_raw(self, raw: bytes) -> None:
        if self._gunzip is None:
            if self._head is not None:
                self._check_head(raw)
            self.file.write(raw)
            self._digest.submit_bytes(raw)
            self.raw_bytes += len(raw)
        else:
            self._inflate(raw)

    def _write_plain(self, buffer: bytearray, count: int) -> None:
        filled = memoryview(buffer)[:count]
        if self._head is not None:
            self._check_head(filled)
        try:
            self.file.write(filled)
        except BaseException:
            filled.release()
            self._digest.give_back(buffer)
            raise
        filled.release()
        self._digest.submit(buffer, count)
        self.raw_bytes += count

    def _inflate(self, raw: bytes | memoryview) -> None:
        """Decode a piece of a gzip body and write what it holds."""
        gunzip = self._gunzip
        pending: bytes | memoryview = raw
        allowed = (self.raw_bytes + len(raw)) * self.max_gzip_ratio + _INFLATE_SLACK
        while pending:  # inflate in bounded pieces: a 1 MiB gzip read can hold 100 MiB
            self._write_decoded(gunzip.decompress(pending, _INFLATE_PIECE))
            pending = gunzip.unconsumed_tail
            if self.file.size > allowed:
                raise DownloadError(
                    f"the gzip body inflates more than {self.max_gzip_ratio:g} times its "
                    f"size; refused as a decompression bomb"
                )
        self.raw_bytes += len(raw)

    def _write_decoded(self, data: bytes) -> None:
        if data:
            if self._head is not None:
                self._check_head(data)
            self.file.write(data)
            self._digest.submit_bytes(data)

    def _check_head(self, data: bytes | memoryview, *, final: bool = False) -> None:
        assert self._head is not None
        head = self._head + bytes(data[: _HEADER_LIMIT])
        line, newline, _rest = head.partition(b"\n")
        if not newline and not final and len(head) < _HEADER_LIMIT:
            self._head = head
            return
        if not _HEADER_ROW.fullmatch(line):
            shown = line[:60].decode("utf-8", "replace")
            raise DownloadError(f"the body is not a cohort export (it starts {shown!r})")
        self._head = None
