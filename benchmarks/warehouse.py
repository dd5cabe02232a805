"""Warehouse benchmark: the export as Arrow batches, against pyarrow's own CSV reader.

Prints ratios measured in the same run (the machine is shared and noisy), as medians of
--runs (default 5) runs in which the contenders alternate, os.sync() before each timed read:
  1. iter_arrow_batches rows/s over a 2M-member export / pyarrow.csv.open_csv iterated over
     the same file with its default options (goal >= 0.8), with the worst event-loop stall
     while iter_arrow_batches runs (goal <= 20 ms) beside the worst one of an idle loop for as
     long (what the shared machine alone costs), and its peak RSS growth.

    python benchmarks/warehouse.py [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import pyarrow.csv

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude, run_in_virtual_time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import reset_peak_rss, status_kib

T = TypeVar("T")


def export_file(directory: pathlib.Path, size: int) -> pathlib.Path:
    """A real export of a ``size``-member cohort, downloaded from the in-process emulator."""

    async def download() -> pathlib.Path:
        with FakeAmplitude(job_duration=1.0) as fake:
            fake.add_cohort("big", size=size)
            async with amp.CohortsClient(fake.api_key, fake.secret_key,
                                         transport=fake.transport()) as client:
                return (await client.download_cohort("big", directory)).path

    return run_in_virtual_time(download)


async def with_stall_probe(work: Callable[[], Awaitable[T]]) -> tuple[T, float, float]:
    """(result, seconds, worst event-loop stall in seconds) of ``work()``."""
    worst = 0.0
    done = False

    async def probe() -> None:
        nonlocal worst
        while not done:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)

    async with anyio.create_task_group() as group:
        group.start_soon(probe)
        started = time.perf_counter()
        result = await work()
        elapsed = time.perf_counter() - started
        done = True
    return result, elapsed, worst


async def arrow_rows(path: pathlib.Path) -> int:
    rows = 0
    async for batch in amp.iter_arrow_batches(path):
        rows += batch.num_rows
    return rows


def open_csv_rows(path: pathlib.Path) -> int:
    rows = 0
    for batch in pyarrow.csv.open_csv(path):
        rows += batch.num_rows
    return rows


def rss_child(path: str) -> None:
    """Run in a fresh process: peak RSS growth of one pass of iter_arrow_batches (JSON, bytes)."""
    import pyarrow.compute  # noqa: F401 - import everything before measuring

    async def run() -> None:
        reset_peak_rss()
        before = status_kib("VmRSS")
        await arrow_rows(pathlib.Path(path))
        print(json.dumps({"growth": max(0, status_kib("VmHWM") - before) * 1024}))

    asyncio.run(run())


async def idle(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def arrow_rates(path: pathlib.Path, runs: int) -> None:
    # The first use in a process imports pyarrow's C++ modules, which hold the GIL: measured
    # apart, since it happens once.
    _, first_elapsed, first_stall = await with_stall_probe(lambda: arrow_rows(path))
    times: dict[str, list[float]] = {"iter_arrow_batches": [], "pyarrow.csv.open_csv": []}
    stalls = []
    idle_stalls = []
    rows = 0
    for _ in range(runs):
        os.sync()
        rows, elapsed, stall = await with_stall_probe(lambda: arrow_rows(path))
        times["iter_arrow_batches"].append(elapsed)
        stalls.append(stall)
        idle_stalls.append((await with_stall_probe(functools.partial(idle, elapsed)))[2])
        os.sync()
        started = time.perf_counter()
        assert open_csv_rows(path) == rows
        times["pyarrow.csv.open_csv"].append(time.perf_counter() - started)
    rates = {name: rows / statistics.median(values) for name, values in times.items()}
    print(f"1. over {rows:,} rows ({path.stat().st_size / 1e6:.0f} MB), medians of {runs} "
          "alternating runs (rows/s): "
          + " | ".join(f"{name} {rate:,.0f}" for name, rate in rates.items()))
    print(f"   iter_arrow_batches / pyarrow.csv.open_csv = "
          f"{rates['iter_arrow_batches'] / rates['pyarrow.csv.open_csv']:.2f} (goal >= 0.8)")
    print(f"   worst loop stall: {max(stalls) * 1000:.1f} ms (goal <= 20 ms); median of the "
          f"runs' worst: {statistics.median(stalls) * 1000:.1f} ms; an idle loop's over as "
          f"long: worst {max(idle_stalls) * 1000:.1f} ms, median "
          f"{statistics.median(idle_stalls) * 1000:.1f} ms")
    print(f"   the first pass in the process (pyarrow's modules imported in the worker "
          f"thread): {first_elapsed:.2f} s, worst loop stall {first_stall * 1000:.1f} ms")
    growth = json.loads(subprocess.run(
        [sys.executable, __file__, "--rss-child", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout)["growth"]
    print(f"   peak RSS growth of one pass: {growth / (1 << 20):.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="200,000 members, not 2M")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    with tempfile.TemporaryDirectory() as work:
        path = export_file(pathlib.Path(work), 200_000 if args.quick else 2_000_000)
        asyncio.run(arrow_rates(path, args.runs))


if __name__ == "__main__":
    main()
