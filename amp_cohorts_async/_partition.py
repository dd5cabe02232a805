"""One export's keyed rows, spread over run files on disk by a hash of the key.

The half of ``diff_members`` that reads. Each row goes to run ``hash(key) % runs`` as two
``bytes``: its key, as ``iter_members`` reads it (UTF-8), and its line, to be written out
unchanged should the member turn out to be entering or exiting.

Two ways through a file, each reading it once:

- **Lines as they are**, for the rows Amplitude writes: every value quoted, as many values
  as the header has, none holding a quote or a line break. A block of ~1 MiB of whole lines
  is split at every quote (one C call): the values are every other piece, and the pieces
  between them must be exactly a comma between two values of a row and a line end after its
  last, or the block is not taken this way. No row becomes a list and no line is parsed in
  Python; ``splitlines`` gives the lines.
- **csv.reader**, for any CSV that ``iter_members`` reads (``strict`` as there), from the
  first block that is not plain on (a value with a quote or a line break, an unquoted or
  missing value, a blank line): each row is written back as a line with every value quoted.

Profiled before (cProfile, two 2M-member exports): of 6.3 s, 3.8 s went to the partition
loop over ``csv.reader``'s rows (a list per row) and 1.5 s to ``marshal`` of those lists and
back. A block's keys and lines now go to a run joined (keys by line breaks, which the keys
read this way cannot hold; lines as they were) and come back with ``split`` and
``splitlines``, at C speed; the loop that hashes each key and appends its row to its run is
most of what is left in Python.

A record in a run file: a kind byte (``F``: those joined blobs; ``M``: marshalled lists, for
rows the csv way read, whose keys and lines may hold line breaks), then its two blobs, each
with its length in front.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import itertools
import marshal
import pathlib
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import countOf, itemgetter
from typing import IO

import attrs

from ._exceptions import InvalidRequestError
from ._members import _GZIP_MAGIC, _strip_tabs, is_tabbed, unreadable_as_errors

__all__ = ("Partitioner", "Side", "read_run")

_BLOCK = 1 << 20  # bytes read at a time; a block is cut at its last line break
_READ_ROWS = 512  # csv.reader rows between two looks at cancellation (see _members)
_FLUSH_ROWS = 1 << 16  # rows held before they are written to the runs (~10 MiB)
_LENGTH = 4  # bytes of a blob's length
_BOM = b"\xef\xbb\xbf"
_Binary = gzip.GzipFile | io.BufferedReader  # an export opened for reading as bytes


@attrs.define
class Side:
    """One export as partitioned: its header as written, where its key is, whether it is a
    group cohort's (every value behind a tab), and the rows without a key."""

    header: list[str] | None = None
    key_index: int = 0
    tabbed: bool = False
    no_key: int = 0


def _open_binary(path: str) -> _Binary:
    with open(path, "rb") as probe:
        compressed = probe.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def key_index(header: list[str], key: str, name: str) -> int:
    columns = _strip_tabs(header)
    if key not in columns:
        shown = ", ".join(columns[:10])
        raise InvalidRequestError(f"{name} has no {key!r} column (its columns: {shown})")
    # The last column of that name, as iter_members's dict per row keeps the last value.
    return len(columns) - 1 - columns[::-1].index(key)


def _quoted_line(row: list[str]) -> bytes:
    """A row as csv.writer writes it with QUOTE_ALL and a "\\n" line end."""
    return ('"' + '","'.join([value.replace('"', '""') for value in row]) + '"\n').encode()


def _record(kind: bytes, keys_blob: bytes, lines_blob: bytes) -> bytes:
    return b"".join((kind, len(keys_blob).to_bytes(_LENGTH, "little"), keys_blob,
                     len(lines_blob).to_bytes(_LENGTH, "little"), lines_blob))


def read_run(path: pathlib.Path) -> tuple[list[bytes], list[bytes]]:
    """A run file's keys and lines, in the order they were written."""
    data = path.read_bytes()
    keys: list[bytes] = []
    lines: list[bytes] = []
    position = 0
    while position < len(data):
        kind = data[position:position + 1]
        position += 1
        blobs = []
        for _ in range(2):
            size = int.from_bytes(data[position:position + _LENGTH], "little")
            position += _LENGTH
            blobs.append(data[position:position + size])
            position += size
        if kind == b"F":
            keys += blobs[0].split(b"\n")
            lines += blobs[1].splitlines(keepends=True)
        else:
            keys += marshal.loads(blobs[0])
            lines += marshal.loads(blobs[1])
    return keys, lines


