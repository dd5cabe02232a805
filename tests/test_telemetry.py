"""OpenTelemetry: the spans and metrics of real downloads and syncs, read back through the
SDK's in-memory exporter and metric reader; no secret in any of them; nothing without an SDK.
"""

from __future__ import annotations

import base64
import json
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import amp_cohorts_async as amp
from amp_cohorts_async import blocking
from amp_cohorts_async._telemetry import OFF, telemetry_for
from amp_cohorts_async.testing import FakeAmplitude

from .conftest import FAST_POLL

API_KEY = "api-key-OTEL1111"
SECRET = "secret-key-OTEL2222"
TOKEN = base64.b64encode(f"{API_KEY}:{SECRET}".encode()).decode()


class Otel:
    """An SDK tracer and meter provider recording in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def providers(self) -> dict[str, Any]:
        return {"tracer_provider": self.tracer_provider, "meter_provider": self.meter_provider}

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        return [point for resource in (data.resource_metrics if data else [])
                for scope in resource.scope_metrics for m in scope.metrics if m.name == metric
                for point in m.data.data_points]

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Otel]:
    recorder = Otel()
    yield recorder
    recorder.close()


@pytest.fixture
def fake() -> Iterator[FakeAmplitude]:
    with FakeAmplitude(api_key=API_KEY, secret_key=SECRET, job_duration=10.0, seed=1) as fake:
        fake.add_cohort("small", size=25)
        fake.add_cohort("large", size=20_000)  # its file goes through the 302 to S3
        for number in range(6):
            fake.add_cohort(f"c{number}", size=10 + number)
        yield fake


def client_for(fake: FakeAmplitude, otel: Otel, **kwargs: Any) -> amp.CohortsClient:
    return amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                             poll=FAST_POLL, seed=3, **otel.providers(), **kwargs)


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def one(spans: list[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


def secrets_of(fake: FakeAmplitude) -> list[str]:
    """The keys, the Basic token and every real presigned credential the emulator issued."""
    found = [API_KEY, SECRET, TOKEN]
    for entry in fake.log:
        if entry.endpoint == "s3":
            found.extend(v for k, v in entry.query
                         if k in ("X-Amz-Signature", "X-Amz-Credential"))
    return found


def everything_exported(otel: Otel) -> list[str]:
    """Every text a span or metric point carries: names, attributes, events, statuses."""
    texts: list[str] = []
    for span in otel.spans():
        texts.append(span.name)
        texts.extend(f"{k}={v}" for k, v in (span.attributes or {}).items())
        texts.append(span.status.description or "")
        for event in span.events:
            texts.append(event.name)
            texts.extend(f"{k}={v}" for k, v in (event.attributes or {}).items())
    data = otel.reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                texts.append(metric.name)
                for point in metric.data.data_points:
                    texts.extend(f"{k}={v}" for k, v in (point.attributes or {}).items())
    return texts


@pytest.mark.looptime
async def test_the_span_tree_of_a_download_through_the_302(
    fake: FakeAmplitude, otel: Otel, tmp_path: pathlib.Path
) -> None:
    async with client_for(fake, otel) as client:
        result = await client.download_cohort("large", tmp_path)

    export = one(otel.named("amplitude.cohort.export"))
    assert export.parent is None
    assert export.attributes is not None
    assert export.attributes["amplitude.cohort.id"] == "large"
    assert export.attributes["amplitude.cohort.request_id"] == result.request_id
    assert export.attributes["amplitude.export.outcome"] == "success"
    phases = {name: one(otel.named(f"amplitude.cohort.{name}"))
              for name in ("request", "poll", "download")}
    for phase in phases.values():
        assert parent_of(phase) == span_id(export)

    def http_under(phase: str) -> list[ReadableSpan]:
        return [s for s in otel.spans()
                if s.kind is SpanKind.CLIENT and parent_of(s) == span_id(phases[phase])]

    request = one(http_under("request"))
    assert request.name == "GET /api/5/cohorts/request/{cohort_id}"
    polls = http_under("poll")
    assert len(polls) >= 2  # the job takes 10 s, polled every 1-5 s
    assert {s.name for s in polls} == {"GET /api/5/cohorts/request-status/{request_id}"}
    file, s3 = sorted(http_under("download"), key=lambda s: s.start_time or 0)
    assert file.name == "GET /api/5/cohorts/request/{request_id}/file"
    assert s3.name == "GET"  # a presigned URL has no route template
    assert file.attributes is not None
    assert s3.attributes is not None
    assert file.attributes["http.response.status_code"] == 302
    assert s3.attributes["http.response.status_code"] == 200
    assert "http.request.resend_count" not in file.attributes
    assert s3.attributes["http.request.resend_count"] == 1  # the redirect is a resend
    assert s3.attributes["server.address"] != file.attributes["server.address"]
    assert "X-Amz-Signature=REDACTED" in str(s3.attributes["url.full"])
    attributes = request.attributes
    assert attributes is not None
    assert attributes["http.request.method"] == "GET"
    assert attributes["server.port"] in (80, 443)
    assert attributes["url.template"] == "/api/5/cohorts/request/{cohort_id}"
    assert str(attributes["url.full"]).endswith("/api/5/cohorts/request/large")
    for span in otel.spans():  # no id in any name
        assert "large" not in span.name
        assert result.request_id not in span.name


@pytest.mark.looptime
async def test_retries_carry_resend_counts_error_types_and_wait_spans(
    fake: FakeAmplitude, otel: Otel, tmp_path: pathlib.Path
) -> None:
    fake.inject("status", status=429, retry_after=3.0)
    fake.inject("status", status=503)
    async with client_for(fake, otel) as client:
        result = await client.download_cohort("small", tmp_path)

    export = one(otel.named("amplitude.cohort.export"))
    statuses = sorted(otel.named("GET /api/5/cohorts/request-status/{request_id}"),
                      key=lambda s: s.start_time or 0)
    first, second, third = statuses[:3]
    assert first.attributes is not None
    assert second.attributes is not None
    assert third.attributes is not None
    assert first.attributes["error.type"] == "429"
    assert first.status.status_code is StatusCode.ERROR
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["error.type"] == "503"
    assert second.attributes["http.request.resend_count"] == 1
    assert third.attributes["http.request.resend_count"] == 2
    assert third.attributes["http.response.status_code"] == 202  # still running
    assert "error.type" not in third.attributes
    waits = otel.named("amplitude.cohort.wait")
    reasons = {(s.attributes or {}).get("amplitude.wait.reason") for s in waits}
    assert reasons == {"amplitude", "retry"}
    assert all(parent_of(s) == span_id(export) for s in waits)
    waited = {p.attributes["amplitude.wait.reason"]: p.sum
              for p in otel.points("amplitude.cohorts.limits.wait.duration")}
    assert waited["amplitude"] >= 3.0  # virtual seconds: the Retry-After, sat out
    assert waited["retry"] > 0.0
    # The same seconds the result reports, from the same measurement.
    assert waited == pytest.approx(result.waited, abs=1e-3)


@pytest.mark.looptime
async def test_a_batch_past_the_rate_window_waits_for_the_limits(
    fake: FakeAmplitude, otel: Otel, tmp_path: pathlib.Path
) -> None:
    ids = [f"c{number}" for number in range(6)]  # 4 cohort requests a minute
    async with client_for(fake, otel) as client:
        outcomes = await client.download_cohorts(ids, tmp_path)
    assert all(o.result is not None for o in outcomes)

    exports = {(s.attributes or {})["amplitude.cohort.id"]: s
               for s in otel.named("amplitude.cohort.export")}
    assert sorted(exports) == ids
    waits = [s for s in otel.named("amplitude.cohort.wait")
             if (s.attributes or {}).get("amplitude.wait.reason") == "limits"]
    # The largest start first (c5..c2); the fifth and sixth requests wait for the window.
    assert sorted(parent_of(s) for s in waits) == sorted(
        span_id(exports[c]) for c in ("c1", "c0"))
    for wait in waits:  # laid out over the seconds the scheduler held it (virtual ones here)
        assert (wait.end_time or 0) - (wait.start_time or 0) >= 30e9
    (limits,) = [p for p in otel.points("amplitude.cohorts.limits.wait.duration")
                 if p.attributes["amplitude.wait.reason"] == "limits"]
    assert limits.sum >= 60.0  # the 5th and 6th request waited for the minute to pass
    (exported,) = otel.points("amplitude.cohorts.exports")
    assert dict(exported.attributes) == {"amplitude.export.outcome": "success"}
    assert exported.value == 6
    (quota,) = otel.points("amplitude.cohorts.quota.remaining")
    assert quota.value == 500 - 6  # the usage answer, less the six requests since


@pytest.mark.looptime
async def test_http_duration_metric_has_the_semantic_convention_attributes(
    fake: FakeAmplitude, otel: Otel, tmp_path: pathlib.Path
) -> None:
    fake.inject("file", status=500)
    async with client_for(fake, otel) as client:
        await client.download_cohort("large", tmp_path)
    points = otel.points("http.client.request.duration")
    by_route = {(p.attributes.get("url.template"), p.attributes.get("http.response.status_code")):
                p for p in points}
    ok = by_route[("/api/5/cohorts/request/{request_id}/file", 302)]
    assert dict(ok.attributes) == {
        "http.request.method": "GET", "server.address": ok.attributes["server.address"],
        "server.port": ok.attributes["server.port"], "url.scheme": ok.attributes["url.scheme"],
        "url.template": "/api/5/cohorts/request/{request_id}/file",
        "http.response.status_code": 302,
    }
    failed = by_route[("/api/5/cohorts/request/{request_id}/file", 500)]
    assert failed.attributes["error.type"] == "500"
    s3 = by_route[(None, 200)]
    assert s3.attributes["http.request.method"] == "GET"
    assert all(p.count >= 1 for p in points)
    (exported,) = otel.points("amplitude.cohorts.exports")
    assert exported.attributes["amplitude.export.outcome"] == "success"


@pytest.mark.looptime
async def test_no_secret_reaches_a_span_event_or_metric(
    fake: FakeAmplitude, otel: Otel, tmp_path: pathlib.Path
) -> None:
    fake.inject("s3", "expired_link")  # a refused presigned link, and a fresh one
    fake.inject("file", "expired_link")
    async with client_for(fake, otel) as client:
        await client.download_cohort("large", tmp_path)
        fake.inject("s3", status=400)  # S3 refuses: the export fails, its error recorded
        with pytest.raises(amp.DownloadError):
            await client.download_cohort("large", tmp_path / "again.csv")
    async with amp.CohortsClient(API_KEY, "wrong-secret-OTEL3333", transport=fake.transport(),
                                 **otel.providers()) as wrong:
        with pytest.raises(amp.AuthenticationError):
            await wrong.download_cohort("small", tmp_path)

    secrets = [*secrets_of(fake), "wrong-secret-OTEL3333"]
    assert len(secrets) > 6, "presigned links were issued"
    failures = [s for s in otel.named("amplitude.cohort.export")
                if (s.attributes or {}).get("amplitude.export.outcome") == "failure"]
    assert len(failures) == 2
    assert any(event.name == "exception" for span in failures for event in span.events)
    texts = everything_exported(otel)
    assert any("X-Amz-Signature=REDACTED" in text for text in texts)
    for text in texts:
        for secret in secrets:
            assert secret not in text


@pytest.mark.looptime
async def test_a_sync_run_is_one_span_over_its_exports_and_leaks_nothing(
    fake: FakeAmplitude, otel: Otel, tmp_path: pathlib.Path
) -> None:
    fake.inject("s3", status=503)
    async with client_for(fake, otel) as client:
        report = await client.sync_cohorts(["large", "small"], tmp_path)
        again = await client.sync_cohorts(["large", "small"], tmp_path)
    assert report.requests_spent == 2
    assert again.requests_spent == 0

    first, second = sorted(otel.named("amplitude.cohorts.sync"), key=lambda s: s.start_time or 0)
    assert first.parent is None
    assert (first.attributes or {})["amplitude.cohorts.requests_spent"] == 2
    assert (second.attributes or {})["amplitude.cohorts.requests_spent"] == 0
    exports = otel.named("amplitude.cohort.export")
    assert len(exports) == 2  # the second run exported nothing
    assert all(parent_of(s) == span_id(first) for s in exports)
    listing = [s for s in otel.named("GET /api/3/cohorts") if parent_of(s) == span_id(first)]
    assert len(listing) == 1
    resent = [s for s in otel.named("GET") if (s.attributes or {}).get("error.type") == "503"]
    assert len(resent) == 1
    (quota,) = otel.points("amplitude.cohorts.quota.remaining")
    assert quota.value == 500 - 2
    for text in everything_exported(otel):
        for secret in secrets_of(fake):
            assert secret not in text


def test_the_blocking_client_takes_the_same_providers(
    otel: Otel, tmp_path: pathlib.Path
) -> None:
    with FakeAmplitude(api_key=API_KEY, secret_key=SECRET) as fake:
        fake.add_cohort("small", size=5)
        with blocking.CohortsClient(API_KEY, SECRET, transport=fake.transport(),
                                    poll=amp.PollPolicy(initial_interval=0.01),
                                    **otel.providers()) as client:
            client.download_cohort("small", tmp_path)
    assert len(otel.named("amplitude.cohort.export")) == 1


@pytest.mark.looptime
async def test_without_opentelemetry_the_client_works_and_refuses_providers(
    fake: FakeAmplitude, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in sys.modules if n == "opentelemetry" or n.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # `import opentelemetry` fails
    assert telemetry_for(None, None) is OFF
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 poll=FAST_POLL) as client:
        result = await client.download_cohort("large", tmp_path)
        outcomes = await client.download_cohorts(["small", "c0"], tmp_path / "batch")
    assert result.size_bytes > 0
    assert all(o.result for o in outcomes)
    with pytest.raises(amp.InvalidRequestError, match=r"amp-cohorts-async\[otel\]"):
        amp.CohortsClient(API_KEY, SECRET, tracer_provider=TracerProvider())


def test_with_the_api_but_no_sdk_telemetry_is_off() -> None:
    # The global providers are the API's proxies until an SDK is installed (no test does).
    assert telemetry_for(None, None) is OFF


def test_providers_that_are_not_providers_are_refused() -> None:
    with pytest.raises(amp.InvalidRequestError, match="tracer_provider"):
        amp.CohortsClient(API_KEY, SECRET, tracer_provider=object())  # type: ignore[arg-type]
    with pytest.raises(amp.InvalidRequestError, match="meter_provider"):
        amp.CohortsClient(API_KEY, SECRET, meter_provider="x")  # type: ignore[arg-type]


def test_an_error_text_carrying_a_presigned_url_is_recorded_redacted(otel: Otel) -> None:
    # The library's own errors are redacted where they are made; this is the second guard,
    # for an error from anywhere else (a bug, a library below) that carries a credential.
    telemetry = telemetry_for(otel.tracer_provider, otel.meter_provider)
    leaked = "https://b.s3.amazonaws.com/x.csv?X-Amz-Signature=SIGSIGSIG&X-Amz-Credential=AKIAX"
    with pytest.raises(RuntimeError, match="failed;"), telemetry.export("c1"):
        raise RuntimeError(f"GET {leaked} failed; Authorization: Basic {TOKEN}")
    (span,) = otel.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]
    for text in everything_exported(otel):
        for secret in ("SIGSIGSIG", "AKIAX", TOKEN):
            assert secret not in text


GLOBAL_PROVIDERS_SCRIPT = '''
import asyncio, json, tempfile
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude

async def main():
    with FakeAmplitude() as fake, tempfile.TemporaryDirectory() as directory:
        fake.add_cohort("small", size=5)
        def client():
            return amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     poll=amp.PollPolicy(initial_interval=0.01))
        before = client()  # made while the globals are the API's proxies
        exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        async with before:
            await before.download_cohort("small", directory)
        spans_before = len(exporter.get_finished_spans())
        async with client() as after:
            await after.download_cohort("small", directory)
        data = reader.get_metrics_data()
        print(json.dumps({
            "spans_before": spans_before,
            "spans": sorted({s.name for s in exporter.get_finished_spans()}),
            "metrics": sorted({m.name for r in data.resource_metrics
                               for s in r.scope_metrics for m in s.metrics}),
        }))

asyncio.run(main())
'''


def test_the_global_providers_are_the_default_as_they_are_when_the_client_is_made(
    tmp_path: pathlib.Path,
) -> None:
    # The global providers can be set once per process: a process of its own.
    script = tmp_path / "global_providers.py"
    script.write_text(GLOBAL_PROVIDERS_SCRIPT, "utf-8")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["spans_before"] == 0  # telemetry was off for a client made before the SDK
    assert "amplitude.cohort.export" in seen["spans"]
    assert "GET /api/5/cohorts/request/{cohort_id}" in seen["spans"]
    assert seen["metrics"] == ["amplitude.cohorts.exports", "http.client.request.duration"]


@pytest.mark.looptime
async def test_a_cancelled_export_is_counted_as_cancelled_not_failed(
    fake: FakeAmplitude, otel: Otel, tmp_path: pathlib.Path
) -> None:
    async with client_for(fake, otel) as client:
        with anyio.move_on_after(5.0):  # the job takes 10 s: cancelled while polling
            await client.download_cohort("small", tmp_path)
    export = one(otel.named("amplitude.cohort.export"))
    assert (export.attributes or {})["amplitude.export.outcome"] == "cancelled"
    poll = one(otel.named("amplitude.cohort.poll"))
    assert (poll.attributes or {})["error.type"] == "cancelled"
    (exported,) = otel.points("amplitude.cohorts.exports")
    assert dict(exported.attributes) == {"amplitude.export.outcome": "cancelled",
                                         "error.type": "cancelled"}
