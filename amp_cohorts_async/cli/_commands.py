"""The subcommands of amp-cohorts: each takes the client, the parsed arguments and stdout."""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO

import anyio

from .._client import CohortsClient
from .._exceptions import InvalidRequestError
from .._models import Cohort, DownloadResult, MembershipChange, Operation
from ._live import ProgressView
from ._output import is_tty, print_json, report, summary

__all__ = ("COMMANDS", "read_ids")


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
                return [line.strip() for line in handle if line.strip()]
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise InvalidRequestError(f"{source} has no column {column!r}")
            return [row[column].strip() for row in reader
                    if row[column] and row[column].strip()]
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{source} is not UTF-8 text") from None
    except csv.Error as exc:
        raise InvalidRequestError(f"{source} is not a readable CSV: {exc}") from None


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
        targets = list(args.cohort_ids)
    ids = [t.id if isinstance(t, Cohort) else t for t in targets]
    props = args.props or bool(args.prop_key)
    started = time.monotonic()
    # With --json, stdout carries only the JSON summary; progress goes to stderr.
    progress_stream = sys.stderr if args.json else out
    view = ProgressView(list(dict.fromkeys(ids)), stream=progress_stream,
                        live=is_tty(progress_stream))
    with view:
        outcomes = await client.download_cohorts(
            targets, str(directory), props=props, prop_keys=tuple(args.prop_key),
            on_progress=view, resume=args.resume,
        )
    await summary(outcomes, started, out, args.json, view.durations())
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
    return report(args, out, result, f"cohort {result.cohort_id}: {result.matched:,} of "
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
    return report(args, out, result, f"cohort {result.cohort_id}: {operation.value} "
                   f"{len(ids):,} ids in {result.requests_sent} requests, {skipped:,} skipped")


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


Command = Callable[[CohortsClient, argparse.Namespace, IO[str]], Awaitable[int]]

COMMANDS: dict[str, Command] = {
    "list": cmd_list, "usage": cmd_usage, "download": cmd_download, "upload": cmd_upload,
    "membership": cmd_membership, "request": cmd_request, "status": cmd_status,
    "fetch": cmd_fetch,
}