class _Runs:
    """Rows waiting for their run file, written ``_FLUSH_ROWS`` at a time, one write per run.

    Keeping a row's key costs an append and a join here, and a split when the run is read:
    less than finding it again in the line then (measured: 0.3 s more over 4M rows).
    """

    def __init__(self, files: Sequence[IO[bytes]]) -> None:
        self.files = files
        self.keys: list[list[bytes]] = [[] for _ in files]
        self.lines: list[list[bytes]] = [[] for _ in files]
        self.add_key = [bucket.append for bucket in self.keys]
        self.add_line = [bucket.append for bucket in self.lines]
        self.run_of = len(files).__rmod__  # hash -> run, at C speed through map()
        self.held = 0
        self.kind = b"F"

    def add(self, keys: list[bytes], lines: list[bytes]) -> None:
        add_key, add_line = self.add_key, self.add_line
        for key, line, run in zip(keys, lines, map(self.run_of, map(hash, keys)), strict=True):
            add_key[run](key)
            add_line[run](line)
        self.held += len(keys)
        if self.held >= _FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        for keys, lines, file in zip(self.keys, self.lines, self.files, strict=True):
            if not keys:
                continue
            if self.kind == b"F":
                file.write(_record(b"F", b"\n".join(keys), b"".join(lines)))
            else:
                file.write(_record(b"M", marshal.dumps(keys), marshal.dumps(lines)))
            keys.clear()
            lines.clear()
        self.held = 0

    def as_csv_rows(self) -> None:
        """From now on keys and lines may hold line breaks: marshalled records."""
        self.flush()
        self.kind = b"M"


