"""Download benchmark over real loopback sockets against FakeAmplitude in another process.

Prints ratios measured in the same run (the machine is shared and noisy), as medians of
--runs (default 5) runs in which the contenders alternate, os.sync() before each timed
transfer:
  1. download_file of a ~180 MB cohort (through the 302 to the S3 stand-in), by default and
     with DownloadPolicy(count_members=True), / curl -o of the same object (goal >= 0.85),
     / curl -o followed by fsync (what we do: sha256, fsync, rename), / requests with
     iter_content to a file (what synchronous clients do), / a bare httpx stream to nowhere;
  2. worst event-loop stall during our download (goal <= 20 ms);
  3. peak RSS growth downloading a ~100 MB and a ~400 MB file (goal <= 32 MB both);
  4. iter_member_batches and iter_members rows/s over the 2M-member file / a bare csv.reader
     loop (goal >= 0.8 for the batches), with the worst loop stall while parsing.

    python benchmarks/download.py [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import httpx
import requests

import amp_cohorts_async as amp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import API_KEY, SECRET_KEY, fake_server, reset_peak_rss, status_kib

T = TypeVar("T")

PROPS_200 = "city,plan,p1,p2,p3"
PROPS_400 = "city,plan," + ",".join(f"p{i}" for i in range(1, 16))


async def start_export(base_url: str, cohort_id: str) -> str:
    async with amp.CohortsClient(API_KEY, SECRET_KEY, base_url=base_url) as client:
        request = await client.request_cohort(cohort_id, props=True)
        while not (await client.get_request_status(request.request_id)).done:
            await anyio.sleep(0.05)
        # The first /file renders the export server-side; keep that out of the timings.
        await presigned_url(base_url, request.request_id)
        return request.request_id


async def presigned_url(base_url: str, request_id: str) -> str:
    async with httpx.AsyncClient(auth=(API_KEY, SECRET_KEY), timeout=600) as http:
        response = await http.get(f"{base_url}/api/5/cohorts/request/{request_id}/file")
        assert response.status_code == 302, response.status_code
        return response.headers["Location"]


class GcPauses:
    """The longest pause of the interpreter's cyclic garbage collector while ``watching``:
    a loop stall of that length is the collector's, not the work's."""

    def __init__(self) -> None:
        self.watching = False
        self.longest = 0.0
        self._started = 0.0
        gc.callbacks.append(self._observe)

    def _observe(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self.watching:
            self.longest = max(self.longest, time.perf_counter() - self._started)


GC_PAUSES = GcPauses()


async def with_stall_probe(work: Callable[[], Awaitable[T]]) -> tuple[T, float, float]:
    """(result, seconds, worst event-loop stall in seconds) of ``work()``."""
    worst = 0.0
    done = False
    GC_PAUSES.watching = True

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
    GC_PAUSES.watching = False
    return result, elapsed, worst


async def ours(base_url: str, request_id: str, dest: pathlib.Path,
               count_members: bool = False) -> tuple[float, float]:
    """(seconds, worst loop stall) of download_file (sha256, fsync, rename included)."""
    policy = amp.DownloadPolicy(count_members=count_members)
    async with amp.CohortsClient(API_KEY, SECRET_KEY, base_url=base_url,
                                 download=policy) as client:
        await client.get_usage()  # connection and imports warm, as in a running service
        _, elapsed, stall = await with_stall_probe(
            lambda: client.download_file(request_id, dest))
    return elapsed, stall


def curl(url: str, dest: pathlib.Path, fsync: bool) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "-o", str(dest), url], check=True)
    if fsync:
        descriptor = os.open(dest, os.O_RDONLY)
        os.fsync(descriptor)
        os.close(descriptor)
    return time.perf_counter() - started


def with_requests(url: str, dest: pathlib.Path) -> float:
    """What synchronous clients do: requests, iter_content, write to a file."""
    started = time.perf_counter()
    with requests.get(url, stream=True, timeout=600) as response, open(dest, "wb") as out:
        response.raise_for_status()
        for chunk in response.iter_content(chunk_size=1 << 20):
            out.write(chunk)
    return time.perf_counter() - started


async def bare_httpx(url: str) -> float:
    async with httpx.AsyncClient(timeout=600) as http:
        started = time.perf_counter()
        async with http.stream("GET", url) as response:
            async for _chunk in response.aiter_raw():
                pass
        return time.perf_counter() - started


def rss_child(base_url: str, request_id: str, dest: str) -> None:
    """Run in a fresh process: peak RSS growth of one download, as JSON (bytes).

    getrusage's ru_maxrss would include the parent's size at fork (Linux keeps the high-water
    mark across exec), so the peak is reset through /proc/self/clear_refs and read as VmHWM.
    """
    import amp_cohorts_async._transfer  # noqa: F401 - import everything before measuring

    async def run() -> None:
        async with amp.CohortsClient(API_KEY, SECRET_KEY, base_url=base_url) as client:
            await client.get_usage()  # connections, threads and imports warmed up
            reset_peak_rss()
            before = status_kib("VmRSS")
            await client.download_file(request_id, dest)
        peak = status_kib("VmHWM")
        print(json.dumps({"growth": max(0, peak - before) * 1024}))

    asyncio.run(run())


def rss_growth(base_url: str, request_id: str, dest: pathlib.Path) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", base_url, request_id, str(dest)],
        check=True, capture_output=True, text=True,
    ).stdout
    return float(json.loads(out)["growth"]) / (1 << 20)


async def member_rates(path: pathlib.Path, runs: int) -> None:
    """Rows per second of each reader, alternating, medians; the loop stall while batching."""

    async def batches() -> int:
        rows = 0
        async for batch in amp.iter_member_batches(path):
            rows += len(batch.rows)
        return rows

    async def members() -> int:
        rows = 0
        async for _member in amp.iter_members(path):
            rows += 1
        return rows

    async def bare() -> int:
        rows = 0
        with open(path, newline="") as handle:
            for _fields in csv.reader(handle):
                rows += 1
        return rows - 1

    async def dicts() -> int:
        rows = 0
        with open(path, newline="") as handle:
            for _record in csv.DictReader(handle):
                rows += 1
        return rows

    readers = {"iter_member_batches": batches, "iter_members": members, "csv.reader": bare,
               "csv.DictReader": dicts}
    rates: dict[str, list[float]] = {name: [] for name in readers}
    stalls = []
    rows = 0
    for run in range(runs):
        names = list(readers)
        names = names[run % len(names):] + names[:run % len(names)]
        for name in names:
            rows, elapsed, stall = await with_stall_probe(readers[name])
            rates[name].append(rows / elapsed)
            if name == "iter_member_batches":
                stalls.append(stall)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"4. over {rows:,} rows, medians of {runs} alternating runs (rows/s): "
          + " | ".join(f"{name} {rate:,.0f}" for name, rate in median.items()))
    print(f"   iter_member_batches / csv.reader = "
          f"{median['iter_member_batches'] / median['csv.reader']:.2f} (goal >= 0.8); "
          f"iter_members / csv.reader = {median['iter_members'] / median['csv.reader']:.2f}; "
          f"iter_members / csv.DictReader = "
          f"{median['iter_members'] / median['csv.DictReader']:.2f}")
    print(f"   worst loop stall while batching: {max(stalls) * 1000:.1f} ms (goal <= 20 ms)")


async def transfers(base_url: str, request_id: str, work: pathlib.Path, runs: int) -> None:
    contenders = ["ours", "ours, counting", "curl -o", "curl -o + fsync", "requests",
                  "bare httpx"]
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    stalls: list[float] = []
    gc_pauses: list[float] = []
    size = 0
    for run in range(runs):
        order = contenders[run % len(contenders):] + contenders[:run % len(contenders)]
        for name in order:
            dest = work / "t.csv"
            dest.unlink(missing_ok=True)
            url = await presigned_url(base_url, request_id)
            os.sync()  # nothing of the last run's writes left to flush into this one
            if name.startswith("ours"):
                GC_PAUSES.longest = 0.0
                elapsed, stall = await ours(base_url, request_id, dest,
                                            count_members=name.endswith("counting"))
                stalls.append(stall)
                gc_pauses.append(GC_PAUSES.longest)
                size = dest.stat().st_size
            elif name.startswith("curl"):
                elapsed = curl(url, dest, fsync=name.endswith("fsync"))
            elif name == "requests":
                elapsed = with_requests(url, dest)
            else:
                elapsed = await bare_httpx(url)
            seconds[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    mb = size / 1e6
    print(f"file: {mb:.0f} MB over loopback; medians of {runs} alternating runs, os.sync() "
          f"before each")
    print("1. " + " | ".join(f"{name} {mb / median[name]:.0f} MB/s" for name in contenders))
    for mine in ("ours", "ours, counting"):
        for name in contenders[2:]:
            per_run = [theirs / ours_s for ours_s, theirs in zip(seconds[mine], seconds[name],
                                                                  strict=True)]
            print(f"   {mine + ' / ' + name:34} = {median[name] / median[mine]:.2f} (per run: "
                  + ", ".join(f"{r:.2f}" for r in per_run) + ")")
    print("   (goal: ours / curl -o >= 0.85, and beating requests)")
    print(f"2. worst event-loop stall during our downloads: {max(stalls) * 1000:.1f} ms "
          f"(goal <= 20 ms); median of the downloads' worst stalls "
          f"{statistics.median(stalls) * 1000:.1f} ms")
    print("   per download, worst stall / longest GC pause (ms): " + ", ".join(
        f"{stall * 1000:.1f}/{pause * 1000:.1f}" for stall, pause in zip(stalls, gc_pauses,
                                                                         strict=True)))


async def main(quick: bool, runs: int) -> None:
    size_200 = 200_000 if quick else 2_000_000
    cohorts = (f"b200:{size_200}:{PROPS_200}", f"b100:{size_200 // 2}:{PROPS_200}",
               f"b400:{size_200}:{PROPS_400}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="amp-bench-"))
    try:
        with fake_server(*cohorts) as base_url:
            rid = {c.split(":")[0]: await start_export(base_url, c.split(":")[0])
                   for c in cohorts}
            await transfers(base_url, rid["b200"], work, runs)
            members_file = work / "members.csv"
            await ours(base_url, rid["b200"], members_file)
            for name in ("b100", "b400"):
                dest = work / f"{name}.csv"
                growth = rss_growth(base_url, rid[name], dest)
                print(f"3. peak RSS growth, {dest.stat().st_size / 1e6:.0f} MB file: "
                      f"{growth:.1f} MiB (goal <= 32)")
        await member_rates(members_file, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--rss-child":
        rss_child(*sys.argv[2:])
    else:
        parser = argparse.ArgumentParser()
        parser.add_argument("--quick", action="store_true", help="files a tenth the size")
        parser.add_argument("--runs", type=int, default=5)
        arguments = parser.parse_args()
        asyncio.run(main(arguments.quick, arguments.runs))
