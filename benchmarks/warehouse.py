"""Warehouse benchmark: the export as Arrow batches, against pyarrow's own CSV reader.

Prints ratios measured in the same run (the machine is shared and noisy), as medians of
--runs (default 5) runs in which the contenders alternate, os.sync() before each timed read:
  1. iter_arrow_batches rows/s over a 2M-member export / pyarrow.csv.open_csv iterated over
     the same file with its default options (goal >= 0.8), with the worst event-loop stall
     while iter_arrow_batches runs (goal <= 20 ms) beside the worst one of an idle loop for as
     long (what the shared machine alone costs), and its peak RSS growth.
  2. that cohort into a fresh DuckDB file, each in a process of its own with its peak RSS:
     the dlt source's full run (export over loopback from the emulator in another process,
     then the load), the same dlt load of the file already on disk (iter_arrow_batches with
     cohort_id), and DuckDB's own read_csv of the file (CREATE TABLE AS), side by side.

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
from typing import Any, TypeVar

import anyio
import pyarrow.csv

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude, run_in_virtual_time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import API_KEY, SECRET_KEY, fake_server, reset_peak_rss, status_kib

T = TypeVar("T")
# The emulator's rate windows run 100 times faster, so five runs in a minute are no burst.
TIME_SCALE = 0.01
SCALED = amp.Limits(cohort_requests=tuple(
    amp.RateWindow(w.max_requests, w.seconds * TIME_SCALE) for w in amp.Limits().cohort_requests))


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


def load_child(how: str, source: str, work: str) -> None:
    """Run in a fresh process: one load into a new DuckDB file; seconds and peak RSS growth
    (bytes) as JSON. ``how``: ``dlt-source`` (``source`` is the emulator's base URL),
    ``dlt-file`` or ``duckdb-read_csv`` (``source`` is the export file)."""
    import dlt
    import duckdb

    from amp_cohorts_async.dlt import _with_cohort_id, amplitude_cohorts

    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    database = str(pathlib.Path(work) / f"{how}.duckdb")
    pipeline = dlt.pipeline(pipeline_name=how.replace("-", "_"), pipelines_dir=work,
                            destination=dlt.destinations.duckdb(database),
                            dataset_name="amplitude")

    async def file_batches() -> Any:
        async for batch in amp.iter_arrow_batches(source):
            yield _with_cohort_id(batch, "big")

    reset_peak_rss()
    before = status_kib("VmRSS")
    started = time.perf_counter()
    if how == "dlt-source":
        pipeline.run(amplitude_cohorts(
            ["big"], api_key=API_KEY, secret_key=SECRET_KEY, base_url=source,
            poll=amp.PollPolicy(initial_interval=0.05, jitter=0.0), limits=SCALED,
            limits_url=f"file:{pathlib.Path(work) / 'limits.sqlite3'}"))
    elif how == "dlt-file":
        pipeline.run(dlt.resource(file_batches, name="cohort_members")())
    else:
        with duckdb.connect(database) as connection:
            connection.execute("CREATE TABLE cohort_members AS SELECT * FROM read_csv(?)",
                               [source])
    elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed,
                      "growth": max(0, status_kib("VmHWM") - before) * 1024}))


def load_once(how: str, source: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as work:
        os.sync()
        out = subprocess.run(
            [sys.executable, __file__, "--load-child", how, source, work],
            check=True, capture_output=True, text=True,
        ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return float(result["seconds"]), float(result["growth"]) / (1 << 20)


def warehouse_loads(path: pathlib.Path, size: int, runs: int) -> None:
    results: dict[str, list[tuple[float, float]]] = {}
    with fake_server(f"big:{size}", extra=("--time-scale", str(TIME_SCALE))) as base_url:
        for _ in range(runs):
            for how, source in (("dlt-source", base_url), ("dlt-file", str(path)),
                                ("duckdb-read_csv", str(path))):
                results.setdefault(how, []).append(load_once(how, source))
    baseline = statistics.median(s for s, _ in results["duckdb-read_csv"])
    print(f"2. {size:,} members into a fresh DuckDB file, medians of {runs} alternating runs:")
    for how, values in results.items():
        seconds = statistics.median(s for s, _ in values)
        print(f"   {how:<16} {seconds:6.2f} s ({seconds / baseline:4.1f}x read_csv), "
              f"{size / seconds:>10,.0f} rows/s, peak RSS growth "
              f"{statistics.median(r for _, r in values):5.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="200,000 members, not 2M")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    parser.add_argument("--load-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    if args.load_child:
        load_child(*args.load_child)
        return
    size = 200_000 if args.quick else 2_000_000
    with tempfile.TemporaryDirectory() as work:
        path = export_file(pathlib.Path(work), size)
        asyncio.run(arrow_rates(path, args.runs))
        warehouse_loads(path, size, args.runs)


if __name__ == "__main__":
    main()
