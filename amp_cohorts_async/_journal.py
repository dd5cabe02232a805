"""The journal document of a download directory: its schema, and reading it defensively.

It records, per (cohort id, props, prop keys): the export request id, when it was made and at
which ``last_computed``; once the file is in place its name, size, mtime and sha256, the
``last_computed`` it was exported at, and the versions kept of earlier copies. ``_store.py``
reads and changes it (under a lock, atomically); this module only says what it may contain.

The journal is a file anyone with access to the directory can edit, so it is input, not truth:
it is read without following links, checked against its schema (an invalid one is set aside
with a warning and the run goes on as if there were none), its file names are only ever the
names this library would write, its checksums are verified against the files, and its request
ids are used only when Amplitude's status answer names the same cohort.
"""

from __future__ import annotations

import os
import pathlib
import re
import stat
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

from ._files import safe_filename

__all__ = (
    "JOURNAL_NAME",
    "JOURNAL_REQUEST_TTL",
    "InvalidJournal",
    "JournalEntry",
    "is_version_name",
    "parse_journal",
    "read_regular_file",
    "version_name",
)

JOURNAL_NAME = ".amp-cohorts-journal.json"
VERSIONS_DIR = "versions"
_MAX_JOURNAL_BYTES = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_STAMP = re.compile(r"[0-9]{8}T[0-9]{6}Z|unknown")
_ENTRY_FIELDS = {"cohort_id", "request_id", "requested_at", "request_last_computed",
                 "copy_request_id", "file",
                 "size_bytes", "sha256", "members", "mtime_ns", "last_computed", "versions"}


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
    requested_at = _optional_time(value, "requested_at")
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
    versions = value.get("versions", [])
    if not isinstance(versions, list) or not all(
            isinstance(v, str) and is_version_name(cohort_id, v) for v in versions):
        raise InvalidJournal(f"versions must list version files of {cohort_id!r}")
    return JournalEntry(
        cohort_id=cohort_id, request_id=request_id, requested_at=requested_at,
        request_last_computed=_optional_time(value, "request_last_computed"),
        copy_request_id=_optional(value, "copy_request_id", str), file=file,
        size_bytes=size_bytes, sha256=sha256, members=members,
        mtime_ns=_optional(value, "mtime_ns", int),
        last_computed=_optional_time(value, "last_computed"), versions=versions,
    )


def _optional_time(entry: dict[str, Any], name: str) -> str | None:
    text = _optional(entry, name, str)
    if text is not None:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidJournal(f"{name} must be an ISO-8601 time") from None
        if when.tzinfo is None:
            raise InvalidJournal(f"{name} must carry its UTC offset")
    return text  # type: ignore[no-any-return]


def version_name(cohort_id: str, when: str | None, sha256: str) -> str:
    """Where a kept version of ``cohort_id``'s file lives, relative to the directory: named by
    the ``last_computed`` it was exported at (ISO-8601) and the start of its sha256."""
    stamp = "unknown"
    if when is not None:
        stamp = datetime.fromisoformat(when).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    stem = safe_filename(cohort_id, "")
    return f"{VERSIONS_DIR}/{stem}/{stamp}-{sha256[:12]}.csv"


def is_version_name(cohort_id: str, name: str) -> bool:
    """Whether ``name`` is one ``version_name`` could give for ``cohort_id`` (a journal
    edited by hand cannot make the store remove or report any other file)."""
    prefix = f"{VERSIONS_DIR}/{safe_filename(cohort_id, '')}/"
    if not name.startswith(prefix) or not name.endswith(".csv"):
        return False
    stamp, dash, digest = name[len(prefix):-4].rpartition("-")
    return bool(dash) and bool(_STAMP.fullmatch(stamp)) and bool(
        re.fullmatch(r"[0-9a-f]{12}", digest))


def parse_journal(data: Any) -> dict[str, JournalEntry]:
    """The entries of a journal document; InvalidJournal if it does not match the schema."""
    if not isinstance(data, dict) or data.get("version") != 1 or set(data) != {"version",
                                                                               "entries"}:
        raise InvalidJournal("not a version 1 journal")
    entries = data["entries"]
    if not isinstance(entries, dict):
        raise InvalidJournal("entries must be an object")
    return {key: _parse_entry(key, value) for key, value in entries.items()}


def read_regular_file(path: pathlib.Path) -> bytes | None:
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
    #: The file's mtime when it was written: with the size, how a copy is known unchanged
    #: without hashing it again.
    mtime_ns: int | None = None
    #: The list's last_computed when the request was made (ISO-8601), and that of the copy
    #: in place: a sync reuses the one and keeps the other while the list shows the same.
    request_last_computed: str | None = None
    last_computed: str | None = None
    #: The request whose export the file in place is (None in journals older than this field:
    #: ``request_id``). A newer request leaves the file fields alone until its file is in place.
    copy_request_id: str | None = None
    #: Versions kept of earlier copies, newest first (names from ``version_name``).
    versions: list[str] = attrs.field(factory=list)

    def request_is_fresh(self, now: datetime) -> bool:
        if self.request_id is None or self.requested_at is None:
            return False
        try:
            when = datetime.fromisoformat(self.requested_at)
        except ValueError:
            return False
        return timedelta(0) <= now - when < JOURNAL_REQUEST_TTL

    @property
    def file_request_id(self) -> str | None:
        """The request whose export the recorded file is."""
        return self.copy_request_id or self.request_id
