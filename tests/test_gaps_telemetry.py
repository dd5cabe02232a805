"""Telemetry where the other tests left a one-line break unnoticed: wait spans laid end to end,
an HTTP 400 marked as an error, and an export that has ended no longer takes the waits of
later calls."""

from __future__ import annotations

import pathlib
import time

import pytest
from opentelemetry.trace import SpanKind, StatusCode

import amp_cohorts_async as amp
from amp_cohorts_async._telemetry import telemetry_for
from amp_cohorts_async.testing import FakeAmplitude

from .test_telemetry import Otel, client_for, fake, one, otel, parent_of, span_id

__all__ = ("fake", "otel")  # fixtures, used by name


def test_one_hold_for_two_reasons_is_two_wait_spans_end_to_end(otel: Otel) -> None:
    """A request held by a 429's pause and then queued for the limits: the pause first,
    then the queue, the second starting where the first ended and ending now."""
    telemetry = telemetry_for(otel.tracer_provider, otel.meter_provider)
    before = time.time_ns()
    telemetry.waited({"amplitude": 2.0, "limits": 0.5})
    after = time.time_ns()

    pause, queue = sorted(otel.named("amplitude.cohort.wait"), key=lambda s: s.start_time or 0)
    assert (pause.attributes or {})["amplitude.wait.reason"] == "amplitude"
    assert (queue.attributes or {})["amplitude.wait.reason"] == "limits"
    assert pause.end_time == queue.start_time
    assert (pause.end_time or 0) - (pause.start_time or 0) == 2_000_000_000
    assert (queue.end_time or 0) - (queue.start_time or 0) == 500_000_000
    assert before <= (queue.end_time or 0) <= after


@pytest.mark.looptime
async def test_a_wait_after_an_export_hangs_from_the_callers_span_not_the_ended_export(
    fake: FakeAmplitude, otel: Otel, tmp_path: pathlib.Path
) -> None:
    fake.inject("usage", status=429, retry_after=2.0)
    tracer = otel.tracer_provider.get_tracer("the-app")
    async with client_for(fake, otel) as client:
        with tracer.start_as_current_span("job"):
            await client.download_cohort("small", tmp_path)
            await client.get_usage()  # the same task, after the export ended

    job = one(otel.named("job"))
    export = one(otel.named("amplitude.cohort.export"))
    assert parent_of(export) == span_id(job)
    # Only the usage call met a 429: its pause is the job's, not the ended export's.
    paused = [s for s in otel.named("amplitude.cohort.wait")
              if (s.attributes or {}).get("amplitude.wait.reason") == "amplitude"]
    assert paused
    assert {parent_of(s) for s in paused} == {span_id(job)}


@pytest.mark.looptime
async def test_an_http_400_is_an_error_span_named_by_its_code(
    fake: FakeAmplitude, otel: Otel, tmp_path: pathlib.Path
) -> None:
    fake.inject("request", status=400)
    async with client_for(fake, otel) as client:
        with pytest.raises(amp.AmplitudeError):
            await client.download_cohort("small", tmp_path)

    (sent,) = [s for s in otel.spans() if s.kind is SpanKind.CLIENT]
    assert (sent.attributes or {})["http.response.status_code"] == 400
    assert (sent.attributes or {})["error.type"] == "400"
    assert sent.status.status_code is StatusCode.ERROR
    (duration,) = otel.points("http.client.request.duration")
    assert duration.attributes["error.type"] == "400"
