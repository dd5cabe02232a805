"""The state of a download directory: journal entries, kept versions, per-cohort locks.

One store serves ``download_cohorts(resume=...)`` and ``sync_cohorts`` alike. Its journal
(``.amp-cohorts-journal.json``, the document ``_journal.py`` defines) records per (cohort id,
props, prop keys): the export request and when it was made, the file once it is in place (name,
size, sha256, mtime), the ``last_computed`` it was exported at, and the versions kept.

Concurrent writers -- tasks of one client, processes, hosts sharing the directory -- never lose
an entry: every change is a read-modify-write of the file under an exclusive ``flock`` of
``.amp-cohorts-journal.lock`` beside it, written to a fresh temp file, fsynced and renamed over
the journal (readers see the old document or the new one, never half of one; a crash at any
point leaves one of the two). ``flock`` locks belong to an open file, so two tasks of one
process exclude each other like two processes; on NFS Linux maps ``flock`` to POSIX locks, which
belong to the process, so a per-process lock is taken first as well (see ``_ProcessLocks``).

A cohort being exported is locked the same way, by a lock file of its own under
``.amp-cohorts-locks/``, for as long as its export runs: a second run waits for the first one's
copy instead of paying for its own. The kernel (or the NFS server's lease) releases the lock of
a process that dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import re
import secrets
import stat
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import attrs

from ._exceptions import AmplitudeError, InvalidRequestError
from ._files import fsync_directory, safe_filename
from ._journal import (
    JOURNAL_NAME,
    InvalidJournal,
    JournalEntry,
    parse_journal,
    read_regular_file,
    version_name,
)
from ._models import CohortRequest, DownloadResult, ExportOptions

__all__ = ("DirectoryStore", "JournalWriteError", "Plan", "journal_key", "utc_now_iso")

logger = logging.getLogger("amp_cohorts_async")

LOCK_NAME = ".amp-cohorts-journal.lock"
COHORT_LOCKS = ".amp-cohorts-locks"
# Waiting for another run's export: first look again soon, then every few seconds.
_LOCK_POLL_FIRST = 0.2
_LOCK_POLL_MAX = 5.0
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
_JOURNAL_TEMP = re.compile(r"[0-9a-f]{16}\.tmp")  # what _write names its temp files


class JournalWriteError(AmplitudeError):
    """The directory's journal could not be written (a full disk, a read-only mount)."""


