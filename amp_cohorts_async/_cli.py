"""amp-cohorts: the command line (``python -m amp_cohorts_async`` too).

Credentials come from AMPLITUDE_API_KEY / AMPLITUDE_SECRET_KEY. Expected failures print one
line and exit non-zero (2 bad input, 3 auth, 4 not found, 5 quota or limits, 1 other); add
--debug for a traceback. Ctrl-C stops cleanly: no partial file is left, and the journal lets
``download --resume`` go on without spending quota again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

import anyio
import attrs

from ._client import CohortsClient
from ._config import REGIONS, PollPolicy
from ._exceptions import (
    AmplitudeError,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    QuotaExceededError,
    RateLimitError,
)
from ._members import iter_members
from ._models import (
    Cohort,
    CohortOutcome,
    DownloadResult,
    IdType,
    MembershipChange,
    MembershipIdType,
    Operation,
)
from ._progress import ProgressView, human_bytes

__all__ = ("main",)

EXIT_CODES: tuple[tuple[type[AmplitudeError], int], ...] = (
    (InvalidRequestError, 2),
    (AuthenticationError, 3),
    (NotFoundError, 4),
    (QuotaExceededError, 5),
    (RateLimitError, 5),
)


def _jsonable(value: Any) -> Any:
    if attrs.has(type(value)):
        return {k: _jsonable(v) for k, v in attrs.asdict(value, recurse=False).items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, pathlib.Path):
        return str(value)
    if isinstance(value, AmplitudeError):
        return f"{type(value).__name__}: {value}"
    return value


def _print_json(value: Any, out: IO[str]) -> None:
    json.dump(_jsonable(value), out, indent=2, default=str)
    out.write("\n")


def _report(args: argparse.Namespace, out: IO[str], value: Any, text: str) -> int:
    """``value`` as JSON with --json, else one line of ``text``."""
    if args.json:
        _print_json(value, out)
    else:
        out.write(text + "\n")
    return 0


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
            raise InvalidRequestError(f"cannot read {source}: {exc.strerror}") from None
    with handle if source != "-" else contextlib.nullcontext(handle):
        if column is None:
            return [line.strip() for line in handle if line.strip()]
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise InvalidRequestError(f"{source} has no column {column!r}")
        return [row[column].strip() for row in reader if row[column] and row[column].strip()]


# -- commands ---------------------------------------------------------------------------------

async def cmd_list(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    cohorts = await client.list_cohorts(include_sync_info=args.sync_info)
    if args.json:
        _print_json(cohorts, out)
        return 0
    if _is_tty(out):
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
    return _report(args, out, usage, f"{usage.usage} of {usage.limit} cohort requests used "
                   f"this month; {usage.remaining} left; resets {usage.resets_at.isoformat()}")


async def _count_members(path: pathlib.Path) -> int:
    count = 0
    async for _row in iter_members(path):
        count += 1
    return count


async def _summary(outcomes: list[CohortOutcome], started: float, out: IO[str],
                   as_json: bool, durations: dict[str, float] | None = None) -> None:
    """The closing table: cohort, members, size, sha256 prefix, seconds, file (or error)."""
    durations = durations or {}
    rows = []
    for outcome in outcomes:
        result = outcome.result
        members = await _count_members(result.path) if result is not None else None
        rows.append((outcome, members))
    if as_json:
        _print_json([{"cohort_id": o.cohort_id, "members": m, "result": o.result,
                      "error": o.error, "seconds": durations.get(o.cohort_id)}
                     for o, m in rows], out)
        return
    elapsed = time.monotonic() - started
    if _is_tty(out):
        from rich.console import Console
        from rich.table import Table

        table = Table("cohort", "members", "size", "sha256", "time", "file / error",
                      title=f"{len(outcomes)} cohorts in {elapsed:.1f}s")
        for outcome, members in rows:
            r = outcome.result
            took = durations.get(outcome.cohort_id)
            seconds = f"{took:.1f}s" if took is not None else ""
            if r is not None:
                table.add_row(outcome.cohort_id, f"{members:,}", human_bytes(r.size_bytes),
                              r.sha256[:12], seconds, str(r.path))
            else:
                table.add_row(outcome.cohort_id, "", "", "", seconds, f"[red]{outcome.error}[/]")
        Console(file=out).print(table)
    else:
        for outcome, members in rows:
            r = outcome.result
            took = durations.get(outcome.cohort_id)
            seconds = f"{took:.1f}s" if took is not None else "-"
            if r is not None:
                out.write(f"{outcome.cohort_id}\t{members}\t{r.size_bytes}\t{r.sha256[:12]}"
                          f"\t{seconds}\t{r.path}\n")
            else:
                out.write(f"{outcome.cohort_id}\tFAILED\t{outcome.error}\n")
        out.write(f"{len(outcomes)} cohorts in {elapsed:.1f}s\n")


async def cmd_download(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    directory = anyio.Path(args.output)
    await directory.mkdir(parents=True, exist_ok=True)
    targets: list[str | Cohort]
    if args.all:
        if args.cohort_ids:
            raise InvalidRequestError("pass cohort ids or --all, not both")
        targets = list(await client.list_cohorts())
    elif not args.cohort_ids:
        raise InvalidRequestError("name at least one cohort id, or --all")
    else:
        targets = list(args.cohort_ids)
    ids = [t.id if isinstance(t, Cohort) else t for t in targets]
    props = args.props or bool(args.prop_key)
    started = time.monotonic()
    # With --json, stdout carries only the JSON summary; progress goes to stderr.
    progress_stream = sys.stderr if args.json else out
    view = ProgressView(list(dict.fromkeys(ids)), stream=progress_stream,
                        live=_is_tty(progress_stream))
    with view:
        outcomes = await client.download_cohorts(
            targets, str(directory), props=props, prop_keys=tuple(args.prop_key),
            on_progress=view, resume=args.resume,
        )
    await _summary(outcomes, started, out, args.json, view.durations())
    if not args.json:
        out.write(f"files are in {await directory.resolve()}\n")
    return 0 if all(o.ok for o in outcomes) else 1


async def cmd_upload(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    ids = read_ids(args.file, args.column)
    result = await client.upload_cohort(
        name=args.name, app_id=args.app_id, id_type=args.id_type, ids=ids, owner=args.owner,
        published=args.published, existing_cohort_id=args.existing, cg=args.group,
        skip_save=args.dry_run,
    )
    dupes = result.duplicates_removed
    return _report(args, out, result, f"cohort {result.cohort_id}: {result.matched:,} of "
                   f"{result.totals:,} ids matched in {result.requests_sent} requests"
                   + (f", {dupes:,} duplicates removed" if dupes else ""))


async def cmd_membership(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    ids = read_ids(args.file, args.column)
    operation = Operation.ADD if args.operation == "add" else Operation.REMOVE
    result = await client.update_membership(
        args.cohort_id, [MembershipChange(ids=ids, id_type=args.id_type, operation=operation)],
        count_group=args.count_group,
    )
    skipped = sum(len(o.skipped_ids) for o in result.memberships_result)
    return _report(args, out, result, f"cohort {result.cohort_id}: {operation.value} "
                   f"{len(ids):,} ids in {result.requests_sent} requests, {skipped:,} skipped")


async def cmd_request(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    props = args.props or bool(args.prop_key)
    request = await client.request_cohort(args.cohort_id, props=props,
                                          prop_keys=tuple(args.prop_key))
    return _report(args, out, request, request.request_id)


async def cmd_status(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    status = await client.get_request_status(args.request_id)
    return _report(args, out, status, str(status.async_status))


async def cmd_fetch(client: CohortsClient, args: argparse.Namespace, out: IO[str]) -> int:
    result: DownloadResult = await client.download_file(args.request_id, args.output)
    return _report(args, out, result, f"{result.path}\t{result.size_bytes}\t{result.sha256}")


COMMANDS = {
    "list": cmd_list, "usage": cmd_usage, "download": cmd_download, "upload": cmd_upload,
    "membership": cmd_membership, "request": cmd_request, "status": cmd_status,
    "fetch": cmd_fetch,
}


def _is_tty(out: IO[str]) -> bool:
    return out.isatty()


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--region", choices=sorted(REGIONS), default="us")
    common.add_argument("--base-url", help="Amplitude origin override (proxies, the emulator)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    parser = argparse.ArgumentParser(prog="amp-cohorts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", parents=[common], help="list cohorts")
    p.add_argument("--sync-info", action="store_true")
    sub.add_parser("usage", parents=[common], help="this month's cohort-request usage")

    p = sub.add_parser("download", parents=[common], help="request, poll and download cohorts")
    p.add_argument("cohort_ids", nargs="*", metavar="COHORT_ID")
    p.add_argument("--all", action="store_true", help="every cohort list shows")
    p.add_argument("-o", "--output", default=".", help="directory (default: current)")
    p.add_argument("--props", action="store_true", help="include user properties")
    p.add_argument("--prop-key", action="append", default=[], metavar="KEY",
                   help="a user property to include (repeatable; implies --props)")
    p.add_argument("--resume", action="store_true",
                   help="skip verified files and reuse export requests younger than 6 days")
    p.add_argument("--poll-interval", type=float, default=2.0, metavar="SECONDS",
                   help="first wait before polling an export's status (grows to 30 s)")

    def ids_source(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", metavar="FILE", help="ids one per line, a CSV, or - for stdin")
        p.add_argument("--column", help="take ids from this CSV column")

    p = sub.add_parser("upload", parents=[common], help="create or replace a cohort from ids")
    ids_source(p)
    p.add_argument("--name", required=True)
    p.add_argument("--owner", required=True, help="login email of the owner")
    p.add_argument("--app-id", type=int, required=True)
    p.add_argument("--id-type", choices=[t.value for t in IdType], default="BY_USER_ID")
    p.add_argument("--existing", metavar="COHORT_ID", help="replace this cohort's members")
    p.add_argument("--group", metavar="CG", help="group type (count group) of the ids")
    p.add_argument("--published", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="validate only (skip_save)")

    p = sub.add_parser("membership", parents=[common], help="add or remove ids in a cohort")
    p.add_argument("operation", choices=["add", "remove"])
    p.add_argument("cohort_id", metavar="COHORT_ID")
    ids_source(p)
    p.add_argument("--id-type", choices=[t.value for t in MembershipIdType], default="BY_NAME")
    p.add_argument("--count-group")

    p = sub.add_parser("request", parents=[common], help="start one export (costs quota)")
    p.add_argument("cohort_id", metavar="COHORT_ID")
    p.add_argument("--props", action="store_true")
    p.add_argument("--prop-key", action="append", default=[], metavar="KEY")
    p = sub.add_parser("status", parents=[common], help="status of an export request")
    p.add_argument("request_id", metavar="REQUEST_ID")
    p = sub.add_parser("fetch", parents=[common], help="download the file of a request")
    p.add_argument("request_id", metavar="REQUEST_ID")
    p.add_argument("-o", "--output", required=True, help="file path")

    p = sub.add_parser("demo", help="run the downloader against the built-in emulator")
    p.add_argument("-o", "--output", default="amp-cohorts-demo")
    p.add_argument("--debug", action="store_true")
    return parser


def _exit_code(error: AmplitudeError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return 1


async def run(args: argparse.Namespace, out: IO[str]) -> int:
    if args.command == "demo":
        from ._demo import run_demo

        return await run_demo(pathlib.Path(args.output), out)
    poll = PollPolicy(initial_interval=getattr(args, "poll_interval", 2.0))
    async with CohortsClient(region=args.region, base_url=args.base_url, poll=poll) as client:
        return await COMMANDS[args.command](client, args, out)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = sys.stdout
    try:
        code = asyncio.run(run(args, out))
    except KeyboardInterrupt:
        print("interrupted: no partial file was left; run the same download with --resume "
              "to continue without spending quota again", file=sys.stderr)
        code = 130
    except AmplitudeError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        code = _exit_code(error)
    except ModuleNotFoundError as error:
        if error.name != "rich" or args.debug:
            raise
        print("error: the command line needs rich: pip install 'amp-cohorts-async[cli]'",
              file=sys.stderr)
        code = 2
    sys.stdout.flush()
    raise SystemExit(code)
