"""sync_cohorts: one list and one usage call -> a decision per cohort -> the budget -> the
batch's own fan-out, each export under its cohort's lock.

Only a cohort that changed (its ``last_computed`` differs from the one its copy was exported
at) or that was never copied costs a cohort request. The decision is made twice: once for the
plan (and the budget), and again under the cohort's lock just before exporting, where another
run's export of the same change may have landed meanwhile (then this run reports it unchanged
and spends nothing).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from datetime import datetime

import attrs

from ._api import Api
from ._batch import export_one, fan_out
from ._download import Downloader
from ._events import Progress, ProgressCallback
from ._exceptions import AmplitudeError
from ._files import safe_filename
from ._journal import JournalEntry
from ._logs import log_sync
from ._models import (
    Cohort,
    CohortRequest,
    DownloadResult,
    ExportOptions,
    SyncAction,
    SyncEntry,
    SyncReport,
)
from ._scheduler import Scheduler
from ._store import DirectoryStore, journal_key, utc_now_iso

__all__ = ("sync_cohorts",)


@attrs.frozen
class _Look:
    """What the store says of one cohort against the list."""

    copy: DownloadResult | None  # the verified copy in place, of any last_computed
    unchanged: bool  # that copy was exported at the last_computed the list shows
    reusable: CohortRequest | None  # an export request made at that last_computed, still served
    entry: JournalEntry | None


def _look(entry: JournalEntry | None, copy: DownloadResult | None, cohort_id: str,
          listed: str | None, now: datetime) -> _Look:
    unchanged = (copy is not None and entry is not None and listed is not None
                 and entry.last_computed == listed)
    reusable = None
    if (not unchanged and entry is not None and listed is not None
            and entry.request_last_computed == listed and entry.request_is_fresh(now)):
        assert entry.request_id is not None  # request_is_fresh says so
        reusable = CohortRequest(request_id=entry.request_id, cohort_id=cohort_id)
    return _Look(copy=copy, unchanged=unchanged, reusable=reusable, entry=entry)


def _listed_time(cohort: Cohort) -> str | None:
    return None if cohort.last_computed is None else utc_now_iso(cohort.last_computed)


async def sync_cohorts(
    api: Api,
    downloader: Downloader,
    scheduler: Scheduler,
    cohort_ids: Sequence[str],
    directory: pathlib.Path,
    export: ExportOptions,
    on_progress: ProgressCallback | None,
    *,
    max_requests: int | None,
    dry_run: bool,
    keep_versions: int,
) -> SyncReport:
    """Arguments arrive validated; ``directory`` exists unless this is a dry run."""
    store = DirectoryStore(directory)
    if not dry_run:
        await store.check_writable()  # before anything is spent
    listed = {cohort.id: cohort for cohort in await api.list_cohorts(False)}
    quota_left = await _quota_left(api, scheduler)
    await store.load()  # nothing there (a dry run before the first run): no entries
    now = scheduler.wall_clock()
    unique = list(dict.fromkeys(cohort_ids))
    limit = scheduler.limits.max_cohort_size

    entries: dict[str, SyncEntry] = {}
    looks: dict[str, _Look] = {}
    wanted: list[str] = []  # cohorts that need a new cohort request
    found = {c: store.entries.get(journal_key(c, export)) for c in unique}
    copies = await store.verified_copies(found)
    for cohort_id in unique:
        cohort = listed.get(cohort_id)
        look = _look(found[cohort_id], copies[cohort_id], cohort_id,
                     None if cohort is None else _listed_time(cohort), now)
        looks[cohort_id] = look
        if cohort is None:
            entries[cohort_id] = _entry("missing", cohort_id, None, look.copy)
        elif cohort.size is not None and cohort.size > limit:
            entries[cohort_id] = _entry("too_large", cohort_id, cohort, look.copy)
        elif look.unchanged:
            entries[cohort_id] = _entry("unchanged", cohort_id, cohort, look.copy)
        elif look.reusable is None:
            wanted.append(cohort_id)

    bounds = [b for b in (max_requests, quota_left) if b is not None]
    budget = min(bounds) if bounds else len(wanted)
    # Never-copied cohorts first, then the oldest copy, then input order.
    position = {c: i for i, c in enumerate(unique)}
    wanted.sort(key=lambda c: (looks[c].copy is not None, _copy_age(looks[c]), position[c]))
    allowed = set(wanted[:budget])
    for cohort_id in wanted[budget:]:
        entries[cohort_id] = _entry("over_budget", cohort_id, listed[cohort_id],
                                    looks[cohort_id].copy)
    to_export = [c for c in unique if c not in entries]

    if dry_run:
        for cohort_id in to_export:
            entries[cohort_id] = _entry("planned", cohort_id, listed[cohort_id],
                                        looks[cohort_id].copy)
        remaining = None if quota_left is None else quota_left - len(allowed)
        report = SyncReport(entries=[entries[c] for c in cohort_ids], requests_spent=0,
                            quota_remaining=remaining)
        log_sync(report, dry_run=True)
        return report

    spent = 0

    def count_request() -> None:
        nonlocal spent
        spent += 1

    run = _Run(downloader, store, scheduler, export, on_progress, keep_versions, allowed,
               count_request)
    for cohort_id in to_export:
        Progress(on_progress, cohort_id).emit("queued")

    async def one(cohort_id: str) -> SyncEntry:
        return await run.sync_one(listed[cohort_id])

    sizes = {c: listed[c].size or 0 for c in to_export}
    for cohort_id, value in (await fan_out(to_export, sizes, one)).items():
        if isinstance(value, AmplitudeError):
            copy = await store.verified_copy(cohort_id, looks[cohort_id].entry)
            value = _entry("failed", cohort_id, listed[cohort_id], copy, error=value)
            observed = run.observers.get(cohort_id)
            if observed is not None:  # what the failed export went through
                value = attrs.evolve(value, **observed.tally())
        entries[cohort_id] = value
    remaining = None if quota_left is None else max(0, quota_left - spent)
    report = SyncReport(entries=[entries[c] for c in cohort_ids], requests_spent=spent,
                        quota_remaining=remaining)
    log_sync(report, dry_run=False)
    return report


def _entry(action: SyncAction, cohort_id: str, cohort: Cohort | None,
           copy: DownloadResult | None, *, error: AmplitudeError | None = None) -> SyncEntry:
    """An entry for a cohort this run did not download; an unchanged one carries its copy's
    DownloadResult (size, sha256, members as counted when it was written)."""
    return SyncEntry(cohort_id=cohort_id, action=action,
                     last_computed=None if cohort is None else cohort.last_computed,
                     path=None if copy is None else copy.path, error=error,
                     result=copy if action == "unchanged" else None)


def _copy_age(look: _Look) -> str:
    entry = look.entry
    if entry is None:
        return ""
    return entry.last_computed or entry.requested_at or ""


async def _quota_left(api: Api, scheduler: Scheduler) -> int | None:
    """This month's cohort requests left (one free usage call), None without a quota."""
    quota = scheduler.limits.monthly_quota
    if quota is None:
        return None
    usage = await api.get_usage()
    allowed = min(quota, usage.limit)
    return max(0, allowed - max(usage.usage, await scheduler.quota_used()))


