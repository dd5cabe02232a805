"""The subcommands of amp-cohorts: each takes the client, the parsed arguments and stdout."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import pathlib
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO

import anyio

from .._client import CohortsClient
from .._diff import diff_members
from .._exceptions import DiskError, InvalidRequestError, NotFoundError
from .._file_limits import FileLimits
from .._limits import LimitsBackend
from .._mirror import mirror_cohort
from .._models import Cohort, CohortOutcome, DownloadResult, MembershipChange, Operation
from .._store import DirectoryStore, Plan
from .._validate import export_options, require_id
from ._live import ProgressView
from ._output import is_tty, plural, print_json, report, summary, sync_summary
from ._sync_diff import diff_downloads

__all__ = ("COMMANDS", "EMPTY_UPLOAD", "limits_backend", "read_ids", "run_diff")

EMPTY_UPLOAD = 6  # an upload in which no id matched (documented exit code)


try:  # the shared limits need the optional redis extra
    from ..redis import RedisLimits
except ModuleNotFoundError:  # pragma: no cover - depends on what is installed
    RedisLimits = None  # type: ignore[assignment, misc]


def limits_backend(url: str | None) -> LimitsBackend:
    """The shared limits named by ``--limits-url`` / AMPLITUDE_LIMITS_URL, else the file of
    this app in the user's cache: successive and concurrent runs on this host share it."""
    url = url or os.environ.get("AMPLITUDE_LIMITS_URL") or None
    if url is None:
        return FileLimits()
    if RedisLimits is None:
        raise InvalidRequestError("--limits-url needs redis-py: "
                                  "pip install 'amp-cohorts-async[redis]'")
    return RedisLimits.from_url(url)


# -- reading ids ---------------------------------------------------------------------------

def read_ids(source: str, column: str | None) -> list[str]:
    """Ids from a file (or ``-`` for stdin): one per line, or a CSV column by name."""
    handle: IO[str]
    if source == "-":
        handle = sys.stdin
    else:
        try:
            handle = open(source, encoding="utf-8-sig", newline="")  # noqa: SIM115
        except OSError as exc:
            raise InvalidRequestError(f"cannot read {source}: {exc.strerror or exc}") from None
    try:
        with handle if source != "-" else contextlib.nullcontext(handle):
            if column is None:
                lines = [line.strip() for line in handle if line.strip()]
                _refuse_several_columns(source, lines[:1])
                return lines
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise InvalidRequestError(f"{source} has no column {column!r}")
            return [row[column].strip() for row in reader
                    if row[column] and row[column].strip()]
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{source} is not UTF-8 text") from None
    except csv.Error as exc:
        raise InvalidRequestError(f"{source} is not a readable CSV: {exc}") from None


def _refuse_several_columns(source: str, first_line: list[str]) -> None:
    """Whole lines of a CSV with several columns are never ids: ask which column holds them."""
    columns = next(csv.reader(first_line), [])
    if len(columns) > 1:
        names = ", ".join(repr(c.strip()) for c in columns)
        raise InvalidRequestError(
            f"{source} has several columns ({names}); say which one holds the ids with "
            f"--column NAME (its first line is read as the header)")


# -- commands ---------------------------------------------------------------------------------

