"""Recurring sync: cohort requests a month, and the cost of a night where nothing changed.

    python benchmarks/sync.py [--cohorts 200] [--nights 30] [--touched 0.1] [--runs 5]

1. A month on virtual time against the in-process emulator (Amplitude's rate windows, no
   monthly quota so both sides can be counted): ``--cohorts`` cohorts, ``--touched`` of them
   recomputed (``fake.touch``) before each of ``--nights`` nightly runs. Cohort requests spent
   by ``sync_cohorts`` against a plain nightly ``download_cohorts`` of the same cohorts (run
   for ``--plain-nights`` nights, it spends the same every night; the month is that times
   ``--nights``), and what the emulator was asked besides.
2. The wall time of a night where nothing changed (real time, in-process emulator): the
   requests it sends, and its median over ``--runs`` runs against the two free calls it cannot
   avoid (``list_cohorts()`` + ``get_usage()``) timed alternately in the same process.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import tempfile
import time

import anyio

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude, run_in_virtual_time

LIMITS = amp.Limits(monthly_quota=None)  # counted here, not refused
POLL = amp.PollPolicy(initial_interval=2.0, max_interval=30.0)
UNHURRIED = amp.Limits(cohort_requests=(amp.RateWindow(100_000, 1.0),))
QUICK_POLL = amp.PollPolicy(initial_interval=0.001, max_interval=0.01)


def emulator(cohorts: int) -> FakeAmplitude:
    fake = FakeAmplitude(limits=LIMITS, job_duration=(5.0, 60.0), seed=11)
    for index in range(cohorts):
        fake.add_cohort(f"n{index:03d}", size=200, last_computed=1_700_000_000)
    return fake


def client_for(fake: FakeAmplitude) -> amp.CohortsClient:
    return amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                             limits=LIMITS, poll=POLL, seed=1)


def month(args: argparse.Namespace) -> dict[str, float]:
    """Both strategies over the nights, on virtual time."""

    async def main() -> dict[str, float]:
        rng = random.Random(5)
        figures: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as scratch, emulator(args.cohorts) as fake:
            ids = list(fake.cohorts)
            touched_per_night = round(len(ids) * args.touched)
            async with client_for(fake) as client:
                spent_each_night = []
                for night in range(args.nights):
                    if night:  # the first night copies everything
                        for cohort_id in rng.sample(ids, touched_per_night):
                            fake.touch(cohort_id)
                    before = fake.cohort_requests
                    report = await client.sync_cohorts(ids, scratch, keep_versions=2)
                    assert not [e for e in report.entries if e.action == "failed"], report
                    spent_each_night.append(fake.cohort_requests - before)
                    await anyio.sleep(24 * 3600)
            figures["sync_month"] = sum(spent_each_night)
            figures["sync_first_night"] = spent_each_night[0]
            figures["sync_later_nights_median"] = statistics.median(spent_each_night[1:] or [0])
            figures["violations"] = len(fake.violations)
        with tempfile.TemporaryDirectory() as scratch, emulator(args.cohorts) as fake:
            ids = list(fake.cohorts)
            async with client_for(fake) as client:
                for _ in range(args.plain_nights):
                    outcomes = await client.download_cohorts(ids, scratch)
                    assert all(o.ok for o in outcomes)
                    await anyio.sleep(24 * 3600)
            figures["plain_per_night"] = fake.cohort_requests / args.plain_nights
            figures["violations"] += len(fake.violations)
        return figures

    return run_in_virtual_time(main)


async def quiet_night(args: argparse.Namespace) -> dict[str, object]:
    """A sync where nothing changed, against the two free calls it needs, alternately."""
    with tempfile.TemporaryDirectory() as scratch, emulator(args.cohorts) as fake:
        # Real time here: the first copies must not sit out Amplitude's windows.
        fake.job_duration = 0.0
        fake.limits = UNHURRIED
        ids = list(fake.cohorts)
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     limits=UNHURRIED, poll=QUICK_POLL) as client:
            await client.sync_cohorts(ids, scratch)  # the copies, on real time (no waits)
            os.sync()
            sync_times, bare_times = [], []
            requests: collections.Counter[str] = collections.Counter()
            for _ in range(args.runs):
                logged = len(fake.log)
                started = time.perf_counter()
                report = await client.sync_cohorts(ids, scratch)
                sync_times.append(time.perf_counter() - started)
                assert report.count("unchanged") == len(ids), report
                requests.update(entry.endpoint for entry in fake.log[logged:])
                started = time.perf_counter()
                await client.list_cohorts()
                await client.get_usage()
                bare_times.append(time.perf_counter() - started)
        return {"sync": statistics.median(sync_times), "bare": statistics.median(bare_times),
                "requests_per_run": {k: v / args.runs for k, v in requests.items()}}


def report_month(args: argparse.Namespace, figures: dict[str, float], seconds: float) -> None:
    plain_month = figures["plain_per_night"] * args.nights
    print(f"1. {args.cohorts} cohorts, {args.touched:.0%} touched a night, {args.nights} nights "
          f"(virtual time, {seconds:.0f} s real)")
    print(f"   sync_cohorts:     {figures['sync_month']:,.0f} cohort requests "
          f"(first night {figures['sync_first_night']:.0f}, then a median of "
          f"{figures['sync_later_nights_median']:.0f} a night)")
    print(f"   download_cohorts: {plain_month:,.0f} cohort requests "
          f"({figures['plain_per_night']:.0f} a night, measured over {args.plain_nights} nights)")
    print(f"   ratio sync / plain: {figures['sync_month'] / plain_month:.3f}; "
          f"limit violations: {figures['violations']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohorts", type=int, default=200)
    parser.add_argument("--nights", type=int, default=30, help="0: only the quiet night")
    parser.add_argument("--touched", type=float, default=0.1)
    parser.add_argument("--plain-nights", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.nights:
        started = time.perf_counter()
        figures = month(args)
        report_month(args, figures, time.perf_counter() - started)
    quiet = anyio.run(quiet_night, args)
    sync_s, bare_s = float(quiet["sync"]), float(quiet["bare"])  # type: ignore[arg-type]
    print(f"2. a night where nothing changed ({args.cohorts} cohorts, medians of {args.runs}):")
    print(f"   requests sent per run: {quiet['requests_per_run']}")
    print(f"   sync {sync_s * 1000:.1f} ms against list + usage {bare_s * 1000:.1f} ms: "
          f"ratio {sync_s / bare_s:.2f}")


if __name__ == "__main__":
    main()
