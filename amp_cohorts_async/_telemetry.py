"""OpenTelemetry spans and metrics: the one module that imports opentelemetry, and lazily.

``telemetry_for`` is asked once per client. Without ``opentelemetry-api``, or with it but no
SDK behind the providers (the API's global providers are proxies that drop everything until
an SDK is installed), it returns ``OFF``: every hook does nothing (the span hooks hand back
the shared ``QUIET`` handle), so the send path makes no span, reads no clock and builds no
attributes, and the scheduler and the S3 transfer loop are never called into.
Otherwise ``_Otel`` reports through the providers given to the client, or the global ones.

Spans: ``amplitude.cohort.export`` per cohort exported, its phases ``amplitude.cohort.request``,
``.poll`` and ``.download``, and beside them ``amplitude.cohort.wait`` for each time the
limits, a 429's shared pause or a retry's backoff held the cohort for a millisecond or more
(``amplitude.wait.reason``: ``limits``, ``amplitude``, ``retry``), laid over the seconds the
scheduler measured (the same ones ``DownloadResult.waited`` adds up);
``amplitude.cohorts.sync`` around a sync run; one CLIENT span per HTTP request, named
``{method} {route template}`` (``GET`` alone for a presigned URL), with the HTTP client
semantic-convention attributes. The HTTP span ends once
the answer is handled (for a file, once its body is on disk), and its
``http.request.resend_count`` counts the requests sent before it for the same call: retries,
and the redirect from ``/file`` to the presigned URL.

Metrics: ``http.client.request.duration`` (s), ``amplitude.cohorts.quota.remaining`` (what
Amplitude's last usage answer left, less the cohort requests accepted since),
``amplitude.cohorts.limits.wait.duration`` (s, by reason) and ``amplitude.cohorts.exports``
(by ``amplitude.export.outcome``: ``success``, ``failure``, ``cancelled``).

What may reach a span, an event or a label: route templates, host names, ports, status codes,
error class names, wait reasons, and cohort and request ids as attributes (never in names).
URLs go through ``redact_query_values`` (a presigned URL's X-Amz-* credentials live in its
query) and error texts through ``redact``; exceptions are recorded with redacted text.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import traceback
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import urlsplit

import anyio

from ._exceptions import InvalidRequestError
from ._redact import redact, redact_query_values
from ._scheduler import WaitReason

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import Meter
    from opentelemetry.trace import Span, Tracer

__all__ = ("NOTED_WAIT", "OFF", "QUIET", "Handle", "Telemetry", "telemetry_for")

NAME = "amp_cohorts_async"
Phase = Literal["request", "poll", "download"]
Attribute = str | int | float | bool

# The semantic convention's advised boundaries for http.client.request.duration.
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0)
# Waits run from milliseconds (a busy gate) to an hour (a full window of cohort requests).
_WAIT_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                 3600.0)
_DEFAULT_PORTS = {"https": 443, "http": 80}
# Holds shorter than this (an uncontended grant, a round trip to a shared backend) are not
# waits worth a span; the hold of every exchange is measured, so most are that short.
NOTED_WAIT = 0.001

# The export span of the running cohort (wait spans hang from it), and the count of requests
# sent so far for the current call (its next request's resend count). Set only with an SDK.
_EXPORT: contextvars.ContextVar[Span | None] = contextvars.ContextVar(
    "amp_cohorts_export", default=None)
_SENT: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "amp_cohorts_sent", default=None)


class Handle:
    """A context manager around one reported thing; this base records nothing."""

    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def set(self, key: str, value: Attribute) -> None:
        """Set an attribute on the span (the sync run's totals, say)."""

    def answered(self, status: int) -> None:
        """The HTTP answer's status arrived."""


QUIET = Handle()


class Telemetry:
    """No telemetry: every hook is a no-op. ``_Otel`` overrides each."""

    enabled = False

    def export(self, cohort_id: str) -> Handle:
        """Around one cohort's export (request, poll, download), counted by outcome."""
        return QUIET

    def phase(self, phase: Phase) -> Handle:
        return QUIET

    def note(self, key: str, value: Attribute) -> None:
        """An attribute of the running export (its request id, once known)."""

    def sync(self) -> Handle:
        return QUIET

    def call(self) -> Handle:
        """Around one call's attempts: the requests sent in it count as resends."""
        return QUIET

    def http(self, method: str, url: object, route: str | None) -> Handle:
        """Around one HTTP request and the handling of its answer."""
        return QUIET

    def waited(self, held: Mapping[WaitReason, float]) -> None:
        """A wait that just ended: seconds by reason (``limits``, ``amplitude``, ``retry``)."""

    def quota_left(self, remaining: int) -> None:
        """Amplitude's usage answer: ``remaining`` cohort requests left this month."""

    def quota_spent(self) -> None:
        """A cohort request was accepted: one unit less."""


OFF = Telemetry()


def telemetry_for(tracer_provider: Any, meter_provider: Any) -> Telemetry:
    """The client's telemetry: ``OFF`` unless opentelemetry is there with an SDK behind it."""
    try:
        from opentelemetry import metrics, trace
    except ImportError:
        if tracer_provider is not None or meter_provider is not None:
            raise InvalidRequestError(
                "tracer_provider= and meter_provider= need opentelemetry-api: "
                "pip install 'amp-cohorts-async[otel]'") from None
        return OFF
    for value, method, name in ((tracer_provider, "get_tracer", "tracer_provider"),
                                (meter_provider, "get_meter", "meter_provider")):
        if value is not None and not callable(getattr(value, method, None)):
            raise InvalidRequestError(f"{name} must be an OpenTelemetry provider (with "
                                      f"{method}()), got {type(value).__name__}")
    version = _version()
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(NAME, version)
    meter = (meter_provider or metrics.get_meter_provider()).get_meter(NAME, version)
    tracing = not isinstance(tracer, trace.ProxyTracer | trace.NoOpTracer)
    # The global meter provider is a private proxy class until an SDK is set; no public
    # isinstance check exists for it.
    measuring = not (isinstance(meter, metrics.NoOpMeter) or type(meter).__name__ == "_ProxyMeter")
    if not (tracing or measuring):
        return OFF
    return _Otel(tracer, meter)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("amp-cohorts-async")
    except PackageNotFoundError:  # run from a source tree
        return "0+unknown"


class _Otel(Telemetry):
    """Spans through ``tracer``, metrics through ``meter``."""

    enabled = True

    def __init__(self, tracer: Tracer, meter: Meter) -> None:
        from opentelemetry import context, trace

        self.tracer = tracer
        self.trace = trace
        self.context = context
        self.durations = meter.create_histogram(
            "http.client.request.duration", unit="s", description="Duration of HTTP client "
            "requests.", explicit_bucket_boundaries_advisory=_HTTP_BUCKETS)
        self.wait_durations = meter.create_histogram(
            "amplitude.cohorts.limits.wait.duration", unit="s",
            description="Time a request waited before it could be sent, by reason.",
            explicit_bucket_boundaries_advisory=_WAIT_BUCKETS)
        self.quota = meter.create_gauge(
            "amplitude.cohorts.quota.remaining", unit="{request}",
            description="Cohort requests left this month.")
        self.exports = meter.create_counter(
            "amplitude.cohorts.exports", unit="{export}",
            description="Cohort exports ended, by outcome.")
        self.remaining: int | None = None

    def export(self, cohort_id: str) -> Handle:
        return _ExportSpan(self, cohort_id)

    def phase(self, phase: Phase) -> Handle:
        return _SpanHandle(self, f"amplitude.cohort.{phase}", {})

    def note(self, key: str, value: Attribute) -> None:
        span = _EXPORT.get()
        if span is not None:
            span.set_attribute(key, value)

    def sync(self) -> Handle:
        return _SpanHandle(self, "amplitude.cohorts.sync", {})

    def call(self) -> Handle:
        return _Call()

    def http(self, method: str, url: object, route: str | None) -> Handle:
        return _HttpSpan(self, method, str(url), route)

    def waited(self, held: Mapping[WaitReason, float]) -> None:
        """A span and a metric point per reason, laid end to end up to now (the order of a
        pause and a queue within one hold is not known: the pause is shown first)."""
        end = time.time_ns()
        start = end - sum(int(seconds * 1e9) for seconds in held.values())
        for reason, seconds in held.items():
            if seconds < NOTED_WAIT:
                continue
            attributes: dict[str, Attribute] = {"amplitude.wait.reason": reason}
            self.wait_durations.record(seconds, attributes)
            stop = start + int(seconds * 1e9)
            span = self.tracer.start_span(
                "amplitude.cohort.wait", context=self._export_context(), attributes=attributes,
                start_time=start)
            span.end(end_time=stop)
            start = stop

    def _export_context(self) -> Context | None:
        """The running export's span as a parent (waits hang from the export, beside its
        phases), or None: the current span."""
        export = _EXPORT.get()
        return None if export is None else self.trace.set_span_in_context(export)

    def quota_left(self, remaining: int) -> None:
        self.remaining = remaining
        self.quota.set(remaining)

    def quota_spent(self) -> None:
        if self.remaining is not None:
            self.remaining = max(0, self.remaining - 1)
            self.quota.set(self.remaining)

    def start(self, name: str, attributes: dict[str, Attribute], *,
              client: bool = False) -> Span:
        kind = self.trace.SpanKind.CLIENT if client else self.trace.SpanKind.INTERNAL
        return self.tracer.start_span(name, kind=kind, attributes=attributes,
                                      record_exception=False, set_status_on_exception=False)

    def failed(self, span: Span, error: BaseException, kind: str | None = None) -> str:
        """Record ``error`` on ``span`` with its text redacted; its ``error.type`` (``kind``,
        or the error's class)."""
        kind = kind or error_type(error)
        text = redact(str(error))
        stack = redact("".join(traceback.format_exception(error)))
        span.record_exception(error, attributes={"exception.message": text,
                                                 "exception.stacktrace": stack})
        span.set_attribute("error.type", kind)
        span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, text[:200] or kind))
        return kind


