"""diff_members: who entered and who left between two exports, in memory that does not grow.

Knows files, not HTTP. Two exports of up to 2M members are neither sorted nor small, so the
diff never holds a whole file: each file is read once (``_partition``: gzip detected, a group
cohort's leading tabs ignored in the key, blank lines dropped, as ``iter_members`` reads it),
and its rows are spread by a hash of the key over runs on disk, sized so that one run of
each file fits in a few tens of MiB. Then run ``i`` of the old file is compared with run
``i`` of the new one: their key sets give the counts, and the lines whose key is only on one
side are written out as the export had them.

Runs are this process's own temp files in a private directory (``mkdtemp``: mode 0700),
removed when the diff ends, fails or is cancelled.

A member is a distinct key: a key repeated within one file is one member, and its first row
is the one written. Rows whose key is empty (a member without a user id) or missing (a short
row) are counted in ``no_key`` and not compared.

Everything runs in one worker thread, off the event loop; it looks for cancellation between
blocks and runs, so a cancelled diff stops within one and leaves no temp file behind.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from os import PathLike
from typing import IO

import attrs

from ._background import run_stoppable
from ._exceptions import InvalidRequestError
from ._files import disk_errors, fsync_directory, make_directory
from ._members import unreadable_as_errors
from ._partition import Partitioner, Side, read_run
from ._validate import require_text, text_path

__all__ = ("ENTERING_NAME", "EXITING_NAME", "MembershipDiff", "diff_members")

ENTERING_NAME = "entering.csv"
EXITING_NAME = "exiting.csv"

# About this many bytes of export (both files together) per run: one run of each side, as
# Python objects, then takes a few tens of MiB at most.
_RUN_BYTES = 4 << 20
_MAX_RUNS = 512  # open files while partitioning one export; below the usual limit of 1024
_GZIP_RATIO_GUESS = 4  # when a gzip trailer under-reports (past 4 GiB, or several members)


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


def _estimated_text_bytes(path: str) -> int:
    """The export's size as text: a gzip file's trailer states it (modulo 4 GiB)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        if file.read(2) != b"\x1f\x8b" or size < 18:
            return size
        file.seek(-4, os.SEEK_END)
        stated = int.from_bytes(file.read(4), "little")
    return max(stated, size * _GZIP_RATIO_GUESS)


class _Comparison:
    """Run by run: counts, and the lines of each side's own members written out."""

    def __init__(self, partitioner: Partitioner, entering: IO[bytes], exiting: IO[bytes]
                 ) -> None:
        self.partitioner = partitioner
        self.entering_file = entering
        self.exiting_file = exiting
        self.entering = self.exiting = self.unchanged = 0

    def compare_all(self) -> None:
        for index in range(self.partitioner.runs):
            self.partitioner.check_cancelled()
            self._compare(index)

    def _compare(self, index: int) -> None:
        old_keys, old_lines = read_run(self.partitioner.run_path("old", index))
        new_keys, new_lines = read_run(self.partitioner.run_path("new", index))
        old_set, new_set = set(old_keys), set(new_keys)
        only_new = new_set - old_set
        only_old = old_set - new_set
        self.unchanged += len(new_set) - len(only_new)
        self.entering += len(only_new)
        self.exiting += len(only_old)
        _write_first_lines(new_keys, new_lines, only_new, self.entering_file)
        _write_first_lines(old_keys, old_lines, only_old, self.exiting_file)


def _write_first_lines(keys: list[bytes], lines: list[bytes], wanted: set[bytes],
                       file: IO[bytes]) -> None:
    """The first line of each key in ``wanted``."""
    if not wanted:
        return
    chosen = list(map(wanted.__contains__, keys))
    chosen_keys = list(itertools.compress(keys, chosen))
    chosen_lines = list(itertools.compress(lines, chosen))
    if len(chosen_keys) == len(wanted):  # no key of them repeated: file order
        file.writelines(chosen_lines)
    else:  # the earliest line of each repeated key wins
        file.writelines(dict(zip(reversed(chosen_keys), reversed(chosen_lines),
                                 strict=True)).values())


def _header_line(header: list[str]) -> bytes:
    text = io.StringIO()
    csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n").writerow(header)
    return text.getvalue().encode()


def _run_count(old: str, new: str) -> int:
    with unreadable_as_errors(old):
        old_bytes = _estimated_text_bytes(old)
    with unreadable_as_errors(new):
        new_bytes = _estimated_text_bytes(new)
    return max(1, min(_MAX_RUNS, (old_bytes + new_bytes) // _RUN_BYTES))


def _compare_into(work: pathlib.Path, partitioner: Partitioner, old: Side, new: Side
                  ) -> _Comparison:
    """Compare the runs, writing both output files complete (fsynced) inside ``work``."""
    with open(work / ENTERING_NAME, "xb") as entering_file, \
            open(work / EXITING_NAME, "xb") as exiting_file:
        # A file without even a header has no members; its output takes the other's header.
        for file, header in ((entering_file, new.header or old.header),
                             (exiting_file, old.header or new.header)):
            if header is not None:
                file.write(_header_line(header))
        comparison = _Comparison(partitioner, entering_file, exiting_file)
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
            partitioner = Partitioner(work, runs, check_cancelled)
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
