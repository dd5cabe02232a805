"""A small journal in a download directory, so a rerun resumes instead of paying twice.

It records, per (cohort id, props, prop keys): the export request id and when it was made, and
once the file is in place its name, size and sha256. It is rewritten atomically on each change.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
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

JOURNAL_NAME = ".amp-cohorts-journal.json"
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

    async def load(self) -> None:
        def read() -> dict[str, Any]:
            try:
                data = json.loads(self.path.read_text("utf-8"))
            except FileNotFoundError:
                return {}
            except (OSError, ValueError):
                return {}  # an unreadable journal only costs a fresh start
            return data if isinstance(data, dict) else {}

        raw = await anyio.to_thread.run_sync(read)
        for key, value in (raw.get("entries") or {}).items():
            if isinstance(value, dict) and isinstance(value.get("cohort_id"), str):
                fields = {f.name for f in attrs.fields(JournalEntry)}
                self.entries[key] = JournalEntry(**{k: v for k, v in value.items() if k in fields})

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
                await anyio.to_thread.run_sync(self._write, snapshot)

    def _write(self, snapshot: dict[str, Any]) -> None:
        temp = self.path.with_name(self.path.name + ".tmp")
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(snapshot, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)


def utc_now_iso(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).isoformat()