def error_type(error: BaseException) -> str:
    """A low-cardinality name for ``error``: its class, or ``cancelled``."""
    try:
        cancelled = anyio.get_cancelled_exc_class()
    except RuntimeError:  # no event loop: outside the library's own calls
        cancelled = asyncio.CancelledError
    if isinstance(error, cancelled):
        return "cancelled"
    return type(error).__name__


class _SpanHandle(Handle):
    """A span made current while the block runs; an exception marks it failed."""

    __slots__ = ("attributes", "name", "otel", "span", "token")
    #: Whether spans may start under it: an HTTP request's span has no children, and making
    #: it current would only cost a context switch per request.
    has_children = True

    def __init__(self, otel: _Otel, name: str, attributes: dict[str, Attribute]) -> None:
        self.otel = otel
        self.name = name
        self.attributes = attributes

    def open(self) -> Span:
        return self.otel.start(self.name, self.attributes)

    def __enter__(self) -> Self:
        self.span = self.open()
        if self.has_children:
            self.token = self.otel.context.attach(
                self.otel.trace.set_span_in_context(self.span))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close(exc)
        finally:
            if self.has_children:
                self.otel.context.detach(self.token)
            self.span.end()

    def close(self, error: BaseException | None) -> None:
        if error is not None:
            self.otel.failed(self.span, error)

    def set(self, key: str, value: Attribute) -> None:
        self.span.set_attribute(key, value)