class _ProcessLocks:
    """Which lock files this process holds, and a lock per journal for its writers.

    Needed beside ``flock`` where the file system makes it a per-process lock (NFS): there two
    tasks of one process would both be granted it.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._journal_locks: dict[str, threading.Lock] = {}
        self._held: set[str] = set()

    def journal_lock(self, path: pathlib.Path) -> threading.Lock:
        with self._guard:
            return self._journal_locks.setdefault(str(path.resolve()), threading.Lock())

    def try_hold(self, path: pathlib.Path) -> bool:
        with self._guard:
            key = str(path.resolve())
            if key in self._held:
                return False
            self._held.add(key)
            return True

    def release(self, path: pathlib.Path) -> None:
        with self._guard:
            self._held.discard(str(path.resolve()))


# Process-wide on purpose: it stands for what the kernel's per-process locks would conflate.
_PROCESS = _ProcessLocks()


def journal_key(cohort_id: str, export: ExportOptions) -> str:
    if not export.props:
        return cohort_id
    return json.dumps([cohort_id, True, sorted(export.prop_keys)], separators=(",", ":"))


def utc_now_iso(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).isoformat()


@attrs.frozen
class Plan:
    """What a batch must do per cohort: nothing (finished), fetch (reusable), or export."""

    finished: dict[str, DownloadResult]
    reusable: dict[str, CohortRequest]
    fresh: list[str]


def _sha256_of(path: pathlib.Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _open_lock_file(path: pathlib.Path) -> int:
    """A lock file, created if missing, never through a planted link."""
    return os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o644)


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


class DirectoryStore:
    """The state of one download directory (see the module docstring)."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self.lock_path = directory / LOCK_NAME
        #: The entries as last read or written by this store.
        self.entries: dict[str, JournalEntry] = {}
        self._swept = False  # leftover journal temps removed (once per store)

    # -- before spending anything -------------------------------------------------------------
    async def check_writable(self) -> None:
        """Make sure files can be created and written here and the journal can be kept,
        before the first cohort request: InvalidRequestError naming the directory if not."""
        await anyio.to_thread.run_sync(self._check_writable)

    def _check_writable(self) -> None:
        probe = self.directory / f".amp-cohorts-probe.{secrets.token_hex(6)}.tmp"
        try:
            descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS,
                                 0o600)
            try:
                # A write is enough: a full disk refuses it (space is reserved at write time).
                os.write(descriptor, b"probe\n")
            finally:
                os.close(descriptor)
                probe.unlink(missing_ok=True)
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot write files in {self.directory}: {_describe(exc)}; nothing was "
                "requested") from None
        self._set_aside_if_not_a_file()

    def _set_aside_if_not_a_file(self) -> None:
        """A journal path that is a directory, a link, a socket... is moved out of the way
        (the journal is only ever a regular file); if it cannot be, the run cannot keep one."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise InvalidRequestError(f"cannot inspect the journal {self.path}: "
                                      f"{_describe(exc)}") from None
        if stat.S_ISREG(info.st_mode):
            return
        with _PROCESS.journal_lock(self.path), self._journal_flock():
            if not self._set_aside(InvalidJournal("not a regular file")):
                raise InvalidRequestError(
                    f"the journal path {self.path} is not a regular file and cannot be moved "
                    "aside; remove it and run again")

    # -- the journal ------------------------------------------------------------------------
    async def load(self, *, set_aside: bool = True) -> dict[str, JournalEntry]:
        """Read the journal; an invalid one is set aside (renamed) with a warning, or with
        ``set_aside=False`` (a look before deciding) just ignored."""
        self.entries = await anyio.to_thread.run_sync(self._read, set_aside)
        return self.entries

    def _read(self, set_aside: bool) -> dict[str, JournalEntry]:
        try:
            raw = read_regular_file(self.path)
            if raw is None:
                return {}
            return parse_journal(json.loads(raw))
        except (InvalidJournal, ValueError, RecursionError) as exc:
            if set_aside:
                self._set_aside(exc)
            return {}

    def _set_aside(self, reason: BaseException) -> bool:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{JOURNAL_NAME}.invalid-{stamp}-{secrets.token_hex(3)}")
        try:
            os.rename(self.path, aside)  # renames a link itself, never what it points to
        except FileNotFoundError:
            return True  # another writer set it aside first
        except OSError as exc:
            logger.warning("ignoring the resume journal %s (left in place: %s): %s", self.path,
                           _describe(exc), reason)
            return False
        logger.warning("ignoring the resume journal %s (moved to %s): %s; this run starts afresh",
                       self.path, aside.name, reason)
        return True

    async def update(self, key: str, **changes: Any) -> JournalEntry:
        """Change one entry, keeping every other writer's entries: read, change, write, all
        under the journal's lock. JournalWriteError if the journal cannot be written."""
        with anyio.CancelScope(shield=True):  # never leave the lock or a temp file behind
            entry, self.entries = await anyio.to_thread.run_sync(self._update, key, changes)
        return entry

    def _update(self, key: str, changes: dict[str, Any]) -> tuple[JournalEntry,
                                                                  dict[str, JournalEntry]]:
        try:
            with _PROCESS.journal_lock(self.path), self._journal_flock():
                entries = self._read(set_aside=True)
                if not self._swept:
                    self._remove_temps_of_killed_writers()
                entry = entries.get(key) or JournalEntry(cohort_id=changes["cohort_id"])
                entries[key] = entry = attrs.evolve(entry, **changes)
                self._write(entries)
        except OSError as exc:
            raise JournalWriteError(f"cannot write the journal {self.path}: "
                                    f"{_describe(exc)}") from None
        return entry, entries

    def _remove_temps_of_killed_writers(self) -> None:
        """Journal temp files left by a writer killed mid-write. Called under the journal's
        lock: every live writer writes its temp under that lock, so any temp seen now is a
        dead writer's."""
        prefix = f"{JOURNAL_NAME}."
        for name in os.listdir(self.directory):
            if name.startswith(prefix) and _JOURNAL_TEMP.fullmatch(name[len(prefix):]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
        self._swept = True

    def _journal_flock(self) -> _Flock:
        return _Flock(self.lock_path)

    def _write(self, entries: dict[str, JournalEntry]) -> None:
        """Temp file created exclusively (O_EXCL, no link followed), fsync, rename, fsync dir.
        The temp file is removed on every failure, a full disk included."""
        snapshot = {"version": 1,
                    "entries": {k: attrs.asdict(v) for k, v in entries.items()}}
        temp = self.path.with_name(f"{JOURNAL_NAME}.{secrets.token_hex(8)}.tmp")
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(snapshot, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fsync_directory(self.directory)

    # -- what the entries allow -------------------------------------------------------------
    async def verified_copy(self, cohort_id: str, entry: JournalEntry | None, *,
                            thorough: bool = False) -> DownloadResult | None:
        """The entry's file as a DownloadResult if it is still the file the entry describes.

        The entry's file is only ever the name this library writes for ``cohort_id`` (a
        journal edited by hand cannot point elsewhere). A file whose size and mtime are the
        ones recorded when it was written is taken as verified (a nightly sync of hundreds of
        large files cannot hash them all); any other is hashed and compared with the
        recorded sha256, as every file is with ``thorough=True``.
        """
        return await anyio.to_thread.run_sync(self._verified_copy, cohort_id, entry, thorough)

    async def verified_copies(self, entries: dict[str, JournalEntry | None]
                              ) -> dict[str, DownloadResult | None]:
        """``verified_copy`` of many cohorts in one worker-thread call (a stat each)."""

        def verify_all() -> dict[str, DownloadResult | None]:
            return {c: self._verified_copy(c, e, False) for c, e in entries.items()}

        return await anyio.to_thread.run_sync(verify_all)

    def _verified_copy(self, cohort_id: str, entry: JournalEntry | None,
                       thorough: bool) -> DownloadResult | None:
        if (entry is None or entry.file != safe_filename(cohort_id) or not entry.sha256
                or entry.file_request_id is None):
            return None
        path = self.directory / entry.file
        try:
            info = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        same_stat = (entry.mtime_ns == info.st_mtime_ns and entry.size_bytes == info.st_size)
        if (thorough or not same_stat) and _sha256_of(path) != entry.sha256:
            return None
        return DownloadResult(cohort_id=cohort_id, request_id=entry.file_request_id, path=path,
                              size_bytes=info.st_size, sha256=entry.sha256,
                              members=entry.members)

    async def plan(
        self, cohort_ids: Sequence[str], export: ExportOptions, now: datetime
    ) -> Plan:
        """Sort ``cohort_ids`` by what the loaded entries allow (for a resumed batch).

        Finished: the entry's file is the one this batch would write and its sha256 matches
        (read and hashed now). Reusable: an export request younger than 6 days, fetched from
        /file at no quota. Fresh: everything else. Older entries are ignored.
        """
        finished: dict[str, DownloadResult] = {}
        reusable: dict[str, CohortRequest] = {}
        fresh: list[str] = []
        for cohort_id in cohort_ids:
            entry = self.entries.get(journal_key(cohort_id, export))
            if entry is None or not entry.request_is_fresh(now):
                fresh.append(cohort_id)
                continue
            assert entry.request_id is not None  # request_is_fresh says so
            copy = await self.verified_copy(cohort_id, entry, thorough=True)
            if copy is not None and copy.request_id == entry.request_id:  # that request's file
                finished[cohort_id] = copy
                continue
            reusable[cohort_id] = CohortRequest(request_id=entry.request_id, cohort_id=cohort_id)
        return Plan(finished=finished, reusable=reusable, fresh=fresh)

    # -- one export at a time per cohort ----------------------------------------------------
    @asynccontextmanager
    async def cohort_lock(self, cohort_id: str) -> AsyncIterator[bool]:
        """Hold ``cohort_id``'s export lock, across tasks, processes and hosts; yields whether
        another holder had it first (then its copy may already be in place)."""
        directory = self.directory / COHORT_LOCKS
        lock = _Flock(directory / safe_filename(cohort_id, ".lock"))
        waited = False
        delay = _LOCK_POLL_FIRST
        while True:
            # Shielded: a try that took the lock must come back to us, or the lock would stay
            # held (a cancelled wait for a thread discards its result). It never blocks.
            with anyio.CancelScope(shield=True):
                acquired = await anyio.to_thread.run_sync(lock.try_acquire, directory)
            if acquired:
                break
            waited = True
            await anyio.sleep(delay)
            delay = min(_LOCK_POLL_MAX, delay * 2)
        try:
            yield waited
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lock.release)

    # -- versions ---------------------------------------------------------------------------
    async def keep_version(self, cohort_id: str, entry: JournalEntry,
                           copy: DownloadResult) -> pathlib.Path | None:
        """Give the current copy a second name under ``versions/`` (a hard link: no byte is
        copied), so the download about to replace it leaves it there. None where the file
        system has no hard links (the version is then not kept)."""
        name = version_name(cohort_id, entry.last_computed or entry.requested_at, copy.sha256)
        path = self.directory / name

        def link() -> pathlib.Path | None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(copy.path, path, follow_symlinks=False)
            except FileExistsError:
                if not os.path.samefile(copy.path, path):
                    return None  # a stranger's file under our name: leave it alone
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    logger.warning("cannot keep a version of %s (%s); only the current copy "
                                   "is kept", copy.path, _describe(exc))
                    return None
                raise
            return path

        try:
            return await anyio.to_thread.run_sync(link)
        except OSError as exc:
            raise JournalWriteError(f"cannot keep a version of {copy.path}: "
                                    f"{_describe(exc)}") from None

    async def drop_version(self, version: pathlib.Path, current: pathlib.Path) -> bool:
        """Undo ``keep_version`` when the download did not replace the current copy (the
        version is still the current file); returns whether it was removed."""

        def drop() -> bool:
            try:
                if os.path.samefile(version, current):
                    version.unlink()
                    return True
            except OSError:
                pass
            return False

        dropped = False
        with anyio.CancelScope(shield=True):
            dropped = await anyio.to_thread.run_sync(drop)
        return dropped

    async def prune_versions(self, cohort_id: str, versions: Sequence[str], keep: int
                             ) -> list[str]:
        """Remove the versions past the ``keep`` newest (``versions`` newest first); returns
        those kept. Only names this store writes are ever removed."""
        kept, dropped = list(versions[:keep]), versions[keep:]

        def remove() -> None:
            for name in dropped:
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / name).unlink()

        if dropped:
            await anyio.to_thread.run_sync(remove)
        return kept


class _Flock:
    """An exclusive ``flock`` of one lock file, with the per-process guard beside it."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self._descriptor: int | None = None

    def __enter__(self) -> _Flock:
        self._descriptor = _open_lock_file(self.path)
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX)
        except BaseException:
            os.close(self._descriptor)
            raise
        return self

    def __exit__(self, *_: object) -> None:
        assert self._descriptor is not None
        os.close(self._descriptor)  # closing the last descriptor releases the flock
        self._descriptor = None

    def try_acquire(self, directory: pathlib.Path) -> bool:
        directory.mkdir(exist_ok=True)
        if not _PROCESS.try_hold(self.path):
            return False
        try:
            descriptor = _open_lock_file(self.path)
        except BaseException:
            _PROCESS.release(self.path)
            raise
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            _PROCESS.release(self.path)
            return False
        except BaseException:
            os.close(descriptor)
            _PROCESS.release(self.path)
            raise
        self._descriptor = descriptor
        return True

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
            _PROCESS.release(self.path)
