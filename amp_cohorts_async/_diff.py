"""diff_members: who entered and who left between two exports, in memory that does not grow.

Knows files, not HTTP. Two exports of up to 2M members are neither sorted nor small, so the
diff never holds a whole file: each file is read once, with ``csv.reader`` as ``iter_members``
reads it (gzip detected, a group cohort's leading tabs ignored in the key, blank lines
dropped), and its rows are partitioned by a hash of the key into runs on disk, sized so that
one run of each file fits in a few MiB. Then run ``i`` of the old file is compared with run
``i`` of the new one: their key sets give the counts, and the rows whose key is only on one
side are written out, as the export had them (raw values, every field quoted).

Runs hold batches of rows as ``marshal`` records (length-prefixed): written and read back at
several times ``csv``'s speed. They are this process's own temp files in a private directory
(``mkdtemp``: mode 0700), removed when the diff ends, fails or is cancelled.

A member is a distinct key: a key repeated within one file is one member, and its first row
is the one written. Rows whose key is empty (a member without a user id) or missing (a short
row) are counted in ``no_key`` and not compared.

Everything runs in one worker thread, off the event loop; it looks for cancellation between
batches, so a cancelled diff stops within a batch and leaves no temp file behind.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools
import marshal
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from os import PathLike
from typing import IO, Any

import attrs

from ._background import run_stoppable
from ._exceptions import InvalidRequestError
from ._files import disk_errors, fsync_directory, make_directory
from ._members import _open_text, _strip_tabs, is_tabbed, unreadable_as_errors
from ._validate import require_text, text_path

__all__ = ("ENTERING_NAME", "EXITING_NAME", "MembershipDiff", "diff_members")

ENTERING_NAME = "entering.csv"
EXITING_NAME = "exiting.csv"

# Rows parsed between two looks at cancellation and two flushes of the bucket buffers: few
# enough rows alive at once that the cyclic garbage collector does not wake for them often.
_READ_ROWS = 512
_FLUSH_EVERY = 16  # read batches per flush: ~8k rows spread over the runs
# About this many bytes of export (both files together) per run: one run of each side, as
# Python objects, then takes a few tens of MiB at most.
_RUN_BYTES = 2 << 20
_MAX_RUNS = 512  # open files while partitioning one export; below the usual limit of 1024
_GZIP_RATIO_GUESS = 4  # when a gzip trailer under-reports (past 4 GiB, or several members)
_RECORD_HEADER = 4
_IO_BUFFER = 64 << 10  # per run file; bigger writes than the default 8 KiB


@attrs.frozen(kw_only=True)
class MembershipDiff:
    """What changed between two exports of a cohort, by ``key``.

    ``entering_path`` holds the header of the new export and the rows of the members only in
    it; ``exiting_path`` the header of the old export and the rows of the members only in it.
    ``entering``, ``exiting`` and ``unchanged`` count members (distinct keys); ``no_key``
    counts the rows of either file whose key is empty or missing, which are not compared.
    """

    entering_path: pathlib.Path
    exiting_path: pathlib.Path
    entering: int
    exiting: int
    unchanged: int
    no_key: int
    key: str


@attrs.define
class _Side:
    """One export as partitioned: its raw header and where its key is."""

    header: list[str] | None = None
    key_index: int = 0
    tabbed: bool = False
    no_key: int = 0


def _estimated_text_bytes(path: str) -> int:
    """The export's size as text: a gzip file's trailer states it (modulo 4 GiB)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        if file.read(2) != b"\x1f\x8b" or size < 18:
            return size
        file.seek(-4, os.SEEK_END)
        stated = int.from_bytes(file.read(4), "little")
    return max(stated, size * _GZIP_RATIO_GUESS)


def _key_index(header: list[str], key: str, name: str) -> int:
    columns = _strip_tabs(header)
    if key not in columns:
        shown = ", ".join(columns[:10])
        raise InvalidRequestError(f"{name} has no {key!r} column (its columns: {shown})")
    # The last column of that name, as iter_members's dict per row keeps the last value.
    return len(columns) - 1 - columns[::-1].index(key)


def _write_record(file: IO[bytes], keys: list[str], rows: list[list[str]]) -> None:
    """A record: the keys, then the rows, each a length-prefixed marshal blob.

    Keys apart from rows let the comparison read a run's keys without its rows.
    """
    for blob in (marshal.dumps(keys), marshal.dumps(rows)):
        file.write(len(blob).to_bytes(_RECORD_HEADER, "little"))
        file.write(blob)