class _ExportSpan(_SpanHandle):
    __slots__ = ("export_token",)

    def __init__(self, otel: _Otel, cohort_id: str) -> None:
        super().__init__(otel, "amplitude.cohort.export", {"amplitude.cohort.id": cohort_id})

    def __enter__(self) -> Self:
        handle = super().__enter__()
        self.export_token = _EXPORT.set(self.span)
        return handle

    def close(self, error: BaseException | None) -> None:
        _EXPORT.reset(self.export_token)
        labels: dict[str, Attribute] = {}
        if error is None:
            outcome = "success"
        else:
            kind = self.otel.failed(self.span, error)
            outcome = "cancelled" if kind == "cancelled" else "failure"
            labels["error.type"] = kind
        labels["amplitude.export.outcome"] = outcome
        self.span.set_attribute("amplitude.export.outcome", outcome)
        self.otel.exports.add(1, labels)


class _Call(Handle):
    """Counts the requests one call sends, for their resend counts."""

    __slots__ = ("token",)

    def __enter__(self) -> Self:
        self.token = _SENT.set([0])
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _SENT.reset(self.token)


class _HttpSpan(_SpanHandle):
    """One HTTP request: a CLIENT span and a ``http.client.request.duration`` point."""

    __slots__ = ("labels", "started", "status")
    has_children = False

    def __init__(self, otel: _Otel, method: str, url: str, route: str | None) -> None:
        host, port, scheme = _server(url)
        self.labels: dict[str, Attribute] = {
            "http.request.method": method,
            "server.address": host,
            "server.port": port,
            "url.scheme": scheme,
        }
        if route is not None:
            self.labels["url.template"] = route
        attributes = {**self.labels, "url.full": redact_query_values(url)}
        sent = _SENT.get()
        if sent is not None:
            if sent[0]:
                attributes["http.request.resend_count"] = sent[0]
            sent[0] += 1
        self.status: int | None = None
        super().__init__(otel, method if route is None else f"{method} {route}", attributes)

    def open(self) -> Span:
        self.started = anyio.current_time()
        return self.otel.start(self.name, self.attributes, client=True)

    def answered(self, status: int) -> None:
        self.status = status
        self.labels["http.response.status_code"] = status
        self.span.set_attribute("http.response.status_code", status)
        if status >= 400:
            self.labels["error.type"] = str(status)
            self.span.set_attribute("error.type", str(status))
            self.span.set_status(self.otel.trace.Status(self.otel.trace.StatusCode.ERROR))

    def close(self, error: BaseException | None) -> None:
        if error is not None:
            # An error status names the error by its code, as the convention asks.
            code = str(self.status) if self.status is not None and self.status >= 400 else None
            self.labels["error.type"] = self.otel.failed(self.span, error, code)
        self.otel.durations.record(anyio.current_time() - self.started, self.labels)


def _server(url: str) -> tuple[str, int, str]:
    """(host, port, scheme) of ``url``; blanks for one that cannot be taken apart (the
    library refuses such a URL itself, with its own error)."""
    try:
        parts = urlsplit(url)
        return (parts.hostname or "", parts.port or _DEFAULT_PORTS.get(parts.scheme, 0),
                parts.scheme)
    except ValueError:
        return "", 0, ""
