"""iter_members: stream the rows of a downloaded cohort file in constant memory.

The real format: a header row, every field double-quoted, an empty ``user_id`` as ``""``,
group cohorts whose values carry a leading tab, one extra column per user property with
``props=1``, possibly gzip. Parsing runs in a worker thread a batch of rows at a time, so the
event loop only hands out ready dicts.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import os
from collections.abc import AsyncIterator
from os import PathLike
from typing import IO

import anyio

from ._exceptions import InvalidRequestError

__all__ = ("iter_members",)

_BATCH_ROWS = 20_000
_GZIP_MAGIC = b"\x1f\x8b"


def _open_text(path: str | PathLike[str]) -> IO[str]:
    with open(path, "rb") as probe:
        compressed = probe.read(2) == _GZIP_MAGIC
    if compressed:
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _strip_tab(value: str) -> str:
    return value[1:] if value[:1] == "\t" else value


class _Reader:
    def __init__(self, path: str | PathLike[str]) -> None:
        self.text = _open_text(path)
        self.rows = csv.reader(self.text)
        header = next(self.rows, None)
        self.header = [_strip_tab(name) for name in header] if header else []

    def batch(self) -> list[dict[str, str]]:
        header = self.header
        rows = list(itertools.islice(self.rows, _BATCH_ROWS))
        if not rows:
            return []
        # Group cohorts prefix every value with a tab; only then pay for stripping.
        if any(value[:1] == "\t" for value in rows[0]):
            return [dict(zip(header, map(_strip_tab, row), strict=False)) for row in rows]
        return [dict(zip(header, row, strict=False)) for row in rows]

    def close(self) -> None:
        self.text.close()


async def iter_members(path: str | PathLike[str]) -> AsyncIterator[dict[str, str]]:
    """Yield one ``dict`` per member of a downloaded cohort file, keyed by the header."""
    if not isinstance(path, str | PathLike) or not os.fspath(path):
        raise InvalidRequestError(f"path must be a file path, got {path!r}")
    try:
        reader = await anyio.to_thread.run_sync(_Reader, path)
    except FileNotFoundError:
        raise InvalidRequestError(f"no such file: {os.fspath(path)}") from None
    try:
        while batch := await anyio.to_thread.run_sync(reader.batch):
            for row in batch:
                yield row
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(reader.close)
