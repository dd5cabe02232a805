"""What the transfer sees of an answer with a body, whichever HTTP stack fetched it.

The boundary opens ``/file`` and presigned URLs; each answer is a ``Body``: its status and
headers, the redirect it points to, the error it means, and a way to pour it into a ``Sink``.
An httpx response pours its async stream in batches through worker threads; the threaded S3
leg pours with blocking reads inside one worker thread. Neither knows what the sink does with
the bytes, and the sink does not know where they come from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from ._exceptions import APIStatusError

__all__ = ("Body", "Sink")


class Sink(Protocol):
    """Where a body's raw bytes go; both methods block (called in a worker thread)."""

    def write_batch(self, chunks: list[bytes], /) -> None: ...

    def pump(self, read_into: Callable[[memoryview], int], /) -> int: ...


class Body(Protocol):
    status: int
    headers: Mapping[str, str]  # names in lower case

    def location(self) -> str | None:
        """The absolute URL a redirect points to (DownloadError if unusable); None otherwise."""
        ...

    async def error(self) -> APIStatusError:
        """The library's error for this (error) status, its body read."""
        ...

    async def pour_into(self, sink: Sink, report: Callable[[], None]) -> int:
        """Write the whole body into ``sink``, calling ``report()`` now and then on the loop;
        returns how many raw bytes arrived. A body that breaks raises a TransportError after
        every byte that arrived was written."""
        ...
