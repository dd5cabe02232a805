"""Reading a downloaded cohort file as typed Arrow record batches (the ``arrow`` extra).

pyarrow's own streaming CSV reader (C++) parses the file and Arrow compute cleans it, so no
value ever becomes a Python object: ``amplitude_id`` is cast to int64, every other column stays
a string, an empty value is null, and a group cohort's leading tabs are sliced off. Columns
keep the file's order and names (tabs stripped), as ``iter_members`` gives them.

Everything that touches pyarrow runs in a worker thread, one hop per batch, so the event loop
only receives finished batches and never parses: the hop costs microseconds against the
milliseconds a 65,536-row batch takes to parse.

pyarrow is imported when the first batch is asked for, not when the package is, so the core
install imports without it.
"""

from __future__ import annotations

import collections
import io
from collections.abc import AsyncIterator
from os import PathLike
from typing import TYPE_CHECKING, Any, cast

import anyio

from ._exceptions import InvalidRequestError
from ._members import first_record, is_tabbed, unreadable_as_errors
from ._validate import text_path

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.csv as pa_csv

__all__ = ("iter_arrow_batches",)

_GZIP_MAGIC = b"\x1f\x8b"
_MAX_BATCH_ROWS = 1 << 24
_INSTALL_HINT = "iter_arrow_batches needs pyarrow: pip install 'amp-cohorts-async[arrow]'"


def _require_pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return pyarrow


class TruncatedExport(ValueError):
    """The file ends inside a quoted field: a truncated copy (a ResponseValidationError)."""


class _QuoteCounter(io.RawIOBase):
    """The file as the CSV reader reads it, counting its double quotes on the way.

    pyarrow's reader takes a quoted field that the end of the file cuts off (a truncated copy)
    for a whole value; ``csv.reader(strict=True)`` and so ``iter_members`` refuse it. Every
    quote opens or closes a field or is half of an escaped pair, so the file ends inside a
    field exactly when the count is odd. Counting is ``bytes.count`` once per 1 MiB block.
    """

    def __init__(self, source: pa.NativeFile) -> None:
        super().__init__()
        self._source = source
        self._count = 0

    @property
    def inside_a_field(self) -> bool:
        return self._count % 2 == 1

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(None if size < 0 else size)
        self._count += data.count(b'"')
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _BatchReader:
    """Blocking: the file's members as cleaned record batches of exactly ``batch_rows`` rows
    (the last one shorter). Each method runs in a worker thread."""

    def __init__(self, path: str, batch_rows: int) -> None:
        import pyarrow as pa

        self._batch_rows = batch_rows
        self._pending: collections.deque[pa.RecordBatch] = collections.deque()
        self._pending_rows = 0
        self._tabbed: bool | None = None  # decided on the first row, as iter_members does
        self._reader: pa_csv.CSVStreamingReader | None = None
        header = first_record(path)
        if header is None:  # an empty file: no header, no members
            self._names: list[str] = []
            self._source: pa.NativeFile | None = None
            return
        self._names = [name[1:] if name[:1] == "\t" else name for name in header]
        with open(path, "rb") as probe:
            compressed = probe.read(2) == _GZIP_MAGIC
        source: pa.NativeFile = pa.OSFile(path, "r")
        if compressed:
            source = pa.CompressedInputStream(source, "gzip")
        self._quotes = _QuoteCounter(source)
        self._source = source
        try:
            self._reader = _open_csv(pa.PythonFile(self._quotes, mode="r"), header)
        except BaseException:
            source.close()
            raise

    def next_batch(self) -> pa.RecordBatch | None:
        """The next batch, or None at the end of the file."""
        while self._reader is not None and self._pending_rows < self._batch_rows:
            try:
                raw = self._reader.read_next_batch()
            except StopIteration:
                self._reader = None
                if self._quotes.inside_a_field:
                    raise TruncatedExport("a quoted field is cut off by the end of the file"
                                          ) from None
                break
            if raw.num_rows:
                self._pending.append(self._clean(raw))
                self._pending_rows += raw.num_rows
        if not self._pending_rows:
            return None
        return self._take(min(self._batch_rows, self._pending_rows))

    def close(self) -> None:
        self._reader = None
        if self._source is not None:
            self._source.close()

    def _take(self, rows: int) -> pa.RecordBatch:
        import pyarrow as pa

        first = self._pending[0]
        if first.num_rows >= rows:  # a slice: no copy
            taken = first.slice(0, rows)
            if first.num_rows == rows:
                self._pending.popleft()
            else:
                self._pending[0] = first.slice(rows)
        else:
            pieces, needed = [], rows
            while needed:
                piece = self._pending.popleft()
                if piece.num_rows > needed:
                    self._pending.appendleft(piece.slice(needed))
                    piece = piece.slice(0, needed)
                pieces.append(piece)
                needed -= piece.num_rows
            combined = pa.Table.from_batches(pieces).combine_chunks()
            taken = combined.to_batches()[0]
        self._pending_rows -= rows
        return taken

    def _clean(self, raw: pa.RecordBatch) -> pa.RecordBatch:
        import pyarrow as pa
        import pyarrow.compute as pc

        columns = raw.columns
        if self._tabbed is None:
            self._tabbed = is_tabbed([column[0].as_py() for column in columns])
        if self._tabbed:
            columns = [_without_leading_tab(column) for column in columns]
        if "amplitude_id" in self._names:
            at = self._names.index("amplitude_id")
            columns[at] = pc.cast(columns[at], pa.int64())
        return pa.RecordBatch.from_arrays(columns, names=self._names)


