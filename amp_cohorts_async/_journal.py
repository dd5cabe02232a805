"""A small journal in a download directory, so a rerun resumes instead of paying twice.

It records, per (cohort id, props, prop keys): the export request id and when it was made, and
once the file is in place its name, size and sha256. It is rewritten atomically on each change
through a fresh temp file (created exclusively, never through a planted link).

The journal is a file anyone with access to the directory can edit, so it is input, not truth:
it is read without following links, checked against its schema (an invalid one is set aside
with a warning and the batch runs as if there were none), its file names are only ever the
names the batch would write, its checksums are verified against the files, and its request
ids are used only when Amplitude's status answer names the same cohort.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import re
import secrets
import stat
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import attrs

from ._files import safe_filename
from ._models import CohortRequest, DownloadResult, ExportOptions

__all__ = (
    "JOURNAL_NAME",
    "JOURNAL_REQUEST_TTL",
    "Journal",
    "JournalEntry",
    "Plan",
    "journal_key",
    "utc_now_iso",
)

logger = logging.getLogger("amp_cohorts_async")

JOURNAL_NAME = ".amp-cohorts-journal.json"
_MAX_JOURNAL_BYTES = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ENTRY_FIELDS = {"cohort_id", "request_id", "requested_at", "file", "size_bytes", "sha256",
                 "members"}


class InvalidJournal(ValueError):
    """The journal file does not match its schema."""


def _optional(entry: dict[str, Any], name: str, kind: type) -> Any:
    value = entry.get(name)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise InvalidJournal(f"{name} must be a {kind.__name__} or null")
    return value


def _parse_entry(key: Any, value: Any) -> JournalEntry:
    if not isinstance(key, str) or not isinstance(value, dict):
        raise InvalidJournal("entries must map text keys to objects")
    unknown = set(value) - _ENTRY_FIELDS
    if unknown:
        raise InvalidJournal(f"unknown entry fields {sorted(unknown)}")
    cohort_id = value.get("cohort_id")
    if not isinstance(cohort_id, str) or not cohort_id:
        raise InvalidJournal("cohort_id must be non-empty text")
    request_id = _optional(value, "request_id", str)
    requested_at = _optional(value, "requested_at", str)
    if requested_at is not None:
        try:
            when = datetime.fromisoformat(requested_at)
        except ValueError:
            raise InvalidJournal("requested_at must be an ISO-8601 time") from None
        if when.tzinfo is None:
            raise InvalidJournal("requested_at must carry its UTC offset")
    file = _optional(value, "file", str)
    if file is not None and file != safe_filename(cohort_id):
        raise InvalidJournal(f"file {file!r} is not the name written for {cohort_id!r}")
    size_bytes = _optional(value, "size_bytes", int)
    if size_bytes is not None and size_bytes < 0:
        raise InvalidJournal("size_bytes must not be negative")
    sha256 = _optional(value, "sha256", str)
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        raise InvalidJournal("sha256 must be 64 lower-case hex digits")
    members = _optional(value, "members", int)
    if members is not None and members < 0:
        raise InvalidJournal("members must not be negative")
    return JournalEntry(cohort_id=cohort_id, request_id=request_id, requested_at=requested_at,
                        file=file, size_bytes=size_bytes, sha256=sha256, members=members)


def parse_journal(data: Any) -> dict[str, JournalEntry]:
    """The entries of a journal document; InvalidJournal if it does not match the schema."""
    if not isinstance(data, dict) or data.get("version") != 1 or set(data) != {"version",
                                                                               "entries"}:
        raise InvalidJournal("not a version 1 journal")
    entries = data["entries"]
    if not isinstance(entries, dict):
        raise InvalidJournal("entries must be an object")
    return {key: _parse_entry(key, value) for key, value in entries.items()}


def _read_regular_file(path: pathlib.Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (never through a link), None if absent."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a planted link; EACCES: not ours to read
        raise InvalidJournal(f"cannot be opened safely ({exc.strerror})") from None
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InvalidJournal("not a regular file")
        if info.st_size > _MAX_JOURNAL_BYTES:
            raise InvalidJournal(f"larger than {_MAX_JOURNAL_BYTES >> 20} MiB")
        return handle.read(_MAX_JOURNAL_BYTES + 1)
# Amplitude keeps /file valid for 7 days; a day of margin covers clock skew and long polls.
JOURNAL_REQUEST_TTL = timedelta(days=6)


@attrs.frozen(kw_only=True)
class JournalEntry:
    cohort_id: str
    request_id: str | None = None
    requested_at: str | None = None  # ISO-8601 UTC
    file: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    members: int | None = None

    def request_is_fresh(self, now: datetime) -> bool:
        if self.request_id is None or self.requested_at is None:
            return False
        try:
            when = datetime.fromisoformat(self.requested_at)
        except ValueError:
            return False
        return timedelta(0) <= now - when < JOURNAL_REQUEST_TTL


def journal_key(cohort_id: str, export: ExportOptions) -> str:
    if not export.props:
        return cohort_id
    return json.dumps([cohort_id, True, sorted(export.prop_keys)], separators=(",", ":"))


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


class Journal:
    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self.entries: dict[str, JournalEntry] = {}
        self._lock = anyio.Lock()

    async def load(self, *, set_aside: bool = True) -> None:
        """Read the journal; an invalid one is set aside (renamed) with a warning, or with
        ``set_aside=False`` (a look before deciding) just ignored."""

        def read() -> dict[str, JournalEntry]:
            try:
                raw = _read_regular_file(self.path)
                if raw is None:
                    return {}
                return parse_journal(json.loads(raw))
            except (InvalidJournal, ValueError, RecursionError) as exc:
                if set_aside:
                    self._set_aside(exc)
                return {}

        self.entries = await anyio.to_thread.run_sync(read)

    def _set_aside(self, reason: BaseException) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{JOURNAL_NAME}.invalid-{stamp}-{secrets.token_hex(3)}")
        try:
            os.rename(self.path, aside)  # renames a link itself, never what it points to
            where = f"moved to {aside.name}"
        except OSError as exc:
            where = f"left in place ({exc.strerror})"
        logger.warning("ignoring the resume journal %s (%s): %s; this batch starts afresh",
                       self.path, where, reason)

    async def plan(
        self, cohort_ids: Sequence[str], export: ExportOptions, now: datetime
    ) -> Plan:
        """Sort ``cohort_ids`` by what the loaded entries allow.

        Finished: the entry's file is the one this batch would write and its sha256 matches
        (verified now). Reusable: an export request younger than 6 days, fetched from /file at
        no quota. Fresh: everything else. Older entries are ignored.
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
            # Only the name this batch would write: a journal edited by hand cannot point outside.
            if entry.file == safe_filename(cohort_id) and entry.sha256:
                path = self.directory / entry.file
                if await anyio.to_thread.run_sync(_sha256_of, path) == entry.sha256:
                    finished[cohort_id] = DownloadResult(
                        cohort_id=cohort_id, request_id=entry.request_id, path=path,
                        size_bytes=(await anyio.Path(path).stat()).st_size, sha256=entry.sha256,
                        members=entry.members,
                    )
                    continue
            reusable[cohort_id] = CohortRequest(request_id=entry.request_id, cohort_id=cohort_id)
        return Plan(finished=finished, reusable=reusable, fresh=fresh)

    async def update(self, key: str, **changes: Any) -> None:
        async with self._lock:
            entry = self.entries.get(key) or JournalEntry(cohort_id=changes["cohort_id"])
            self.entries[key] = attrs.evolve(entry, **changes)
            snapshot = {
                "version": 1,
                "entries": {k: attrs.asdict(v) for k, v in self.entries.items()},
            }
            with anyio.CancelScope(shield=True):  # never leave a half-written journal
                try:
                    await anyio.to_thread.run_sync(self._write, snapshot)
                except OSError as exc:
                    # Only resumability is lost; the download itself goes on.
                    logger.warning("cannot write the resume journal %s: %s", self.path,
                                   exc.strerror or exc)

    def _write(self, snapshot: dict[str, Any]) -> None:
        """Temp file created exclusively (O_EXCL, no link followed), fsync, rename, fsync dir."""
        temp = self.path.with_name(f"{JOURNAL_NAME}.{secrets.token_hex(8)}.tmp")
        flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))
        descriptor = os.open(temp, flags, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(snapshot, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def utc_now_iso(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).isoformat()
