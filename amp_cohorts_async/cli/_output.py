"""How the command line prints: JSON with --json, tables on a terminal, plain lines in pipes."""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import time
from collections.abc import Sequence
from typing import IO, Any

import attrs

from .._exceptions import AmplitudeError
from .._models import CohortOutcome, SyncEntry, SyncReport
from ._sync_diff import SyncDiff

__all__ = ("error_object", "human_bytes", "is_tty", "print_json", "report", "summary",
           "sync_summary")


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"  # pragma: no cover - the loop returns


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
        return error_object(value)
    return value


def error_object(error: AmplitudeError) -> dict[str, Any]:
    """An error as --json shows it: its type, the HTTP status (None when there was none), the
    server's error type, and the message."""
    return {"type": type(error).__name__, "status": getattr(error, "status_code", None),
            "error_type": getattr(error, "type", None), "message": str(error)}


def print_json(value: Any, out: IO[str]) -> None:
    json.dump(_jsonable(value), out, indent=2, default=str)
    out.write("\n")


def report(args: argparse.Namespace, out: IO[str], value: Any, text: str) -> int:
    """``value`` as JSON with --json, else one line of ``text``."""
    if args.json:
        print_json(value, out)
    else:
        out.write(text + "\n")
    return 0


def is_tty(out: IO[str]) -> bool:
    """Whether to draw tables and live views: a terminal, and rich installed (the cli extra)."""
    return out.isatty() and rich_available()


@functools.cache
def rich_available() -> bool:
    try:
        import rich.console  # noqa: F401 - the cli extra is optional
    except ModuleNotFoundError:
        return False
    return True



def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


async def summary(outcomes: list[CohortOutcome], started: float, out: IO[str],
                  as_json: bool, durations: dict[str, float] | None = None) -> None:
    """The closing table: cohort, members, size, sha256 prefix, seconds, file (or error).

    Member counts come from the transfer itself (counted as each file was written), so the
    summary needs no second read of the files.
    """
    durations = durations or {}
    rows = [(o, o.result.members if o.result is not None else None) for o in outcomes]
    if as_json:
        print_json([{"cohort_id": o.cohort_id, "members": m, "result": o.result,
                      "error": o.error, "seconds": durations.get(o.cohort_id),
                      "attempts": o.attempts, "retries": o.retries, "waited": o.waited}
                     for o, m in rows], out)
        return
    elapsed = time.monotonic() - started
    if is_tty(out):
        from rich.console import Console
        from rich.table import Table

        table = Table("cohort", "members", "size", "sha256", "time", "file / error",
                      title=f"{plural(len(outcomes), 'cohort')} in {elapsed:.1f}s")
        for outcome, members in rows:
            r = outcome.result
            took = durations.get(outcome.cohort_id)
            seconds = f"{took:.1f}s" if took is not None else ""
            if r is not None:
                table.add_row(outcome.cohort_id, "" if members is None else f"{members:,}",
                              human_bytes(r.size_bytes),
                              r.sha256[:12], seconds, str(r.path))
            else:
                table.add_row(outcome.cohort_id, "", "", "", seconds, f"[red]{outcome.error}[/]")
        Console(file=out).print(table)
    else:
        out.write("cohort\tmembers\tbytes\tsha256\tseconds\tfile or error\n")
        for outcome, members in rows:
            r = outcome.result
            took = durations.get(outcome.cohort_id)
            seconds = f"{took:.1f}" if took is not None else "-"
            if r is not None:
                count = "-" if members is None else str(members)
                out.write(f"{outcome.cohort_id}\t{count}\t{r.size_bytes}\t{r.sha256[:12]}"
                          f"\t{seconds}\t{r.path}\n")
            else:
                out.write(f"{outcome.cohort_id}\t-\t-\t-\t{seconds}\tFAILED: "
                          f"{outcome.error}\n")
        out.write(f"{plural(len(outcomes), 'cohort')} in {elapsed:.1f}s\n")
    held = held_line(outcomes)
    if held:
        out.write(held + "\n")


# How the closing line names each reason a request was held.
_HELD_FOR = {"limits": "for the rate limits", "amplitude": "in Amplitude's pause after a 429",
             "retry": "before retries"}