def _open_csv(source: pa.NativeFile, header: list[str]) -> pa_csv.CSVStreamingReader:
    # pyarrow's default 1 MiB blocks (~25,000 rows of an id and an e-mail address): bigger
    # blocks parsed slower on 2 cores (4 MiB: 1.05x, 16 MiB: 1.3x the time over 2M rows),
    # and joining the pieces of a 65,536-row batch costs less than that.
    import pyarrow as pa
    import pyarrow.csv as csv

    return csv.open_csv(
        cast(Any, source),  # a NativeFile; the stubs know only Python file objects
        parse_options=csv.ParseOptions(newlines_in_values=True),
        # Strings first, for every column: a group cohort's values carry a tab that must go
        # before amplitude_id could parse, and no column's type is left to inference.
        convert_options=csv.ConvertOptions(
            column_types={name: pa.string() for name in header},
            # Only the empty value is null: "NA", "null" or "NaN" may be someone's user id.
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )


def _without_leading_tab(column: pa.Array[Any]) -> pa.Array[Any]:
    """Slice one leading tab off each value; a value that was only a tab becomes null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    stripped = pc.if_else(pc.starts_with(column, "\t"), pc.utf8_slice_codeunits(column, 1),
                          column)
    empty = pc.equal(stripped, pa.scalar("", pa.string()))
    return cast("pa.Array[Any]", pc.if_else(empty, pa.scalar(None, pa.string()), stripped))


def _check_batch_rows(batch_rows: Any) -> int:
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or not (
        1 <= batch_rows <= _MAX_BATCH_ROWS
    ):
        raise InvalidRequestError(f"batch_rows must be an int from 1 to {_MAX_BATCH_ROWS:,}, "
                                  f"got {batch_rows!r}")
    return batch_rows


async def iter_arrow_batches(
    path: str | PathLike[str], *, batch_rows: int = 65_536
) -> AsyncIterator[pa.RecordBatch]:
    """Async-iterate a downloaded cohort file as ``pyarrow.RecordBatch`` es of at most
    ``batch_rows`` rows (every batch but the last has exactly that many).

    Columns in file order, cleaned as ``iter_members`` cleans them: ``amplitude_id`` as
    ``pa.int64()``, every other column as ``pa.string()``, an empty value as null. Needs the
    ``arrow`` extra. A missing or unreadable path raises ``InvalidRequestError``; content that
    is not a readable export (not UTF-8, a broken gzip, a malformed CSV, an ``amplitude_id``
    that is not an integer) raises ``ResponseValidationError``, even after batches were
    yielded. Breaking out early closes the file when the iterator is finalised;
    ``contextlib.aclosing`` closes it at once.
    """
    name = text_path(path, "path")
    rows = _check_batch_rows(batch_rows)
    pa_module = _require_pyarrow()
    content_errors = (pa_module.ArrowInvalid, TruncatedExport)
    with unreadable_as_errors(name, content_errors):
        reader = await anyio.to_thread.run_sync(_BatchReader, name, rows)
    try:
        while True:
            with unreadable_as_errors(name, content_errors):
                batch = await anyio.to_thread.run_sync(reader.next_batch)
            if batch is None:
                return
            yield batch
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(reader.close)
