"""sha256 and the line count of a body, in a thread of its own beside the one that writes it.

On the threaded S3 leg one thread receives and writes each buffer while this one hashes it
and counts its line breaks (for ``DownloadResult.members``). ``hashlib`` releases the GIL while
it hashes, so the two threads run in parallel; only the count (when asked for) holds the GIL.
Measured with benchmarks/download.py's setup (177 MB, 2 cores shared with the server, medians
of 9 alternating runs): counting here after the hash 0.175-0.197 s per transfer over three
rounds, in the receiving thread or half in each no better (0.186-0.196 s), not counting at
all 0.146 s (curl -o: 0.148-0.151 s). The cores are saturated in that setup, so the count's
CPU time shows wherever it runs; hence ``DownloadPolicy.count_members``.

The buffers cycle through a small pool, so memory stays at ``depth`` buffers and the receiver
waits when this thread falls behind.
"""

from __future__ import annotations

import queue
import threading
from types import TracebackType
from typing import Any, Protocol

from ._exceptions import DownloadError

__all__ = ("BackgroundDigest",)


class _Hash(Protocol):
    def update(self, data: Any, /) -> None: ...


class BackgroundDigest:
    """A pool of ``depth`` buffers of ``size`` bytes; what is submitted is hashed (and its line
    breaks counted with ``count_lines``).

    Use as a context manager from one (blocking) thread: ``take()`` a buffer, fill it,
    ``submit()`` it with the number of bytes filled. Leaving the block waits until every
    submitted byte is hashed and counted, even when it is left by an exception, so
    ``hash`` and ``line_breaks`` always cover exactly what was submitted.
    """

    def __init__(self, digest: _Hash, *, size: int, depth: int = 4,
                 count_lines: bool = True) -> None:
        self.hash = digest
        self.count_lines = count_lines
        self.line_breaks = 0
        self._failure: BaseException | None = None
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(bytearray(size))
        self._pending: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="amp-digest", daemon=True)

    def __enter__(self) -> BackgroundDigest:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._pending.put(None)
        self._thread.join()
        if self._failure is not None and exc_type is None:
            raise self._failed() from self._failure

    def take(self) -> bytearray:
        """A free buffer (waits while all of them are still being hashed)."""
        buffer = self._free.get()
        if buffer is None:  # the digest thread failed: no buffer will ever come back
            self._free.put(None)
            raise self._failed() from self._failure
        return buffer

    def _failed(self) -> DownloadError:
        return DownloadError(f"the digest thread failed: {self._failure!r}")

    def submit(self, buffer: bytearray, filled: int) -> None:
        """Hash and count ``buffer[:filled]``, then return ``buffer`` to the pool."""
        self._pending.put((buffer, filled))

    def give_back(self, buffer: bytearray) -> None:
        """Return an unused buffer to the pool."""
        self._free.put(buffer)

    def _run(self) -> None:
        try:
            while (item := self._pending.get()) is not None:
                buffer, filled = item
                with memoryview(buffer) as view:
                    self.hash.update(view[:filled])
                if self.count_lines:
                    self.line_breaks += buffer.count(b"\n", 0, filled)
                self._free.put(buffer)
        except BaseException as exc:  # handed to the receiving thread, raised there
            # The receiver may be waiting for a buffer that will never come back: wake it.
            self._failure = exc
            self._free.put(None)