def held_line(items: Sequence[CohortOutcome | SyncEntry]) -> str | None:
    """What the exports waited for and how often they retried, summed (None when it is
    nothing worth a line: no retry and under a second held)."""
    waited: dict[str, float] = {}
    for item in items:
        for reason, seconds in item.waited.items():
            waited[reason] = waited.get(reason, 0.0) + seconds
    retries = sum(item.retries for item in items)
    if not retries and sum(waited.values()) < 1.0:
        return None
    parts = [f"{seconds:.0f}s {_HELD_FOR.get(reason, reason)}"
             for reason, seconds in sorted(waited.items()) if seconds >= 0.5]
    if retries:
        parts.append(f"{retries:,} {'retry' if retries == 1 else 'retries'}")
    return "held: " + ", ".join(parts)




def _sync_row(entry: SyncEntry, diffs: dict[str, SyncDiff] | None) -> tuple[str, ...]:
    """cohort, action (or the error), last computed, members, size; with ``diffs``: entering
    and exiting (or why the diff failed)."""
    computed = "" if entry.last_computed is None else entry.last_computed.isoformat(
        timespec="minutes")
    result = entry.result
    members = "" if result is None or result.members is None else f"{result.members:,}"
    size = ""
    if result is not None:
        size = human_bytes(result.size_bytes)
    elif entry.path is not None and entry.path.exists():
        size = human_bytes(entry.path.stat().st_size)
    action = entry.action if entry.error is None else f"failed: {entry.error}"
    row: tuple[str, ...] = (entry.cohort_id, action, computed, members, size)
    if diffs is None:
        return row
    done = diffs.get(entry.cohort_id)
    if done is None:
        return (*row, "", "")
    if done.replaced:
        return (*row, "replaced since", "")
    if done.diff is None:
        return (*row, f"diff failed: {done.error}", "")
    return (*row, f"{done.diff.entering:,}", f"{done.diff.exiting:,}")


def _sync_json(report: SyncReport, diffs: dict[str, SyncDiff]) -> dict[str, Any]:
    """The report as JSON, each entry with its ``diff``: the MembershipDiff, ``{"error": ...}``,
    or null when nothing was downloaded."""
    data: dict[str, Any] = _jsonable(report)
    for entry in data["entries"]:
        done = diffs.get(entry["cohort_id"])
        entry["diff"] = (None if done is None else {"replaced": True} if done.replaced
                         else _jsonable(done.diff) if done.error is None
                         else {"error": _jsonable(done.error)})
    return data


def sync_summary(report: SyncReport, elapsed: float, out: IO[str], as_json: bool,
                 diffs: dict[str, SyncDiff] | None = None) -> None:
    """The closing table of a sync (cohort, action, last computed, members, size; with
    ``diffs`` entering and exiting), ending with the quota spent and left."""
    if as_json:
        print_json(report if diffs is None else _sync_json(report, diffs), out)
        return
    left = ("" if report.quota_remaining is None
            else f", {report.quota_remaining:,} left this month")
    footer = (f"{plural(len(report.entries), 'cohort')} in {elapsed:.1f}s: "
              f"{plural(report.requests_spent, 'cohort request')} spent{left}")
    rows = [_sync_row(entry, diffs) for entry in report.entries]
    columns = ["cohort", "action", "last computed", "members", "size"]
    if diffs is not None:
        columns += ["entering", "exiting"]
    if is_tty(out):
        from rich.console import Console
        from rich.table import Table

        table = Table(*columns, caption=footer)
        for row in rows:
            table.add_row(*row)
        Console(file=out).print(table)
    else:
        out.write("\t".join(columns) + "\n")
        for row in rows:
            out.write("\t".join(value or "-" for value in row) + "\n")
        out.write(footer + "\n")
    held = held_line(report.entries)
    if held:
        out.write(held + "\n")
    for entry in report.entries:
        done = (diffs or {}).get(entry.cohort_id)
        if done is not None and done.diff is not None and entry.previous_path is None:
            out.write(f"{entry.cohort_id}: no earlier version to compare with; every member "
                      f"counts as entering\n")
        elif done is not None and done.replaced:
            out.write(f"{entry.cohort_id}: another sync replaced this copy before its diff; "
                      f"that run's diff describes the copy now in place\n")
