"""Progress display for the command line: a live table on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import attrs

from .._models import ProgressEvent

__all__ = ("ProgressView", "human_bytes")


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"  # pragma: no cover - the loop returns


@attrs.define
class _Line:
    cohort_id: str
    phase: str = "queued"
    bytes_done: int = 0
    bytes_total: int | None = None
    wait_until: float | None = None
    started: float = attrs.field(factory=time.monotonic)
    transfer_started: float | None = None
    finished: float | None = None


class ProgressView:
    """Receives ProgressEvents; renders them live (rich) or as plain lines."""

    def __init__(self, cohort_ids: list[str], *, stream: IO[str] | None = None,
                 live: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.lines = {c: _Line(c) for c in cohort_ids}
        self.live = self.stream.isatty() if live is None else live
        self._live: Any = None

    # -- events --------------------------------------------------------------------------
    def __call__(self, event: ProgressEvent) -> None:
        line = self.lines.setdefault(event.cohort_id, _Line(event.cohort_id))
        previous = line.phase
        now = time.monotonic()
        line.phase = event.phase
        line.bytes_done = event.bytes_done
        line.bytes_total = event.bytes_total
        announce = event.phase != previous
        if event.phase == "waiting" and event.wait_seconds is not None:
            until = now + event.wait_seconds
            # The scheduler re-reports a wait whenever it re-checks; say it again only if it moved.
            announce = announce or line.wait_until is None or abs(until - line.wait_until) > 1
            line.wait_until = until
        if event.phase == "downloading" and line.transfer_started is None:
            line.transfer_started = now
        if event.phase in ("done", "failed"):
            line.finished = now
        if self.live:
            self.refresh()
        elif announce:
            print(f"{event.cohort_id}: {self.describe(line)}", file=self.stream, flush=True)

    def durations(self) -> dict[str, float]:
        """Seconds from queued to done (or failed), per finished cohort."""
        return {c: line.finished - line.started for c, line in self.lines.items()
                if line.finished is not None}

    def describe(self, line: _Line) -> str:
        now = time.monotonic()
        if line.phase == "waiting" and line.wait_until is not None:
            return f"waiting for the rate window, {max(0.0, line.wait_until - now):.0f}s left"
        if line.phase == "downloading":
            total = f"/{human_bytes(line.bytes_total)}" if line.bytes_total else ""
            elapsed = now - (line.transfer_started or now)
            speed = f" at {human_bytes(line.bytes_done / elapsed)}/s" if elapsed > 0.2 else ""
            return f"downloading {human_bytes(line.bytes_done)}{total}{speed}"
        if line.phase == "done":
            return f"done, {human_bytes(line.bytes_done)}"
        return line.phase

    # -- live rendering ------------------------------------------------------------------
    def _render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table(box=None, show_header=True, header_style="bold")
        table.add_column("cohort", overflow="fold")
        table.add_column("status")
        for line in self.lines.values():
            style = {"done": "green", "failed": "red", "waiting": "yellow"}.get(line.phase, "")
            table.add_row(line.cohort_id, f"[{style}]{self.describe(line)}[/]" if style
                          else self.describe(line))
        finished = sum(1 for line in self.lines.values() if line.phase in ("done", "failed"))
        total = max(1, len(self.lines))
        bar = ProgressBar(total=total, completed=finished, width=40)
        summary = Table.grid(padding=(0, 1))
        summary.add_row(bar, f"{finished}/{len(self.lines)} cohorts")
        return Group(table, summary)

    def __enter__(self) -> ProgressView:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._render(), console=Console(file=self.stream),
                              refresh_per_second=8, transient=False)
            self._live.__enter__()
        return self

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(None, None, None)
            self._live = None
