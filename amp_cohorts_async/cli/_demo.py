"""amp-cohorts demo: the real download path against the embedded emulator, over sockets.

FakeAmplitude is served on loopback with a handful of realistic cohorts (one large enough to
go through the S3 redirect and show progress, a group cohort, one with user properties) and
Amplitude's limits scaled down in time by DEMO_TIME_SCALE, enforced by the emulator and obeyed
by the client, so the run takes seconds instead of minutes yet shows the rate-window waits.
"""

from __future__ import annotations

import pathlib
import time
from typing import IO

import anyio

from .._client import CohortsClient
from .._config import DownloadPolicy, Limits, PollPolicy
from .._models import Cohort
from ..testing import FakeAmplitude
from ._live import ProgressView
from ._output import summary

__all__ = ("DEMO_TIME_SCALE", "run_demo")

DEMO_TIME_SCALE = 0.05  # 4 per minute becomes 4 per 3 s; 60 per 10 minutes, 60 per 30 s


NEXT_STEPS = """
next steps:
  - your own project: export AMPLITUDE_API_KEY=... AMPLITUDE_SECRET_KEY=... (add --region eu
    for an EU project), then `amp-cohorts list` and `amp-cohorts download COHORT_ID -o DIR`
  - the emulator on its own, for your tests or scripts: python -m amp_cohorts_async.testing
  - from Python: see "Library usage" and "Blocking use" in the README
"""


def demo_limits() -> Limits:
    return Limits().time_scaled(DEMO_TIME_SCALE)


def describe_scaled_limits(limits: Limits) -> str:
    """The demo's limits in plain words: Amplitude's own, on a faster clock."""
    real = Limits().cohort_requests
    pairs = ", ".join(
        f"{w.max_requests} per {w.seconds:g} s instead of per {_duration(r.seconds)}"
        for w, r in zip(limits.cohort_requests, real, strict=True))
    return (f"Amplitude's rate limits run {1 / DEMO_TIME_SCALE:g} times faster here, so the "
            f"demo takes seconds, not minutes: cohort requests {pairs}; the client waits for "
            "them exactly as it would for the real ones")


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return "minute" if minutes == 1 else f"{minutes:g} minutes"


async def run_demo(output: pathlib.Path, out: IO[str]) -> int:
    limits = demo_limits()
    with FakeAmplitude(api_key="demo-key", secret_key="demo-secret", limits=limits,
                       job_duration=(1.0, 4.0), latency=(0.005, 0.03), seed=7) as fake:
        fake.add_cohort("power-users", name="Power users (30 days)", size=400_000,
                        properties=("city", "plan"))
        fake.add_cohort("churn-risk", name="Churn risk", size=12_000)
        fake.add_cohort("enterprise-orgs", name="Enterprise organisations", size=800,
                        group_type="org")
        fake.add_cohort("trialists", name="Trialists with plan", size=5_000,
                        properties=("plan",))
        fake.add_cohort("newsletter", name="Newsletter readers", size=30_000)
        fake.add_cohort("beta-testers", name="Beta testers", size=250)
        async with fake.serve() as base_url:
            out.write(f"FakeAmplitude, the built-in emulator of Amplitude's API, is serving "
                      f"on {base_url} (S3 stand-in on {fake.s3_origin})\n"
                      + describe_scaled_limits(limits) + "\n")
            await anyio.Path(output).mkdir(parents=True, exist_ok=True)
            async with CohortsClient("demo-key", "demo-secret", base_url=base_url,
                                     limits=limits, download=DownloadPolicy(count_members=True),
                                     poll=PollPolicy(initial_interval=0.5, max_interval=1.0)
                                     ) as client:
                cohorts: list[str | Cohort] = list(await client.list_cohorts())
                ids = [c.id for c in cohorts if isinstance(c, Cohort)]
                started = time.monotonic()
                view = ProgressView(ids, stream=out, live=out.isatty())
                with view:
                    outcomes = await client.download_cohorts(
                        cohorts, output, props=True, on_progress=view, resume=False
                    )
                await summary(outcomes, started, out, as_json=False,
                               durations=view.durations())
        rate_limited = sum(1 for e in fake.log if e.status == 429)
        out.write(f"files are in {await anyio.Path(output).resolve()}\n"
                  f"{fake.cohort_requests} cohort requests, {rate_limited} answered 429, "
                  f"{len(fake.violations)} limit violations\n" + NEXT_STEPS)
    return 0 if all(o.ok for o in outcomes) and not fake.violations else 1