class Partitioner:
    """Spreads one export's keyed rows over ``runs`` files by a hash of the key."""

    def __init__(self, directory: pathlib.Path, runs: int,
                 check_cancelled: Callable[[], None]) -> None:
        self.directory = directory
        self.runs = runs
        self.check_cancelled = check_cancelled

    def run_path(self, side: str, index: int) -> pathlib.Path:
        return self.directory / f"{side}{index}"

    def partition(self, source: str, side_name: str, key: str) -> Side:
        side = Side()
        with unreadable_as_errors(source):
            stream = _open_binary(source)
        with stream, contextlib.ExitStack() as stack:
            # Unbuffered: each write is a whole record of a flush.
            runs = _Runs([stack.enter_context(open(self.run_path(side_name, i), "xb",
                                                   buffering=0))
                          for i in range(self.runs)])
            with unreadable_as_errors(source):
                resume_at = self._lines(stream, source, key, side, runs)
                if resume_at is not None:
                    runs.as_csv_rows()
                    self._csv_rows(stream, resume_at, source, key, side, runs)
            runs.flush()
        return side

    # -- lines as they are ----------------------------------------------------------------
    def _lines(self, stream: _Binary, source: str, key: str, side: Side, runs: _Runs
               ) -> int | None:
        """Partition line by line while every block's lines match; the offset of the block
        where they stop matching (None at the end of the file)."""
        started = False
        offset = 0  # of ``pending`` in the (decompressed) stream
        pending = b""
        while True:
            self.check_cancelled()
            data = stream.read(_BLOCK)
            block = pending + data
            if not data:  # the end: its last line may lack its line break
                if not block:
                    return None
                if not block.endswith(b"\n"):
                    block += b"\n"
                cut = len(block)
            else:
                cut = block.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block so far
                    pending = block
                    continue
            lines, pending = block[:cut], block[cut:]
            skipped = 0
            if not started:
                skipped = self._head(lines, source, key, side, at_end=not data)
                if skipped < 0:
                    return offset
                started = True
            if not self._block(lines[skipped:] if skipped else lines, side, runs):
                return offset + skipped
            offset += cut
            if not data:
                return None

    def _head(self, lines: bytes, source: str, key: str, side: Side, *, at_end: bool
              ) -> int:
        """Read the header (and whether the first row is a group cohort's) from the first
        block; the bytes they take, or -1 when this block is not plain enough to say."""
        start = len(_BOM) if lines.startswith(_BOM) else 0
        end = lines.find(b"\n", start) + 1
        if lines[start:start + 1] in (b"\r", b"\n"):
            return -1  # blank lines first: the csv way drops them as iter_members does
        header = _one_record(lines[start:end])
        if header is None:
            return -1
        first_row = lines[end:lines.find(b"\n", end) + 1]
        if not first_row and not at_end:
            return -1  # a header as long as a block: the first row is in the next one
        row = _one_record(first_row) if first_row else []
        if row is None:
            return -1
        side.header = header
        side.key_index = key_index(header, key, source)
        side.tabbed = is_tabbed(row)
        return end

    def _block(self, lines: bytes, side: Side, runs: _Runs) -> bool:
        """Partition a block of whole lines if each is a row of quoted values, as many as
        the header has, none holding a quote or a line break."""
        assert side.header is not None  # _head read it
        width = len(side.header)
        count = lines.count(b"\n")
        line_end = b"\n"
        if b"\r" in lines:  # CRLF line ends, and no other \r
            if lines.count(b"\r\n") != count or lines.count(b"\r") != count:
                return False
            line_end = b"\r\n"
        if not lines.isascii():
            lines.decode()  # UTF-8 or an error, as iter_members reads it
        # Split at every quote: values at odd places, and between them, if the lines are
        # such rows, exactly a comma between two values of a row and a line end after its
        # last (no line break inside a value then: all of them are line ends).
        pieces = lines.split(b'"')
        if len(pieces) != 2 * width * count + 1:
            return False
        if pieces[0::2] != [b"", *([b","] * (width - 1) + [line_end]) * count]:
            return False
        keys = pieces[1::2][side.key_index::width]
        if side.tabbed:  # a group cohort's key without its tab, as iter_members reads it
            keys = list(map(bytes.removeprefix, keys, repeat(b"\t")))
        rows = lines.splitlines(keepends=True)
        empty = countOf(keys, b"")
        if empty:
            side.no_key += empty
            rows = list(itertools.compress(rows, keys))
            keys = list(filter(None, keys))
        runs.add(keys, rows)
        return True

    # -- csv.reader -------------------------------------------------------------------------
    def _csv_rows(self, stream: _Binary, offset: int, source: str, key: str, side: Side,
                  runs: _Runs) -> None:
        stream.seek(offset)
        text = io.TextIOWrapper(stream, encoding="utf-8-sig" if offset == 0 else "utf-8",
                                newline="")
        try:
            reader = filter(None, csv.reader(text, strict=True))  # blank lines dropped
            first_batch = side.header is None
            if first_batch:
                side.header = next(reader, None)
                if side.header is None:
                    return
                side.key_index = key_index(side.header, key, source)
            index = side.key_index
            while rows := list(itertools.islice(reader, _READ_ROWS)):
                self.check_cancelled()
                if first_batch:
                    side.tabbed = is_tabbed(rows[0])
                    first_batch = False
                keys = _keys(rows, index, side.tabbed)
                if "" in keys:
                    keyed = [(row, value) for row, value in zip(rows, keys, strict=True)
                             if value]
                    side.no_key += len(rows) - len(keyed)
                    rows = [row for row, _ in keyed]
                    keys = [value for _, value in keyed]
                runs.add([value.encode() for value in keys], list(map(_quoted_line, rows)))
        finally:
            text.detach()  # the stream is closed by its owner


def _one_record(line: bytes) -> list[str] | None:
    """The record on this one line, or None if it does not end there (a quoted line break)."""
    try:
        rows = list(csv.reader([line.decode()], strict=True))
    except csv.Error:
        return None
    return rows[0] if len(rows) == 1 and rows[0] else None


def _keys(rows: list[list[str]], index: int, tabbed: bool) -> list[str]:
    """Each row's key as iter_members reads it; "" for a row too short to have one."""
    try:
        values = list(map(itemgetter(index), rows))
    except IndexError:
        values = [row[index] if len(row) > index else "" for row in rows]
    if tabbed:
        return [value[1:] if value[:1] == "\t" else value for value in values]
    return values
