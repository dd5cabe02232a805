"""Shared by the benchmarks: the emulator in its own process, and peak-RSS readings."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def fake_server(*cohorts: str, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield the base URL of a fake server holding ``cohorts`` (``ID:SIZE[:props]``)."""
    args = [sys.executable, "-m", "amp_cohorts_async.testing", "--job-seconds", "0",
            "--inline-threshold", "4096", *extra]
    for cohort in cohorts:
        args += ["--cohort", cohort]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if "listening on " not in line:
            raise RuntimeError(f"fake server did not start: {line!r}")
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        process.terminate()
        process.wait(timeout=10)


API_KEY = "test-api-key"
SECRET_KEY = "test-secret-key"


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM: ru_maxrss would include the parent's size (kept across fork and exec)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
