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
    wait_reason: str | None = None
    started: float = attrs.field(factory=time.monotonic)
    transfer_started: float | None = None
    finished: float | None = None


_LABELS = {"queued": "queued", "requested": "export requested", "polling": "export running",
           "failed": "failed", "cancelled": "cancelled"}


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
        elif announce:
            print(f"{event.cohort_id}: {self.describe(line)}", file=self.stream, flush=True)

    def durations(self) -> dict[str, float]:
        """Seconds from queued to done (or failed), per finished cohort."""
        return {c: line.finished - line.started for c, line in self.lines.items()
                if line.finished is not None}

    def describe(self, line: _Line) -> str:
        now = time.monotonic()
        if line.phase == "waiting" and line.wait_until is not None:
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
            return f"done, {human_bytes(line.bytes_done)}"
        return _LABELS.get(line.phase, line.phase)

    def cancelled(self) -> None:
        """Interrupted: what had not finished is cancelled, not failed."""
        for line in self.lines.values():
            if line.phase not in ("done", "failed"):
                line.phase = "cancelled"
                if not self.live:
                    print(f"{line.cohort_id}: cancelled", file=self.stream, flush=True)

    # -- live rendering ------------------------------------------------------------------
    def _render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table(box=None, show_header=True, header_style="bold")
        table.add_column("cohort", overflow="fold")
        table.add_column("status")
        for line in self.lines.values():
            style = {"done": "green", "failed": "red", "waiting": "yellow",
                     "cancelled": "dim"}.get(line.phase, "")
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
