"""Scheduler benchmark: compliance and makespan against the theoretical minimum.

Virtual time (looptime) against FakeAmplitude with Amplitude's real limits. Prints a table:
for each scenario and scheduler, 429s, recorded violations, and makespan / lower bound, where
the lower bound is the earliest start schedule the windows allow, with the longest jobs first,
plus each job's duration and the minimum request latency. Baseline: aiolimiter buckets.

    python benchmarks/scheduler.py [--quick]
"""

from __future__ import annotations

import argparse
import pathlib
import random
import statistics
import sys
import tempfile
from collections.abc import Callable

import attrs

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude, run_in_virtual_time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _baseline_scheduler import AiolimiterLimits

LIMITS = amp.Limits()


def earliest_starts(n: int, windows: tuple[amp.RateWindow, ...]) -> list[float]:
    """The earliest times n requests may start, all asked for at t=0, with no latency."""
    starts: list[float] = []
    for _ in range(n):
        t = starts[-1] if starts else 0.0
        while True:
            later = [
                starts[-w.max_requests] + w.seconds
                for w in windows
                if len(starts) >= w.max_requests and starts[-w.max_requests] + w.seconds > t
            ]
            if not later:
                break
            t = max(later)
        starts.append(t)
    return starts


def lower_bound(durations: list[float], min_latency: float) -> float:
    starts = earliest_starts(len(durations), LIMITS.cohort_requests)
    longest_first = sorted(durations, reverse=True)
    # request answered, job runs, one status answer, the /file answer: latency each way.
    return max(s + d for s, d in zip(starts, longest_first, strict=True)) + 2 * min_latency


@attrs.frozen
class Run:
    makespan: float
    bound: float
    rate_limited: int
    violations: int
    failures: int


def run_once(n: int, seed: int, job: tuple[float, float], latency: tuple[float, float],
             make_backend: Callable[[], amp.LimitsBackend], poll: amp.PollPolicy,
             sized: bool) -> Run:
    """One batch. ``sized``: cohort sizes grow with export time and the client is given the
    Cohort objects (so it can start the largest first); otherwise it only has ids."""
    rng = random.Random(seed)
    durations = [rng.uniform(*job) for _ in range(n)]

    async def main() -> Run:
        fake = FakeAmplitude(
            job_duration=lambda cohort: durations[int(cohort.id[1:])],
            latency=latency, seed=seed,
        )
        ids = [fake.add_cohort(f"c{i}", size=int(durations[i] * 10)).id for i in range(n)]
        with tempfile.TemporaryDirectory() as directory:
            client = amp.CohortsClient(fake.api_key, fake.secret_key, limits=LIMITS,
                                       transport=fake.transport(), poll=poll, seed=seed,
                                       limits_backend=make_backend())
            async with client:
                import anyio

                started = anyio.current_time()
                batch: list[str | amp.Cohort] = list(ids)
                if sized:
                    batch = list(await client.list_cohorts())
                outcomes = await client.download_cohorts(batch, directory)
                makespan = anyio.current_time() - started
        fake.close()
        return Run(
            makespan=makespan,
            bound=lower_bound(durations, latency[0]),
            rate_limited=sum(1 for e in fake.log if e.status == 429),
            violations=len(fake.violations),
            failures=sum(1 for o in outcomes if not o.ok),
        )

    return run_in_virtual_time(main)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="3 seeds instead of 10")
    args = parser.parse_args()
    seeds = range(3 if args.quick else 10)
    tight = amp.PollPolicy(initial_interval=2.0, max_interval=2.0)
    scenarios = [
        ("N=200, ids only", 200, (20.0, 120.0), (0.02, 0.5), False),
        ("N=200, sizes known", 200, (20.0, 120.0), (0.02, 0.5), True),
        ("N=4, 120 s jobs", 4, (120.0, 120.0), (0.02, 0.5), False),
    ]
    schedulers: list[tuple[str, Callable[[], amp.LimitsBackend], amp.PollPolicy]] = [
        ("ours, default poll", amp.InMemoryLimits, amp.PollPolicy()),
        ("ours, poll every 2s", amp.InMemoryLimits, tight),
        ("aiolimiter baseline", AiolimiterLimits, tight),
    ]
    print(f"jobs 20-120 s (N=200) or 120 s (N=4), latency 20-500 ms, {len(seeds)} seeds each")
    print(f"{'scenario':20} {'scheduler':22} {'429s':>5} {'viol.':>6} {'fail':>5} "
          f"{'makespan/LB mean':>17} {'max':>7}")
    for title, n, job, latency, sized in scenarios:
        for name, factory, poll in schedulers:
            runs = [run_once(n, seed, job, latency, factory, poll, sized) for seed in seeds]
            ratios = [r.makespan / r.bound for r in runs]
            print(f"{title:20} {name:22} {sum(r.rate_limited for r in runs):5d} "
                  f"{sum(r.violations for r in runs):6d} {sum(r.failures for r in runs):5d} "
                  f"{statistics.mean(ratios):17.4f} {max(ratios):7.4f}", flush=True)


if __name__ == "__main__":
    main()