def _read_blob(file: IO[bytes], *, skip: bool = False) -> Any:
    """The next blob (``None`` at the end of the file, or when skipped)."""
    header = file.read(_RECORD_HEADER)
    if not header:
        return None
    size = int.from_bytes(header, "little")
    if skip:
        file.seek(size, os.SEEK_CUR)
        return None
    return marshal.loads(file.read(size))


def _read_keys(path: pathlib.Path) -> Iterator[list[str]]:
    """Each record's keys, its rows skipped."""
    with open(path, "rb", buffering=_IO_BUFFER) as file:
        while (keys := _read_blob(file)) is not None:
            yield keys
            _read_blob(file, skip=True)


class _Partitioner:
    """Spreads one export's keyed rows over ``runs`` files by a hash of the key."""

    def __init__(self, directory: pathlib.Path, runs: int,
                 check_cancelled: Callable[[], None]) -> None:
        self.directory = directory
        self.runs = runs
        self.check_cancelled = check_cancelled

    def run_path(self, side: str, index: int) -> pathlib.Path:
        return self.directory / f"{side}{index}"

    def partition(self, source: str, side_name: str, key: str) -> _Side:
        side = _Side()
        with unreadable_as_errors(source):
            text = _open_text(source)
        with text, contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(self.run_path(side_name, i), "xb",
                                              buffering=_IO_BUFFER))
                     for i in range(self.runs)]
            self._spread(text, source, key, side, files)
        return side

    def _spread(self, text: IO[str], source: str, key: str, side: _Side,
                files: Sequence[IO[bytes]]) -> None:
        runs = self.runs
        key_buckets: list[list[str]] = [[] for _ in range(runs)]
        row_buckets: list[list[list[str]]] = [[] for _ in range(runs)]
        add_key = [bucket.append for bucket in key_buckets]
        add_row = [bucket.append for bucket in row_buckets]
        run_of = runs.__rmod__  # hash -> run, at C speed through map()
        with unreadable_as_errors(source):
            reader = filter(None, csv.reader(text))  # blank lines dropped, as iter_members does
            side.header = next(reader, None)
        if side.header is None:
            return
        side.key_index = index = _key_index(side.header, key, source)
        for batch_number in itertools.count(1):
            self.check_cancelled()
            with unreadable_as_errors(source):
                rows = list(itertools.islice(reader, _READ_ROWS))
            if batch_number == 1 and rows:
                side.tabbed = is_tabbed(rows[0])
            exhausted = not rows
            keys = _keys(rows, index, side.tabbed)
            if "" in keys:
                keyed = [(row, value) for row, value in zip(rows, keys, strict=True) if value]
                side.no_key += len(rows) - len(keyed)
                rows = [row for row, _ in keyed]
                keys = [value for _, value in keyed]
            for row, value, run in zip(rows, keys, map(run_of, map(hash, keys)), strict=True):
                add_key[run](value)
                add_row[run](row)
            if exhausted or batch_number % _FLUSH_EVERY == 0:
                for keys_of_run, rows_of_run, file in zip(key_buckets, row_buckets, files,
                                                          strict=True):
                    if keys_of_run:
                        _write_record(file, keys_of_run, rows_of_run)
                        keys_of_run.clear()
                        rows_of_run.clear()
            if exhausted:
                return


def _keys(rows: list[list[str]], index: int, tabbed: bool) -> list[str]:
    """Each row's key as iter_members reads it; "" for a row too short to have one."""
    try:
        values = list(map(itemgetter(index), rows))
    except IndexError:
        values = [row[index] if len(row) > index else "" for row in rows]
    if tabbed:
        return [value[1:] if value[:1] == "\t" else value for value in values]
    return values


class _Comparison:
    """Run by run: counts, and the rows of each side's own members written out."""

    def __init__(self, partitioner: _Partitioner, entering: Any, exiting: Any) -> None:
        self.partitioner = partitioner
        self.entering_writer = entering
        self.exiting_writer = exiting
        self.entering = self.exiting = self.unchanged = 0

    def compare_all(self) -> None:
        for index in range(self.partitioner.runs):
            self.partitioner.check_cancelled()
            self._compare(index)

    def _compare(self, index: int) -> None:
        old_path = self.partitioner.run_path("old", index)
        new_path = self.partitioner.run_path("new", index)
        old_set = set(itertools.chain.from_iterable(_read_keys(old_path)))
        new_set = set(itertools.chain.from_iterable(_read_keys(new_path)))
        only_new = new_set - old_set
        only_old = old_set - new_set
        self.unchanged += len(new_set) - len(only_new)
        self.entering += len(only_new)
        self.exiting += len(only_old)
        _write_own_rows(new_path, only_new, self.entering_writer)
        _write_own_rows(old_path, only_old, self.exiting_writer)


