"""Diff benchmark: diff_members on two 2M-member exports with 5 % churn each way.

Against a baseline measured in the same run: two bare ``csv.reader`` passes over the same
files (goal: the diff within 3x of it). Peak RSS growth of the diff, read from VmHWM after a
reset (goal: <= 64 MiB). DuckDB's time for the same set difference, both files written out
(``COPY ... ANTI JOIN``), as a reference (skipped when duckdb is not installed: it is in the
``dev`` extra). Medians of ``--runs`` alternating runs; ``os.sync()`` before each timed run.

    python benchmarks/diff.py [--members N] [--runs N]
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import anyio

import amp_cohorts_async as amp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import reset_peak_rss, status_kib

CHURN = 0.05


def write_exports(directory: pathlib.Path, members: int) -> tuple[pathlib.Path, pathlib.Path]:
    """Two exports as Amplitude writes them (every field quoted), in no particular order:
    5 % of the old members left, as many new ones entered; 1 in 7 without a user id."""
    rng = random.Random(1)
    churned = int(members * CHURN)
    first = 100_000_000_000
    old_ids = list(range(first, first + members))
    new_ids = old_ids[churned:] + list(range(first + members, first + members + churned))
    paths = []
    for name, ids in (("old.csv", old_ids), ("new.csv", new_ids)):
        rng.shuffle(ids)
        path = directory / name
        with path.open("w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file, quoting=csv.QUOTE_ALL, lineterminator="\n")
            writer.writerow(["amplitude_id", "user_id"])
            writer.writerows([str(i), "" if i % 7 == 3 else f"user-{i}@example.com"]
                             for i in ids)
        paths.append(path)
    return paths[0], paths[1]


def bare_passes(old: pathlib.Path, new: pathlib.Path) -> None:
    for path in (old, new):
        with path.open(encoding="utf-8-sig", newline="") as file:
            for _row in csv.reader(file):
                pass


def ours(old: pathlib.Path, new: pathlib.Path, out: pathlib.Path, members: int) -> None:
    diff = anyio.run(amp.diff_members, old, new, out)
    churned = int(members * CHURN)
    assert (diff.entering, diff.exiting, diff.unchanged) == (
        churned, churned, members - churned), diff


def duckdb_reference(old: pathlib.Path, new: pathlib.Path, out: pathlib.Path) -> None:
    import duckdb  # the reference only; an optional benchmark dependency

    connection = duckdb.connect()
    try:
        for first, second, name in ((new, old, "entering"), (old, new, "exiting")):
            connection.execute(
                f"COPY (SELECT a.* FROM read_csv('{first}', all_varchar=true) AS a "
                f"ANTI JOIN read_csv('{second}', all_varchar=true) AS b "
                f"ON a.amplitude_id = b.amplitude_id) TO '{out / name}-duckdb.csv' (HEADER)")
    finally:
        connection.close()


def phases(old: pathlib.Path, new: pathlib.Path, directory: pathlib.Path) -> dict[str, float]:
    """Where one diff's time goes: each partition pass and the run-by-run comparison
    (the same private steps diff_members takes, timed one by one)."""
    from amp_cohorts_async import _diff, _partition

    work = directory / "phases"
    work.mkdir()
    seconds: dict[str, float] = {}
    partitioner = _partition.Partitioner(work, _diff._run_count(str(old), str(new)),
                                         lambda: None)
    started = time.perf_counter()
    old_side = partitioner.partition(str(old), "old", "amplitude_id")
    seconds["partition old"] = time.perf_counter() - started
    started = time.perf_counter()
    new_side = partitioner.partition(str(new), "new", "amplitude_id")
    seconds["partition new"] = time.perf_counter() - started
    started = time.perf_counter()
    _diff._compare_into(work, partitioner, old_side, new_side)
    seconds["compare and write"] = time.perf_counter() - started
    return seconds


def runs_note(old: pathlib.Path, new: pathlib.Path) -> str:
    from amp_cohorts_async import _diff

    return f"{_diff._run_count(str(old), str(new))} runs"


def timed(work: Callable[[], None]) -> float:
    os.sync()
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=2_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    try:
        import duckdb  # noqa: F401
        has_duckdb = True
    except ImportError:
        has_duckdb = False
    with tempfile.TemporaryDirectory(dir=".") as name:
        directory = pathlib.Path(name)
        old, new = write_exports(directory, args.members)
        out = directory / "out"
        print(f"{args.members:,} members a file, {old.stat().st_size / 2**20:.0f} MiB each, "
              f"{CHURN:.0%} churn each way", flush=True)
        seconds: dict[str, list[float]] = {"csv.reader x2": [], "diff_members": []}
        if has_duckdb:
            seconds["duckdb"] = []
        growth: list[float] = []
        for _ in range(args.runs):
            seconds["csv.reader x2"].append(timed(lambda: bare_passes(old, new)))
            reset_peak_rss()
            before = status_kib("VmRSS")
            seconds["diff_members"].append(timed(lambda: ours(old, new, out, args.members)))
            growth.append((status_kib("VmHWM") - before) / 1024)
            if has_duckdb:
                seconds["duckdb"].append(timed(lambda: duckdb_reference(old, new, out)))
        median = {label: statistics.median(values) for label, values in seconds.items()}
        base = median["csv.reader x2"]
        print(f"medians of {args.runs} alternating runs: "
              + " | ".join(f"{label} {value:.2f} s" for label, value in median.items()))
        print(f"diff_members / two csv.reader passes = {median['diff_members'] / base:.2f} "
              f"(goal <= 3); runs: " + ", ".join(f"{s:.2f}" for s in seconds["diff_members"]))
        print(f"peak RSS growth of diff_members: median {statistics.median(growth):.1f} MiB, "
              f"max {max(growth):.1f} MiB (goal <= 64)")
        split = phases(old, new, directory)
        total = sum(split.values())
        print(f"one diff, step by step ({runs_note(old, new)}): " + " | ".join(
            f"{label} {value:.2f} s ({value / total:.0%})" for label, value in split.items()))
        if has_duckdb:
            print(f"duckdb (2 threads, both files written) / two csv.reader passes = "
                  f"{median['duckdb'] / base:.2f}; diff_members / duckdb = "
                  f"{median['diff_members'] / median['duckdb']:.2f}")
        else:
            print("duckdb not installed: no reference (pip install duckdb)")


if __name__ == "__main__":
    main()