class _Run:
    """The export of each planned cohort, under its lock, with versions kept."""

    def __init__(self, downloader: Downloader, store: DirectoryStore, scheduler: Scheduler,
                 export: ExportOptions, on_progress: ProgressCallback | None,
                 keep_versions: int, allowed: set[str], count_request: Callable[[], None]
                 ) -> None:
        self.downloader = downloader
        self.store = store
        self.scheduler = scheduler
        self.export = export
        self.on_progress = on_progress
        self.keep_versions = keep_versions
        self.allowed = allowed
        self.count_request = count_request
        #: Each exported cohort's observer, for what a failed export went through.
        self.observers: dict[str, Progress] = {}

    async def sync_one(self, cohort: Cohort) -> SyncEntry:
        cohort_id = cohort.id
        key = journal_key(cohort_id, self.export)
        listed = _listed_time(cohort)
        store = self.store
        async with store.cohort_lock(cohort_id):
            # Decide again: another run may have exported this change while we waited.
            entry = (await store.load()).get(key)
            look = _look(entry, await store.verified_copy(cohort_id, entry), cohort_id, listed,
                         self.scheduler.wall_clock())
            if look.unchanged:
                return _entry("unchanged", cohort_id, cohort, look.copy)
            if look.reusable is None and cohort_id not in self.allowed:
                return _entry("over_budget", cohort_id, cohort, look.copy)
            versions = [] if look.entry is None else list(look.entry.versions)
            previous = None
            if look.copy is not None and look.entry is not None and self.keep_versions > 1:
                previous = await store.keep_version(cohort_id, look.entry, look.copy)
            if previous is not None:
                name = previous.relative_to(store.directory).as_posix()
                versions = [name, *(v for v in versions if v != name)]
                # Journaled before the download, so a crash cannot orphan the version.
                await store.update(key, cohort_id=cohort_id, versions=versions)
            try:
                result = await export_one(
                    self.downloader, store, self.scheduler, cohort_id, self.export,
                    self.observers.setdefault(cohort_id, Progress(self.on_progress, cohort_id)),
                    reusable=look.reusable,
                    last_computed=listed, on_new_request=self.count_request)
            except BaseException:
                if previous is not None and await store.drop_version(
                        previous, store.directory / safe_filename(cohort_id)):
                    await store.update(key, cohort_id=cohort_id, versions=versions[1:])
                raise
            kept = await store.prune_versions(cohort_id, versions, self.keep_versions - 1)
            if kept != versions:
                await store.update(key, cohort_id=cohort_id, versions=kept)
            return SyncEntry(cohort_id=cohort_id, action="downloaded",
                             last_computed=cohort.last_computed, path=result.path,
                             previous_path=previous, result=result,
                             attempts=result.attempts, retries=result.retries,
                             waited=result.waited)
