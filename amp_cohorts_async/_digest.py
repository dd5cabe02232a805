"""sha256 and the line count of a body, in a thread of its own beside the one that writes it.

The thread that receives and writes each piece of a body hands it here, and this thread hashes
it and counts its line breaks (for ``DownloadResult.members``). ``hashlib`` releases the GIL
while it hashes, so the two threads run in parallel; only the count (when asked for) holds the
GIL. Measured with benchmarks/download.py's setup (177 MB, 2 cores shared with the server,
medians of 9 alternating runs): counting here after the hash 0.175-0.197 s per transfer over
three rounds, in the receiving thread or half in each no better (0.186-0.196 s), not counting at
all 0.146 s (curl -o: 0.148-0.151 s). The cores are saturated in that setup, so the count's CPU
time shows wherever it runs; hence ``DownloadPolicy.count_members``.

Pieces come two ways: buffers of a small pool that a blocking reader fills (``take`` /
``submit``; they come back to the pool once hashed) and bytes the writer made itself (a
decoded gzip piece, a batch of the async path: ``submit_bytes``). Either way at most ``depth``
pieces wait, so memory stays bounded and the receiver waits when this thread falls behind.
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


_Item = tuple[bytearray | bytes, int, bool] | threading.Event | None


class BackgroundDigest:
    """Hashes (and with ``count_lines`` counts the line breaks of) what is submitted, in order.

    Use as a context manager from the writing side: ``take()`` a pool buffer of ``size``
    bytes, fill it, ``submit()`` it; or ``submit_bytes()`` bytes of your own. ``drain()``
    waits until everything submitted is hashed. Leaving the block drains too, even when it is
    left by an exception, so ``hash`` and ``line_breaks`` always cover exactly what was
    submitted. A failure in this thread is raised on the writing side, never a hang.
    """

    def __init__(self, digest: _Hash, *, size: int, depth: int = 4,
                 count_lines: bool = True) -> None:
        self.hash = digest
        self.count_lines = count_lines
        self.line_breaks = 0
        self._size = size
        self._failure: BaseException | None = None
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._pool = depth
        self._made = 0
        self._loose = threading.BoundedSemaphore(depth)
        self._pending: queue.SimpleQueue[_Item] = queue.SimpleQueue()
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
        self._check()
        if self._made < self._pool and self._free.empty():
            self._made += 1  # buffers are made as they are first needed
            return bytearray(self._size)
        buffer = self._free.get()
        self._check()
        return buffer

    def submit(self, buffer: bytearray, filled: int) -> None:
        """Hash and count ``buffer[:filled]``, then return ``buffer`` to the pool."""
        self._pending.put((buffer, filled, True))

    def submit_bytes(self, data: bytes) -> None:
        """Hash and count ``data`` (waits while ``depth`` such pieces are still pending)."""
        self._check()
        self._loose.acquire()
        self._pending.put((data, len(data), False))

    def give_back(self, buffer: bytearray) -> None:
        """Return an unused buffer to the pool."""
        self._free.put(buffer)

    def drain(self) -> None:
        """Wait until everything submitted so far is hashed and counted."""
        done = threading.Event()
        self._pending.put(done)
        done.wait()
        self._check()

    def reset(self, digest: _Hash) -> None:
        """Start over with ``digest`` (after ``drain()``: nothing is pending)."""
        self.hash = digest
        self.line_breaks = 0

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failed() from self._failure

    def _failed(self) -> DownloadError:
        return DownloadError(f"the digest thread failed: {self._failure!r}")

    def _run(self) -> None:
        while (item := self._pending.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            data, filled, pooled = item
            if self._failure is None:
                try:
                    with memoryview(data) as view:
                        self.hash.update(view[:filled])
                    if self.count_lines:
                        self.line_breaks += data.count(b"\n", 0, filled)
                except BaseException as exc:  # handed to the writing side, raised there
                    self._failure = exc
            # Every piece goes back, failed or not, so the writing side never waits forever.
            if pooled:
                assert isinstance(data, bytearray)
                self._free.put(data)
            else:
                self._loose.release()
