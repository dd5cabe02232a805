"""iter_members: stream the rows of a downloaded cohort file in constant memory.

The real format: a header row, every field double-quoted, an empty ``user_id`` as ``""``,
group cohorts whose values carry a leading tab, one extra column per user property with
``props=1``, possibly gzip. Parsing runs in a worker thread a batch of rows at a time, so the
event loop only hands out ready dicts.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import itertools
import os
import zlib
from collections.abc import AsyncIterator, Iterator
from operator import methodcaller
from os import PathLike
from typing import IO

import anyio

from ._exceptions import InvalidRequestError, ResponseValidationError

__all__ = ("iter_members",)

_BATCH_BYTES = 128 << 10  # text per worker-thread hop: small batches keep the GC cheap
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
    """Parses a batch of rows at a time (in a worker thread).

    Fast path for the real format, a chunk at a time with C-level string operations: when
    every field of the chunk is quoted and no field holds a quote of its own (the count of
    quote characters is exactly two per field), records split on ``"\\n"`` and fields on
    ``","``, which is exact and about twice as fast as the csv module. Any other chunk
    (escaped quotes, CRLF, unquoted fields) goes through ``csv.reader``.
    """

    def __init__(self, path: str | PathLike[str]) -> None:
        self.text = _open_text(path)
        try:
            header = next(csv.reader(self.text), None)
        except BaseException:
            self.text.close()
            raise
        self.header = [_strip_tab(name) for name in header] if header else []
        self.tabbed: bool | None = None  # group cohorts: every value starts with a tab

    def _fast(self, chunk: str) -> list[dict[str, str]] | None:
        """Rows of a chunk in the plain all-quoted shape, or None to take the csv path.

        With no quote inside any field, the chunk holds exactly two quotes and ``width - 1``
        separators per record; rows are then built straight from the splits, so no list of
        fields outlives its row (which keeps the garbage collector out of the way).
        """
        width = len(self.header)
        if not (chunk.startswith('"') and chunk.endswith('"\n')) or "\r" in chunk:
            return None
        count = chunk.count('"\n"') + 1  # records, if no field holds a quote
        if chunk.count('"') != 2 * width * count or chunk.count('","') != (width - 1) * count:
            return None
        records = chunk[1:-2].split('"\n"')
        if self.tabbed is None:
            self._detect_tabs(records[0].split('","'))
        if self.tabbed:
            return None  # group cohorts: the csv path strips the tabs
        fields = map(methodcaller("split", '","'), records)
        rows = list(map(dict, map(zip, itertools.repeat(self.header), fields)))
        # A short record shows as a short dict (the counts above rule out a long one alone).
        return rows if set(map(len, rows)) == {width} else None

    def _detect_tabs(self, values: list[str]) -> None:
        present = [value for value in values if value]
        self.tabbed = bool(present) and all(value[:1] == "\t" for value in present)

    def _slow(self, lines: list[str]) -> list[list[str]]:
        done = False

        def feed() -> Iterator[str]:
            nonlocal done
            yield from lines
            done = True
            # Only to finish a record that spans the chunk's end. Not ``yield from self.text``:
            # closing this generator would then close the file too (PEP 380).
            yield from iter(self.text.readline, "")

        rows = []
        for row in csv.reader(feed()):
            if row:
                rows.append(row)
            if done:
                break
        return rows

    def batch(self) -> list[dict[str, str]]:
        lines = self.text.readlines(_BATCH_BYTES)
        if not lines:
            return []
        chunk = "".join(lines)
        fast = self._fast(chunk)
        if fast is not None:
            return fast
        rows: Iterator[list[str]]
        if chunk.count('"') % 2 == 0:
            # The chunk ends outside any quoted field, so it holds whole records: the csv
            # module parses it at C speed (blank lines dropped).
            rows = filter(None, csv.reader(lines))
        else:
            rows = iter(self._slow(lines))  # a record runs on past the chunk
        first = next(rows, None)
        if first is None:
            return self.batch()  # blank lines only
        if self.tabbed is None:
            self._detect_tabs(first)
        rows = itertools.chain([first], rows)
        if self.tabbed:
            rows = (list(map(_strip_tab, row)) for row in rows)
        # Rows go straight into dicts: no list of fields outlives its row.
        return list(map(dict, map(zip, itertools.repeat(self.header), rows)))

    def close(self) -> None:
        self.text.close()


async def iter_members(path: str | PathLike[str]) -> AsyncIterator[dict[str, str]]:
    """Async-iterate the rows of a downloaded cohort file as dicts keyed by the header.

    Constant memory (a batch of rows at a time), parsing in a worker thread. Breaking out of
    the loop early leaves the file to be closed when the iterator is finalised; call
    ``aclose()`` on it (or use ``contextlib.aclosing``) to close it at once.
    """
    name = checked_path(path)
    with unreadable_as_errors(name):
        reader = await anyio.to_thread.run_sync(_Reader, name)
    try:
        while True:
            with unreadable_as_errors(name):
                batch = await anyio.to_thread.run_sync(reader.batch)
            if not batch:
                break
            for row in batch:  # an async generator's yield is the cheapest per-row hand-off
                yield row
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(reader.close)


def checked_path(path: object) -> str:
    if not isinstance(path, str | PathLike):
        raise InvalidRequestError(f"path must be a file path, got {type(path).__name__}")
    name = os.fspath(path)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InvalidRequestError(f"path must be a non-empty text path, got {path!r}")
    return name


@contextlib.contextmanager
def unreadable_as_errors(name: str) -> Iterator[None]:
    """A file that cannot be read as a cohort export raises the library's errors.

    The path is the caller's argument (InvalidRequestError: missing, a directory, no access);
    the content is a file's (ResponseValidationError: not UTF-8, a truncated or corrupt gzip,
    a malformed CSV).
    """
    try:
        yield
    except FileNotFoundError:
        raise InvalidRequestError(f"no such file: {name}") from None
    except IsADirectoryError:
        raise InvalidRequestError(f"{name} is a directory, not a cohort file") from None
    except PermissionError as exc:
        raise InvalidRequestError(f"cannot read {name}: {exc.strerror}") from None
    except (UnicodeDecodeError, EOFError, zlib.error, csv.Error, OSError) as exc:
        # gzip.BadGzipFile is an OSError; EOFError: a gzip stream that stops early.
        reason = f"{type(exc).__name__}: {exc}"[:200]
        raise ResponseValidationError(f"{name} is not a readable cohort export ({reason})"
                                      ) from None
