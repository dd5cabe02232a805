"""Progress display for the command line: a live table on a terminal, plain lines elsewhere."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Collection
from typing import IO, Any

import attrs

from .._exceptions import AmplitudeError
from .._models import ProgressEvent
from ._output import error_object, human_bytes

__all__ = ("ProgressView",)


@attrs.define
class _Line:
    cohort_id: str
    phase: str = "queued"
    bytes_done: int = 0
    bytes_total: int | None = None
    wait_until: float | None = None
    wait_reason: str | None = None
    started: float = attrs.field(factory=time.monotonic)
    transfer_started: float | None = None
    finished: float | None = None
    error: AmplitudeError | None = None
    kept: bool = False  # a verified file of the earlier batch, kept (--resume)
    reused: bool = False  # an export request of the earlier batch, fetched again (--resume)


_LABELS = {"queued": "queued", "requested": "export requested", "polling": "export running",
           "failed": "failed", "cancelled": "cancelled"}
_ACTIVE = ("requested", "polling", "waiting", "downloading")
# Rows the live view keeps for itself: the table's header, the overall bar and the line
# that counts the rows left out; one more so the terminal does not scroll.
_FRAME_ROWS = 4


class ProgressView:
    """Receives ProgressEvents; renders them live (rich), as plain lines, or as JSON lines.

    ``kept`` and ``reused`` name the cohorts of an earlier batch that ``--resume`` keeps or
    fetches again, so they are labelled as such.
    """

    def __init__(self, cohort_ids: list[str], *, stream: IO[str] | None = None,
                 live: bool | None = None, as_json: bool = False,
                 kept: Collection[str] = (), reused: Collection[str] = ()) -> None:
        self.stream = stream or sys.stdout
        self.lines = {c: _Line(c, kept=c in kept, reused=c in reused) for c in cohort_ids}
        self.as_json = as_json
        self.live = (self.stream.isatty() if live is None else live) and not as_json
        self._live: Any = None

    # -- events --------------------------------------------------------------------------
    def __call__(self, event: ProgressEvent) -> None:
        line = self.lines.setdefault(event.cohort_id, _Line(event.cohort_id))
        previous = line.phase
        now = time.monotonic()
        line.phase = event.phase
        line.bytes_done = event.bytes_done
        line.bytes_total = event.bytes_total
        line.error = event.error
        if self.as_json:
            self._json_line(event)
        announce = event.phase != previous
        if event.phase == "waiting" and event.wait_seconds is not None:
            until = now + event.wait_seconds
            # A wait is re-reported as it runs down; say it again only if it moved.
            announce = (announce or line.wait_until is None or abs(until - line.wait_until) > 1
                        or event.wait_reason != line.wait_reason)
            line.wait_until = until
            line.wait_reason = event.wait_reason
        if event.phase == "downloading" and line.transfer_started is None:
            line.transfer_started = now
        if event.phase in ("done", "failed"):
            line.finished = now
        if self.live:
            self.refresh()
        elif announce and not self.as_json:
            print(f"{event.cohort_id}: {self.describe(line)}", file=self.stream, flush=True)

    def _json_line(self, event: ProgressEvent) -> None:
        record = {"cohort_id": event.cohort_id, "phase": event.phase,
                  "bytes_done": event.bytes_done, "bytes_total": event.bytes_total,
                  "wait_seconds": event.wait_seconds, "wait_reason": event.wait_reason,
                  "error": error_object(event.error) if event.error is not None else None}
        print(json.dumps(record), file=self.stream, flush=True)

    def durations(self) -> dict[str, float]:
        """Seconds from queued to done (or failed), per finished cohort."""
        return {c: line.finished - line.started for c, line in self.lines.items()
                if line.finished is not None}

    def describe(self, line: _Line) -> str:
        now = time.monotonic()
        if line.phase == "waiting" and line.wait_until is not None:
            if line.wait_until <= now:  # the wait is over: its request is on its way
                return "request sent"
            left = f"{max(0.0, line.wait_until - now):.0f}s left"
            if line.wait_reason == "amplitude":
                return f"Amplitude asked to wait (429), {left}"
            if line.wait_reason == "retry":
                return f"retrying after a failure, {left}"
            return f"waiting for the rate limits, {left}"
        if line.phase == "downloading":
            total = f"/{human_bytes(line.bytes_total)}" if line.bytes_total else ""
            elapsed = now - (line.transfer_started or now)
            speed = f" at {human_bytes(line.bytes_done / elapsed)}/s" if elapsed > 0.2 else ""
            return f"fetching {human_bytes(line.bytes_done)}{total}{speed}"
        if line.phase == "done":
            kept = " (kept from the earlier batch)" if line.kept else ""
            return f"done, {human_bytes(line.bytes_done)}{kept}"
        if line.phase == "failed" and line.error is not None:
            return f"failed: {line.error}"
        if line.reused and line.phase in ("requested", "polling"):
            return f"{_LABELS[line.phase]} (reusing the earlier export, no quota)"
        return _LABELS.get(line.phase, line.phase)

    def cancelled(self) -> None:
        """Interrupted: what had not finished is cancelled, not failed."""
        for line in self.lines.values():
            if line.phase not in ("done", "failed"):
                line.phase = "cancelled"
                if self.as_json:
                    print(json.dumps({"cohort_id": line.cohort_id, "phase": "cancelled"}),
                          file=self.stream, flush=True)
                elif not self.live:
                    print(f"{line.cohort_id}: cancelled", file=self.stream, flush=True)

    # -- live rendering ------------------------------------------------------------------
    def _render(self) -> Any:
        from rich.console import Group
        from rich.markup import escape
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table(box=None, show_header=True, header_style="bold")
        # One terminal row per cohort whatever the width: a long id or reason is cut short
        # (the summary at the end has them whole), so the view never outgrows the screen.
        table.add_column("cohort", no_wrap=True, overflow="ellipsis", max_width=28)
        table.add_column("status", no_wrap=True, overflow="ellipsis")
        height = self._live.console.size.height if self._live is not None else 24
        shown, left_out = self._rows_for(max(1, height - _FRAME_ROWS))
        for line in shown:
            style = {"done": "green", "failed": "red", "waiting": "yellow",
                     "cancelled": "dim"}.get(line.phase, "")
            text = escape(self.describe(line))
            table.add_row(escape(line.cohort_id), f"[{style}]{text}[/]" if style else text)
        if left_out:
            table.add_row(f"[dim]+ {len(left_out)} more[/]", "[dim]" + ", ".join(
                f"{count} {phase}" for phase, count in Counter(
                    "kept" if line.kept and line.phase == "done" else line.phase
                    for line in left_out).most_common()) + "[/]")
        finished = sum(1 for line in self.lines.values() if line.phase in ("done", "failed"))
        failed = sum(1 for line in self.lines.values() if line.phase == "failed")
        total = max(1, len(self.lines))
        bar = ProgressBar(total=total, completed=finished, width=40)
        summary = Table.grid(padding=(0, 1))
        summary.add_row(bar, f"{finished}/{len(self.lines)} cohorts finished"
                        + (f", {failed} failed" if failed else ""))
        return Group(table, summary)

    def _rows_for(self, room: int) -> tuple[list[_Line], list[_Line]]:
        """The cohorts worth a row when not all fit: those in progress, then the failed
        (with their reason), then the finished and the queued; the rest are counted."""
        lines = list(self.lines.values())
        if len(lines) <= room:
            return lines, []
        rank = {phase: n for n, phase in enumerate((*_ACTIVE, "failed", "cancelled", "done"))}
        ordered = sorted(lines, key=lambda line: rank.get(line.phase, len(rank)))
        room -= 1  # the row that counts the rest
        chosen = {id(line) for line in ordered[:room]}
        return ([line for line in lines if id(line) in chosen],
                [line for line in lines if id(line) not in chosen])

    def __enter__(self) -> ProgressView:
        if self.live:
            try:
                from rich.console import Console
                from rich.live import Live
            except ModuleNotFoundError:  # the command without its cli extra: plain lines
                self.live = False
                print("(install amp-cohorts-async[cli] for a live view)", file=self.stream,
                      flush=True)
                return self
            # get_renderable: every refresh renders anew, so countdowns tick between events.
            self._live = Live(console=Console(file=self.stream), refresh_per_second=4,
                              transient=False, get_renderable=self._render)
            self._live.__enter__()
        return self

    def refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self.cancelled()
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(None, None, None)
            self._live = None
