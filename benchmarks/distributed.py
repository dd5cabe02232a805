"""Shared limits on Redis and in a file: round trips, grant latency, and a 4-process batch.

    python benchmarks/distributed.py [--runs 5] [--redis-url redis://...]

Starts its own redis-server on a free loopback port unless --redis-url is given.

1. Redis round trips per granted request, uncontended: plain calls (list, poll, file) and
   cohort requests, and over a whole batch (all exchanges of 20 downloads).
2. Grant latency p50/p99 of one permit (acquire + release around an empty exchange), Redis
   and FileLimits (SQLite, in a temporary directory) against the in-memory backend, medians
   of alternating runs. Then the design FileLimits did not take: the same acquire + release
   as two rewrites of a JSON state file under an flock, crash-safe (temp file + rename).
3. Makespan / lower bound of 4 processes x 50 cohorts sharing the limits on Redis, then in
   one FileLimits file (alternating runs), in time scaled by
   1/60 (60 per 10 s, 4 per 1 s, 5 concurrent; jobs 0.33-2 s), against the emulator served on
   loopback; the lower bound is the earliest start schedule the windows allow with the longest
   jobs first, plus each job's duration. Violations and 429s are counted by the emulator.
   Also the start efficiency of the longest window: the span the accepted cohort requests
   would need if every window filled the moment it could, over the span they took (1.0 =
   no time lost between windows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

import amp_cohorts_async as amp
from amp_cohorts_async._scheduler import RequestKind
from amp_cohorts_async.redis import RedisLimits
from amp_cohorts_async.testing import FakeAmplitude

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from scheduler import earliest_starts

SCALE = 1 / 60
SCALED = amp.Limits(
    cohort_requests=tuple(amp.RateWindow(w.max_requests, w.seconds * SCALE)
                          for w in amp.Limits().cohort_requests),
    monthly_quota=None,
)
POLL = amp.PollPolicy(initial_interval=0.1, max_interval=0.5)


class CountingRedisLimits(RedisLimits):
    """RedisLimits that counts its round trips to Redis."""

    round_trips = 0

    async def _run(self, *args: Any) -> Any:
        self.round_trips += 1
        return await super()._run(*args)

    async def quota_used(self, month: str | None = None) -> int:
        self.round_trips += 1
        return await super().quota_used(month)


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install redis-server), or pass "
                 "--redis-url")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


# -- 1. round trips -----------------------------------------------------------------------------

async def round_trips(url: str) -> None:
    print("1. Redis round trips per granted request (uncontended)")
    limits = amp.Limits(cohort_requests=(amp.RateWindow(1000, 1.0),), monthly_quota=None)
    with FakeAmplitude(limits=limits) as fake:
        ids = [fake.add_cohort(f"c{i}", size=random.Random(i).choice((10, 3000))).id
               for i in range(20)]
        async with CountingRedisLimits.from_url(url, namespace=uuid.uuid4().hex) as backend:
            assert isinstance(backend, CountingRedisLimits)
            async with amp.CohortsClient(fake.api_key, fake.secret_key, limits=limits,
                                         transport=fake.transport(), limits_backend=backend,
                                         poll=amp.PollPolicy(initial_interval=0.01)) as client:
                for name, call in (("list_cohorts", client.list_cohorts),
                                   ("request_cohort", lambda: client.request_cohort("c0"))):
                    before = backend.round_trips
                    for _ in range(100):
                        await call()
                    print(f"   {name:16} {(backend.round_trips - before) / 100:.2f}")
                before, exchanges = backend.round_trips, len(fake.log)
                with tempfile.TemporaryDirectory() as directory:
                    await client.download_cohorts(ids, directory)
                amplitude = sum(1 for e in fake.log[exchanges:] if e.host == "amplitude")
                print(f"   batch of 20      {(backend.round_trips - before) / amplitude:.2f} "
                      f"per exchange with Amplitude ({amplitude} exchanges, incl. the usage "
                      f"check)")


# -- 2. grant latency -------------------------------------------------------------------------

async def grant_latencies(backend: amp.LimitsBackend, count: int) -> list[float]:
    async with amp.CohortsClient("k", "s", limits_backend=backend) as client:
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            async with client.scheduler.exchange(RequestKind.OTHER):
                pass
            samples.append(time.perf_counter() - started)
        return samples


def shared_backend(kind: str, url: str, directory: str) -> RedisLimits | amp.FileLimits:
    """A fresh store of ``kind``: a new namespace on Redis, or a new file in ``directory``."""
    if kind == "file":
        return amp.FileLimits(pathlib.Path(directory) / f"{uuid.uuid4().hex}.sqlite3")
    return RedisLimits.from_url(url, namespace=uuid.uuid4().hex)


async def latency(url: str, runs: int) -> None:
    print("2. grant latency of one permit (acquire + release), medians of alternating runs")
    names = ("memory", "redis", "file")
    p50: dict[str, list[float]] = {name: [] for name in names}
    p99: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(runs):
            for name in names:
                if name == "memory":
                    samples = await grant_latencies(amp.InMemoryLimits(), 2000)
                else:
                    async with shared_backend(name, url, directory) as backend:
                        await grant_latencies(backend, 50)  # connection open, file created
                        samples = await grant_latencies(backend, 2000)
                cuts = statistics.quantiles(samples, n=100)
                p50[name].append(cuts[49])
                p99[name].append(cuts[98])
    for name in names:
        print(f"   {name:7} p50 {statistics.median(p50[name]) * 1e6:8.1f} us   "
              f"p99 {statistics.median(p99[name]) * 1e6:8.1f} us")
    for name, base in (("redis", "memory"), ("file", "memory"), ("file", "redis")):
        ratio50 = statistics.median(p50[name]) / statistics.median(p50[base])
        ratio99 = statistics.median(p99[name]) / statistics.median(p99[base])
        print(f"   {name} / {base}: p50 {ratio50:.1f}x, p99 {ratio99:.1f}x")


def locked_json_rewrite(state: pathlib.Path, lock: pathlib.Path) -> None:
    """One operation of a lock-file store: lock, read the state, change it, replace it."""
    import fcntl  # POSIX only, like this comparison

    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        data = json.loads(state.read_text()) if state.exists() else {"slots": {}}
        now = time.time()
        data["slots"] = {k: v for k, v in data["slots"].items() if v > now}
        data["slots"][uuid.uuid4().hex[:16]] = now + 30.0
        if len(data["slots"]) > 5:
            data["slots"].pop(next(iter(data["slots"])))
        temporary = state.with_suffix(".tmp")
        temporary.write_text(json.dumps(data))
        os.replace(temporary, state)
    finally:
        os.close(descriptor)


async def lock_file_alternative(runs: int) -> None:
    medians: dict[str, list[float]] = {"sqlite": [], "lock file": []}
    request = amp.PermitRequest(slot=True, cohort=False)
    with tempfile.TemporaryDirectory() as directory:
        for run in range(runs):
            samples = []
            async with amp.FileLimits(pathlib.Path(directory) / f"{run}.sqlite3") as backend:
                backend.bind(amp.Limits(), "benchmark")
                for _ in range(1000):
                    started = time.perf_counter()
                    permit = await backend.acquire(request)
                    assert isinstance(permit, amp.Permit)
                    await backend.release([permit], None)
                    samples.append(time.perf_counter() - started)
            medians["sqlite"].append(statistics.median(samples))
            state = pathlib.Path(directory) / f"{run}.json"
            lock = pathlib.Path(directory) / f"{run}.lock"
            samples = []
            for _ in range(1000):
                started = time.perf_counter()
                for _operation in ("acquire", "release"):
                    await anyio.to_thread.run_sync(locked_json_rewrite, state, lock)
                samples.append(time.perf_counter() - started)
            medians["lock file"].append(statistics.median(samples))
    sqlite, lock_file = (statistics.median(medians[k]) for k in ("sqlite", "lock file"))
    print(f"   acquire + release: SQLite {sqlite * 1e6:.0f} us, lock file + JSON "
          f"{lock_file * 1e6:.0f} us; lock file / SQLite {lock_file / sqlite:.1f}x")


# -- 3. four processes --------------------------------------------------------------------------

async def worker(base_url: str, store: str, namespace: str, ids: list[str]) -> None:
    """One of the four processes; ``store`` is a Redis URL or ``file:PATH``."""
    backend = (amp.FileLimits(store.removeprefix("file:")) if store.startswith("file:")
               else RedisLimits.from_url(store, namespace=namespace))
    async with backend, amp.CohortsClient(
        "test-api-key", "test-secret-key", base_url=base_url, limits=SCALED,
        limits_backend=backend, poll=POLL,
    ) as client:
        wanted = set(ids)
        cohorts = [c for c in await client.list_cohorts() if c.id in wanted]
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        with tempfile.TemporaryDirectory() as directory:
            outcomes = await client.download_cohorts(cohorts, directory)
        print(json.dumps({"ok": sum(o.ok for o in outcomes)}), flush=True)


async def four_processes(store: str, seed: int) -> tuple[float, float, int, int, int]:
    rng = random.Random(seed)
    durations = [rng.uniform(20.0, 120.0) * SCALE for _ in range(200)]
    with FakeAmplitude(limits=SCALED, job_duration=lambda c: durations[int(c.id[1:])],
                       latency=(0.001, 0.005), seed=seed) as fake:
        for i, duration in enumerate(durations):
            fake.add_cohort(f"c{i:03d}", size=int(duration * 100))
        ids = list(fake.cohorts)
        namespace = uuid.uuid4().hex
        async with fake.serve() as base_url:
            processes = [await anyio.open_process(
                [sys.executable, __file__, "worker", base_url, store, namespace, *ids[i::4]])
                for i in range(4)]
            readers = [BufferedByteReceiveStream(p.stdout) for p in processes if p.stdout]
            for reader in readers:
                await reader.receive_until(b"\n", 1 << 16)
            started = time.monotonic()
            for process in processes:
                assert process.stdin is not None
                await process.stdin.send(b"go\n")
            done = [json.loads(await r.receive_until(b"\n", 1 << 16))["ok"] for r in readers]
            makespan = time.monotonic() - started
            for process in processes:
                await process.wait()
                await process.aclose()
    starts = earliest_starts(200, SCALED.cohort_requests)
    bound = max(s + d for s, d in zip(starts, sorted(durations, reverse=True), strict=True))
    rate_limited = sum(1 for e in fake.log if e.status == 429)
    return (makespan / bound, start_efficiency(fake, max(SCALED.cohort_requests,
                                                         key=lambda w: w.seconds)),
            len(fake.violations), rate_limited, sum(done))


def start_efficiency(fake: FakeAmplitude, window: amp.RateWindow) -> float:
    """How close the accepted cohort requests came to the rate ``window`` allows."""
    starts = sorted(e.time for e in fake.log if e.endpoint == "request" and e.status == 202)
    ideal_span = window.seconds * (math.ceil(len(starts) / window.max_requests) - 1)
    return ideal_span / (starts[-1] - starts[0])


async def batch(url: str, runs: int) -> None:
    print("3. 4 processes x 50 cohorts, limits scaled by 1/60, makespan / lower bound")
    ratios: dict[str, list[float]] = {"redis": [], "file": []}
    efficiencies: dict[str, list[float]] = {"redis": [], "file": []}
    with tempfile.TemporaryDirectory() as directory:
        for seed in range(runs):
            for kind in ("redis", "file"):  # alternating, the same seed for both
                store = f"file:{directory}/{seed}.sqlite3" if kind == "file" else url
                ratio, efficiency, violations, rate_limited, ok = await four_processes(store,
                                                                                       seed)
                ratios[kind].append(ratio)
                efficiencies[kind].append(efficiency)
                print(f"   run {seed} {kind:5}: {ratio:.4f}, start efficiency {efficiency:.3f}"
                      f"  ({ok}/200 ok, {violations} violations, {rate_limited} answered 429)",
                      flush=True)
    for kind in ("redis", "file"):
        print(f"   {kind:5} median {statistics.median(ratios[kind]):.4f}, max "
              f"{max(ratios[kind]):.4f}; start efficiency median "
              f"{statistics.median(efficiencies[kind]):.3f}, min {min(efficiencies[kind]):.3f}")
    print(f"   file / redis makespan (medians): "
          f"{statistics.median(ratios['file']) / statistics.median(ratios['redis']):.4f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        base_url, store, namespace, *ids = sys.argv[2:]
        anyio.run(worker, base_url, store, namespace, ids)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    with redis_server(args.redis_url) as url:
        anyio.run(round_trips, url)
        anyio.run(latency, url, args.runs)
        anyio.run(lock_file_alternative, args.runs)
        anyio.run(batch, url, args.runs)


if __name__ == "__main__":
    main()
