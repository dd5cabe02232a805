"""What OpenTelemetry costs the client: off, on the API without an SDK, and with an SDK.

    python benchmarks/telemetry.py [--runs 5] [--cohorts 200] [--quick]

Three modes, alternating in each run, medians of ``--runs`` runs, ratios against "absent"
measured in the same run:

* absent: ``opentelemetry`` cannot be imported (blocked in ``sys.modules`` while the client
  is made, as on a machine without the ``otel`` extra);
* API, no SDK: the API is there, its global providers are the proxies nothing is behind;
* SDK: a TracerProvider with a BatchSpanProcessor and a MeterProvider with a periodic reader,
  both exporting to exporters that drop everything (the SDK's whole cost, no I/O).

1. A ``download_cohorts`` batch of ``--cohorts`` cohorts against the in-process emulator on
   virtual time, Amplitude's real limits: the process's CPU time is the library's cost
   (requests, polls, waits, spans; the emulator's share is the same in every mode), the
   limits' hour of waiting being skipped. Goals: API-without-SDK /
   absent <= 1.02; SDK / absent <= 1.10.
2. ``download_file`` of a ~177 MB cohort file over loopback (the emulator in another process,
   through the 302 to its S3 stand-in), os.sync() before each: MB/s per mode (goal: the same).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import amp_cohorts_async as amp
from amp_cohorts_async._telemetry import OFF, telemetry_for
from amp_cohorts_async.testing import FakeAmplitude, run_in_virtual_time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import API_KEY, SECRET_KEY, fake_server
from download import PROPS_200, presigned_url, start_export

MODES = ("absent", "API, no SDK", "SDK")
POLL = amp.PollPolicy(initial_interval=2.0, max_interval=30.0)


class DropSpans(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class DropMetrics(MetricExporter):
    def __init__(self) -> None:
        super().__init__(preferred_temporality={}, preferred_aggregation={})

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


@contextlib.contextmanager
def telemetry(mode: str) -> Iterator[dict[str, Any]]:
    """The client arguments for ``mode``, with opentelemetry blocked while it is "absent"."""
    if mode == "absent":
        saved = {name: module for name, module in sys.modules.items()
                 if name == "opentelemetry" or name.startswith("opentelemetry.")}
        for name in saved:
            del sys.modules[name]
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
        try:
            assert telemetry_for(None, None) is OFF
            yield {}
        finally:
            del sys.modules["opentelemetry"]
            sys.modules.update(saved)
        return
    if mode == "API, no SDK":
        assert telemetry_for(None, None) is OFF, "a global SDK is set: no mode without one"
        yield {}
        return
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(DropSpans()))
    meter_provider = MeterProvider(metric_readers=[
        PeriodicExportingMetricReader(DropMetrics(), export_interval_millis=1_000)])
    assert telemetry_for(tracer_provider, meter_provider).enabled
    try:
        yield {"tracer_provider": tracer_provider, "meter_provider": meter_provider}
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()


def batch_seconds(mode: str, cohorts: int) -> float:
    """CPU seconds of one virtual-time batch of ``cohorts`` cohorts in ``mode``."""

    async def main() -> float:
        with tempfile.TemporaryDirectory() as directory, FakeAmplitude(
                job_duration=(5.0, 60.0), seed=3) as fake:
            ids = [fake.add_cohort(f"c{i:03d}", size=100 + i).id for i in range(cohorts)]
            with telemetry(mode) as providers:
                client = amp.CohortsClient(fake.api_key, fake.secret_key,
                                           transport=fake.transport(), poll=POLL, seed=1,
                                           **providers)
            async with client:
                # CPU seconds of the whole process (the SDK's export thread included): on
                # virtual time they are the run's cost, and other processes on a shared
                # machine inflate them far less than they inflate the wall time.
                started = time.process_time()
                outcomes = await client.download_cohorts(ids, directory)
                elapsed = time.process_time() - started
            assert all(o.ok for o in outcomes)
            return elapsed

    return run_in_virtual_time(main)


async def download_seconds(mode: str, base_url: str, request_id: str,
                           dest: pathlib.Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one ``download_file`` in ``mode``."""
    with telemetry(mode) as providers:
        client = amp.CohortsClient(API_KEY, SECRET_KEY, base_url=base_url, **providers)
    async with client:
        await client.get_usage()  # connection and imports warm, as in a running service
        dest.unlink(missing_ok=True)
        os.sync()
        started, cpu = time.perf_counter(), time.process_time()
        await client.download_file(request_id, dest)
        return time.perf_counter() - started, time.process_time() - cpu


def alternate(runs: int, measure: Callable[[str], float]) -> dict[str, list[float]]:
    """``runs`` rounds, each measuring every mode, the starting mode rotating per round."""
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for run in range(runs):
        for mode in MODES[run % 3:] + MODES[:run % 3]:
            seconds[mode].append(measure(mode))
    return seconds


def report(title: str, seconds: dict[str, list[float]], unit: Callable[[float], str]) -> None:
    """Each mode's median, and its time / the absent mode's time (medians, and per run)."""
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    print(title)
    for mode in MODES:
        ratio = median[mode] / median["absent"]
        per_run = [s / a for s, a in zip(seconds[mode], seconds["absent"], strict=True)]
        print(f"   {mode:12} {unit(median[mode]):>12}  time / absent = {ratio:.3f}, median "
              f"per run {statistics.median(per_run):.3f} (per run: "
              + ", ".join(f"{r:.3f}" for r in per_run) + ")")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cohorts", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a file a tenth the size")
    parser.add_argument("--part", choices=("batch", "download", "both"), default="both")
    args = parser.parse_args()
    print(f"medians of {args.runs} runs, the three modes alternating in each")

    if args.part != "download":
        batch = alternate(args.runs, lambda mode: batch_seconds(mode, args.cohorts))
        report(f"1. download_cohorts of {args.cohorts} cohorts, virtual time, real limits, "
               "CPU seconds (goals: API, no SDK <= 1.02; SDK <= 1.10)", batch,
               lambda s: f"{s:.2f} s")
    if args.part == "batch":
        return

    members = 200_000 if args.quick else 2_000_000
    work = pathlib.Path(tempfile.mkdtemp(prefix="amp-bench-otel-"))
    try:
        with fake_server(f"b200:{members}:{PROPS_200}") as base_url:
            request_id = asyncio.run(start_export(base_url, "b200"))
            asyncio.run(presigned_url(base_url, request_id))
            dest = work / "b200.csv"
            cpu: dict[str, list[float]] = {mode: [] for mode in MODES}

            def measure(mode: str) -> float:
                wall, used = asyncio.run(download_seconds(mode, base_url, request_id, dest))
                cpu[mode].append(used)
                return wall

            transfer = alternate(args.runs, measure)
            mb = dest.stat().st_size / 1e6
        report(f"2. download_file of a {mb:.0f} MB file over loopback, os.sync() before each "
               "(goal: the same speed)", transfer, lambda s: f"{mb / s:.0f} MB/s")
        report("   the same downloads' CPU seconds (this process, all its threads)", cpu,
               lambda s: f"{s:.3f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
