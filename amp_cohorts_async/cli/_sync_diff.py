"""``sync --diff``: who entered and who left, for each cohort a sync run downloaded.

A layer above the sync, as the command line is: the sync itself is untouched (its copies are
journaled before any diff starts, so a diff that fails loses nothing and marks nothing
unsynced). Each downloaded cohort's diff goes next to its copy, in ``<dest>/<copy stem>.diff/``
(``entering.csv``, ``exiting.csv``), replacing the one of its previous change: the files always
describe the current copy against the version before it.

Against what: the version the sync kept (``SyncEntry.previous_path``). Without one (the first
copy, or a file system that cannot keep versions) every member of the new copy is entering and
none exiting -- what a destination that applies deltas needs to start from.

By which key: ``amplitude_id``, or ``group_id`` for a group cohort (whose exports have no
``amplitude_id``).

Runs on one directory may overlap (the sync allows it), so each diff holds the cohort's export
lock, the one the sync holds while it replaces a copy: no other run replaces the copy or
prunes the version being read while the diff runs. A copy that another run replaced before
the diff began is left to that run, whose diff describes the copy now in place.
"""

from __future__ import annotations

import contextlib
import os
import pathlib

import anyio
import attrs

from .._diff import ENTERING_NAME, EXITING_NAME, MembershipDiff, diff_members
from .._exceptions import AmplitudeError
from .._members import _strip_tabs, first_record, unreadable_as_errors
from .._models import ExportOptions, SyncEntry, SyncReport
from .._store import DirectoryStore, journal_key

__all__ = ("SyncDiff", "diff_directory", "diff_downloads")

DIFF_SUFFIX = ".diff"
_KEYS = ("amplitude_id", "group_id")  # a user cohort's key, else a group cohort's


@attrs.frozen
class SyncDiff:
    """One downloaded cohort's diff: written, or why not (the download stands either way);
    ``replaced``: another run replaced the copy before its diff began (none written)."""

    diff: MembershipDiff | None
    error: AmplitudeError | None = None
    replaced: bool = False


def diff_directory(copy: pathlib.Path) -> pathlib.Path:
    """Where the diff of ``copy`` goes: beside it, named after it (``abc.csv`` -> ``abc.diff``).

    A copy's name never holds a dot before its suffix, so no cohort's copy can take this name.
    """
    return copy.with_suffix(DIFF_SUFFIX)


async def diff_downloads(report: SyncReport, directory: str | os.PathLike[str],
                         export: ExportOptions) -> dict[str, SyncDiff]:
    """The diff of each ``downloaded`` entry of a sync of ``directory`` with ``export``, by
    cohort id, one after the other (each is a worker thread's CPU and disk work already)."""
    store = DirectoryStore(pathlib.Path(directory))
    return {entry.cohort_id: await _diff_one(entry, store, export)
            for entry in report.entries if entry.action == "downloaded"}


async def _diff_one(entry: SyncEntry, store: DirectoryStore, export: ExportOptions
                    ) -> SyncDiff:
    assert entry.path is not None  # downloaded
    assert entry.result is not None
    async with store.cohort_lock(entry.cohort_id):
        current = (await store.load(set_aside=False)).get(journal_key(entry.cohort_id, export))
        if current is None or current.sha256 != entry.result.sha256:
            return SyncDiff(None, replaced=True)
        out_dir = diff_directory(entry.path)
        # An empty "previous" file: every member enters.
        previous = entry.previous_path if entry.previous_path is not None else os.devnull
        try:
            key = await anyio.to_thread.run_sync(_key_of, entry.path)
            return SyncDiff(await diff_members(previous, entry.path, out_dir, key=key))
        except AmplitudeError as error:
            # The files of the previous change would now describe the wrong one.
            await anyio.to_thread.run_sync(_remove_stale, out_dir)
            return SyncDiff(None, error)


def _key_of(copy: pathlib.Path) -> str:
    with unreadable_as_errors(str(copy)):
        header = first_record(str(copy))
    columns = _strip_tabs(header or [])
    # A copy without a header has no members; diff_members says so by either key.
    return next((key for key in _KEYS if key in columns), _KEYS[0])


def _remove_stale(out_dir: pathlib.Path) -> None:
    for name in (ENTERING_NAME, EXITING_NAME):
        with contextlib.suppress(OSError):
            (out_dir / name).unlink()