def _write_own_rows(path: pathlib.Path, wanted: set[str], writer: Any) -> None:
    """The first row of each key in ``wanted`` (which it empties), in the run's file order."""
    if not wanted:
        return
    with open(path, "rb", buffering=_IO_BUFFER) as file:
        while wanted and (keys := _read_blob(file)) is not None:
            if wanted.isdisjoint(keys):
                _read_blob(file, skip=True)
                continue
            rows: list[list[str]] = _read_blob(file)
            chosen = list(map(wanted.__contains__, keys))
            for value, row in zip(itertools.compress(keys, chosen),
                                  itertools.compress(rows, chosen), strict=True):
                if value in wanted:  # a key repeated in the file: its first row only
                    wanted.discard(value)
                    writer.writerow(row)


def _run_count(old: str, new: str) -> int:
    with unreadable_as_errors(old):
        old_bytes = _estimated_text_bytes(old)
    with unreadable_as_errors(new):
        new_bytes = _estimated_text_bytes(new)
    return max(1, min(_MAX_RUNS, (old_bytes + new_bytes) // _RUN_BYTES))


def _compare_into(work: pathlib.Path, partitioner: _Partitioner, old: _Side, new: _Side
                  ) -> _Comparison:
    """Compare the runs, writing both output files complete (fsynced) inside ``work``."""
    with open(work / ENTERING_NAME, "x", encoding="utf-8", newline="") as entering_file, \
            open(work / EXITING_NAME, "x", encoding="utf-8", newline="") as exiting_file:
        entering = csv.writer(entering_file, quoting=csv.QUOTE_ALL, lineterminator="\n")
        exiting = csv.writer(exiting_file, quoting=csv.QUOTE_ALL, lineterminator="\n")
        # A file without even a header has no members; its output takes the other's header.
        for writer, header in ((entering, new.header or old.header),
                               (exiting, old.header or new.header)):
            if header is not None:
                writer.writerow(header)
        comparison = _Comparison(partitioner, entering, exiting)
        comparison.compare_all()
        for file in (entering_file, exiting_file):
            file.flush()
            os.fsync(file.fileno())
    return comparison


def _diff_blocking(old: str, new: str, out_dir: pathlib.Path, key: str,
                   check_cancelled: Callable[[], None]) -> MembershipDiff:
    runs = _run_count(old, new)
    try:
        work = pathlib.Path(tempfile.mkdtemp(prefix=".amp-diff-", dir=out_dir))
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot write in out_dir {out_dir}: {exc.strerror or exc}") from None
    entering_path, exiting_path = out_dir / ENTERING_NAME, out_dir / EXITING_NAME
    # Reading errors are mapped where the exports are read; what is left is the disk's.
    try:
        with disk_errors(out_dir):
            partitioner = _Partitioner(work, runs, check_cancelled)
            old_side = partitioner.partition(old, "old", key)
            new_side = partitioner.partition(new, "new", key)
            comparison = _compare_into(work, partitioner, old_side, new_side)
            check_cancelled()
            os.replace(work / ENTERING_NAME, entering_path)
            os.replace(work / EXITING_NAME, exiting_path)
            fsync_directory(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return MembershipDiff(
        entering_path=entering_path, exiting_path=exiting_path,
        entering=comparison.entering, exiting=comparison.exiting,
        unchanged=comparison.unchanged, no_key=old_side.no_key + new_side.no_key, key=key,
    )


async def diff_members(
    old: str | PathLike[str],
    new: str | PathLike[str],
    out_dir: str | PathLike[str],
    *,
    key: str = "amplitude_id",
) -> MembershipDiff:
    """Compare two exports of a cohort by the ``key`` column; write who entered and who left.

    Writes ``<out_dir>/entering.csv`` (the header of ``new`` and the rows of the members only
    in ``new``) and ``<out_dir>/exiting.csv`` (the header of ``old`` and the rows of the
    members only in ``old``), each complete or not at all. ``key`` is a column of both files:
    ``"amplitude_id"``, ``"user_id"``, or for a group cohort ``"group_id"`` / ``"group_name"``.
    Memory does not grow with the files: temporary runs go to ``out_dir`` (about the size of
    both exports, removed at the end), and the work runs in a worker thread.
    """
    old_name = text_path(old, "old")
    new_name = text_path(new, "new")
    key = require_text(key, "key")
    directory = await make_directory(out_dir, "out_dir")
    return await run_stoppable(
        functools.partial(_diff_blocking, old_name, new_name, directory, key)
    )