async def cmd_list(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    cohorts = await client.list_cohorts(include_sync_info=args.sync_info)
    if args.json:
        print_json(cohorts, out)
        return 0
    if is_tty(out):
        from rich.console import Console
        from rich.table import Table

        table = Table("id", "name", "size", "owners", "last computed")
        for c in cohorts:
            table.add_row(c.id, c.name or "", f"{c.size:,}" if c.size is not None else "",
                          ", ".join(c.owners or []),
                          c.last_computed.isoformat(timespec="minutes") if c.last_computed else "")
        Console(file=out).print(table)
    else:
        for c in cohorts:
            out.write(f"{c.id}\t{c.name or ''}\t{c.size if c.size is not None else ''}\n")
    return 0


async def cmd_usage(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    usage = await client.get_usage()
    return report(args, out, usage, f"{usage.usage} of {usage.limit} cohort requests used "
                   f"this month; {usage.remaining} left; resets {usage.resets_at.isoformat()}")


async def cmd_download(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    directory = anyio.Path(args.output)
    try:
        await directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InvalidRequestError(f"-o {args.output}: a file is in the way of that "
                                  "directory") from None
    targets: list[str | Cohort]
    if args.all:
        if args.cohort_ids:
            raise InvalidRequestError("pass cohort ids or --all, not both")
        targets = list(await client.list_cohorts())
    elif not args.cohort_ids:
        raise InvalidRequestError("name at least one cohort id, or --all")
    else:
        targets = list(_argv_ids(args.cohort_ids))
    ids = [t.id if isinstance(t, Cohort) else t for t in targets]
    props = args.props or bool(args.prop_key)
    info = sys.stderr if args.json else out  # with --json, stdout carries only the JSON
    plan = await _earlier_batch(pathlib.Path(args.output), ids, props, tuple(args.prop_key),
                                client)
    if not args.resume and plan is not None and plan.finished:
        count = len(plan.finished)
        info.write(f"note: {plural(count, 'file')} here {'comes' if count == 1 else 'come'} "
                   f"from a batch of the last 6 days; --resume keeps "
                   f"{'it' if count == 1 else 'them'} and spends no quota on "
                   f"{'it' if count == 1 else 'them'}\n")
    spent_before = client.scheduler.cohort_requests_spent
    started = time.monotonic()
    # On a terminal without rich the view itself falls back to plain lines, saying so once.
    resumed = plan if args.resume and plan is not None else None
    view = ProgressView(list(dict.fromkeys(ids)), stream=info, live=info.isatty(),
                        as_json=args.json, kept=resumed.finished if resumed else (),
                        reused=resumed.reusable if resumed else ())
    with view:
        outcomes = await client.download_cohorts(
            targets, str(directory), props=props, prop_keys=tuple(args.prop_key),
            on_progress=view, resume=args.resume,
        )
    await summary(outcomes, started, out, args.json, view.durations())
    requested = client.scheduler.cohort_requests_spent - spent_before
    if args.resume and plan is not None:
        info.write(f"resumed: kept {plural(len(plan.finished), 'verified file')}, reused "
                   f"{plural(len(plan.reusable), 'export request')}, requested "
                   f"{plural(requested, 'new export')}\n")
    elif not args.json:
        info.write(f"{plural(requested, 'cohort request')} spent\n")
    if not args.json and any(o.ok for o in outcomes):
        out.write(f"files are in {await directory.resolve()}\n")
    return _exit_code_of(outcomes)


def _argv_ids(values: list[str]) -> list[str]:
    """The cohort ids of a command line, each valid. The library would fail a bad one alone
    and go on with the others; on a command line it is a typo to fix before anything is
    spent."""
    return [require_id(value, f"cohort id {position + 1}")
            for position, value in enumerate(values)]


def _exit_code_of(outcomes: list[CohortOutcome]) -> int:
    """0 all fine; 4 when every failure is a cohort that does not exist; 2 when every failure
    is a file that could not be written (a full disk); 1 otherwise."""
    errors = [o.error for o in outcomes if o.error is not None]
    if not errors:
        return 0
    for kind, code in ((NotFoundError, 4), (DiskError, 2)):
        if all(isinstance(e, kind) for e in errors):
            return code
    return 1


async def _earlier_batch(directory: pathlib.Path, ids: list[str], props: bool,
                         prop_keys: tuple[str, ...], client: CohortsClient) -> Plan | None:
    """What the journal of an earlier batch in ``directory`` holds for these ids (a look
    only: nothing is changed), or None without one."""
    store = DirectoryStore(directory)
    await store.load(set_aside=False)
    if not store.entries:
        return None
    export = export_options(props, prop_keys)
    return await store.plan(list(dict.fromkeys(ids)), export, client.scheduler.wall_clock())


async def cmd_upload(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    ids = read_ids(args.file, args.column)
    result = await client.upload_cohort(
        name=args.name, app_id=args.app_id, id_type=args.id_type, ids=ids, owner=args.owner,
        published=args.published, existing_cohort_id=args.existing, cg=args.group,
        skip_save=args.dry_run,
    )
    dupes = result.duplicates_removed
    details = (f"{result.matched:,} of {result.totals:,} ids matched in "
               f"{plural(result.requests_sent, 'request')}"
               + (f", {dupes:,} duplicates removed" if dupes else ""))
    if args.dry_run:
        text = f"dry run, nothing saved: {details}"
    else:
        text = f"cohort {result.cohort_id}: {details}"
    report(args, out, result, text)
    if result.matched == 0 and not args.allow_empty:
        sys.stderr.write("error: no id matched a known user; nothing useful was uploaded "
                         "(pass --allow-empty if that is what you meant)\n")
        return EMPTY_UPLOAD
    return 0


async def cmd_membership(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    ids = read_ids(args.file, args.column)
    operation = Operation.ADD if args.operation == "add" else Operation.REMOVE
    result = await client.update_membership(
        args.cohort_id, [MembershipChange(ids=ids, id_type=args.id_type, operation=operation)],
        count_group=args.count_group,
    )
    skipped = sum(len(o.skipped_ids) for o in result.memberships_result)
    return report(args, out, result, f"cohort {result.cohort_id}: {operation.value} "
                   f"{plural(len(ids), 'id')} in {plural(result.requests_sent, 'request')}, "
                   f"{skipped:,} skipped")


async def cmd_request(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    props = args.props or bool(args.prop_key)
    request = await client.request_cohort(args.cohort_id, props=props,
                                          prop_keys=tuple(args.prop_key))
    return report(args, out, request, request.request_id)


async def cmd_status(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    status = await client.get_request_status(args.request_id)
    return report(args, out, status, str(status.async_status))


async def cmd_fetch(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    result: DownloadResult = await client.download_file(args.request_id, args.output)
    return report(args, out, result, f"{result.path}\t{result.size_bytes}\t{result.sha256}")


# Runs a month at each cadence, for the dry run's projection.
RUNS_A_MONTH = {"1d": 30, "1h": 720}


async def cmd_sync(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    if args.every and not args.dry_run:
        raise InvalidRequestError("--every projects a dry run's cost: add --dry-run")
    if args.diff and args.keep_versions == 1:
        raise InvalidRequestError("--diff compares each new copy with the version before it: "
                                  "keep it with --keep-versions 2 or more")
    if args.all:
        if args.cohort_ids:
            raise InvalidRequestError("pass cohort ids or --all, not both")
        targets: list[str | Cohort] = [c for c in await client.list_cohorts() if not c.archived]
    elif not args.cohort_ids:
        raise InvalidRequestError("name at least one cohort id, or --all")
    else:
        targets = list(_argv_ids(args.cohort_ids))
    info = sys.stderr if args.json else out  # with --json, stdout carries only the JSON
    started = time.monotonic()
    view = ProgressView([], stream=info, live=info.isatty())
    with view:
        report = await client.sync_cohorts(
            targets, args.directory, props=args.props or bool(args.prop_key),
            prop_keys=tuple(args.prop_key), max_requests=args.max_requests,
            dry_run=args.dry_run, keep_versions=args.keep_versions, on_progress=view,
        )
    diffs = None
    if args.diff:
        diffs = await diff_downloads(report, args.directory, export_options(
            args.props or bool(args.prop_key), tuple(args.prop_key)))
    sync_summary(report, time.monotonic() - started, out, args.json, diffs)
    if args.dry_run and not args.json:
        needed = report.count("planned") + report.count("over_budget")
        info.write(f"dry run: {plural(report.count('planned'), 'cohort request')} would be "
                   f"spent{_left(report.quota_remaining)}\n")
        if args.every:
            runs = RUNS_A_MONTH[args.every]
            info.write(f"every {args.every}: about {needed * runs:,} cohort requests a month if "
                       f"{needed} of {len(report.entries)} cohorts change each time "
                       f"({runs} runs; the quota is {client.limits.monthly_quota or 'unlimited'})"
                       "\n")
    errors = [e.error for e in report.entries if e.error is not None]
    if errors:
        return 4 if all(isinstance(e, NotFoundError) for e in errors) else 1
    if report.count("missing"):
        return 4
    # The copies are in place; a diff that could not be written is still a failed run.
    return 1 if diffs and any(d.error is not None for d in diffs.values()) else 0


def _left(quota_remaining: int | None) -> str:
    return "" if quota_remaining is None else f"; {quota_remaining:,} would be left this month"


Command = Callable[[CohortsClient, argparse.Namespace, IO[str]], Awaitable[int]]

async def run_diff(args: argparse.Namespace, out: IO[str]) -> int:
    """``diff OLD NEW OUT_DIR``: files only, so no credentials and no client."""
    diff = await diff_members(args.old, args.new, args.out_dir, key=args.key)
    return report(args, out, diff, (
        f"{diff.entering:,} entering, {diff.exiting:,} exiting, {diff.unchanged:,} unchanged"
        f" by {diff.key}" + (f", {plural(diff.no_key, 'row')} without a {diff.key} (not "
                             f"compared)" if diff.no_key else "")
        + f" -> {diff.entering_path}, {diff.exiting_path}"))


def _target_key(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise InvalidRequestError(f"set {name} in the environment (the target project's key)")
    return value


async def cmd_mirror(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    """``mirror COHORT_ID STATE_DIR``: the cohort of this project kept in the target's."""
    backend = limits_backend(args.limits_url)
    try:
        async with CohortsClient(
            _target_key("AMPLITUDE_TARGET_API_KEY"), _target_key("AMPLITUDE_TARGET_SECRET_KEY"),
            region=args.target_region,
            base_url=args.target_base_url or os.environ.get("AMPLITUDE_TARGET_BASE_URL") or None,
            limits_backend=backend,
        ) as target:
            result = await mirror_cohort(client, target, args.cohort_id, args.state_dir,
                                         app_id=args.app_id, owner=args.owner, name=args.name,
                                         published=args.published)
    finally:
        await backend.aclose()
    where = result.target_cohort_id or "no target cohort (the source has no user ids yet)"
    return report(args, out, result, (
        f"{result.action}: {result.source_cohort_id} -> {where}: {result.entering:,} entering, "
        f"{result.exiting:,} exiting, {plural(result.skipped_no_user_id, 'member')} without a "
        f"user id (not mirrored)"))


COMMANDS: dict[str, Command] = {
    "list": cmd_list, "usage": cmd_usage, "download": cmd_download, "upload": cmd_upload,
    "membership": cmd_membership, "request": cmd_request, "status": cmd_status,
    "fetch": cmd_fetch, "sync": cmd_sync, "mirror": cmd_mirror,
}


