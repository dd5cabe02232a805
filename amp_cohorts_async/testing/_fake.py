"""FakeAmplitude: an emulator of the Behavioral Cohorts API and its S3 hand-off.

Protocol-independent core: ``handle(FakeRequest) -> FakeResponse``. The in-process httpx
transport (``_transport.py``) and the loopback HTTP server (``_server.py``) both call it. All
durations use the event loop's clock (``anyio.current_time()``), so it runs under virtual time;
only the monthly usage uses the wall clock (``wall_clock``), because months are calendar months.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import secrets
import ssl
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import IO, Any, Literal
from urllib.parse import unquote, urlencode

import anyio
import anyio.lowlevel
import attrs

from .._config import Limits
from ._data import FakeCohort, Member, render_export

__all__ = (
    "FakeAmplitude",
    "FakeRequest",
    "FakeResponse",
    "Fault",
    "LoggedRequest",
    "Violation",
)

Endpoint = Literal["list", "request", "status", "file", "s3", "usage", "upload", "membership"]
ENDPOINTS: tuple[str, ...] = ("list", "request", "status", "file", "s3", "usage", "upload",
                              "membership")
FaultKind = Literal["status", "cut", "truncate", "slow", "expired_link"]

# In-process only (never resolved): a host the client's default redirect policy accepts.
S3_ORIGIN = "https://fake-exports.s3.amazonaws.com"
_FILE_TTL = 7 * 24 * 3600.0
_CHUNK = 256 * 1024


@attrs.define
class FakeRequest:
    method: str
    path: str  # percent-encoded, without the query
    query: list[tuple[str, str]]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""
    to_s3: bool = False


@attrs.define
class FakeResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes | AsyncIterator[bytes] = b""
    # How the body should misbehave on the wire: cut (connection dropped) or truncated.
    cut_after: int | None = None
    truncate_to: int | None = None
    on_close: Callable[[], None] | None = None


@attrs.frozen
class LoggedRequest:
    time: float
    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: dict[str, str]
    status: int
    endpoint: str
    host: str


@attrs.frozen
class Violation:
    time: float
    kind: str  # "concurrency" | "window" | "quota" | "ids_per_request" | "cohort_size" | "auth"
    detail: str


@attrs.define
class Fault:
    kind: FaultKind
    status: int = 500
    retry_after: float | None = None
    after_bytes: int = 0
    delay: float = 0.0
    #: ``status`` only: act on the request first, then answer the error (an answer lost after
    #: the server acted, as a proxy's 502 or a crash before the reply would).
    after_acting: bool = False


@attrs.define
class _Job:
    request_id: str
    cohort: FakeCohort
    props: bool
    prop_keys: tuple[str, ...]
    requested_at: float
    ready_at: float
    never_finish: bool = False
    fail: bool = False
    export: IO[bytes] | None = None
    read_lock: threading.Lock = attrs.field(factory=threading.Lock)
    export_size: int = 0
    gzip: bool = False
    render_lock: anyio.Lock | None = None


def _error(status: int, kind: str, message: str, metadata: Any = None,
           headers: Sequence[tuple[str, str]] = ()) -> FakeResponse:
    body = {"error": {"http_code": status, "type": kind, "message": message,
                      "metadata": metadata or {}}}
    return _json(status, body, headers)


def _injected(fault: Fault) -> FakeResponse:
    headers = [] if fault.retry_after is None else [("Retry-After", f"{fault.retry_after:g}")]
    return _error(fault.status, "injected_fault", f"injected HTTP {fault.status}",
                  headers=headers)


def _json(status: int, data: Any, headers: Sequence[tuple[str, str]] = ()) -> FakeResponse:
    return FakeResponse(status, [("Content-Type", "application/json"), *headers],
                        json.dumps(data).encode())


def _s3_error(status: int, code: str, message: str) -> FakeResponse:
    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
           f"<Message>{message}</Message></Error>")
    return FakeResponse(status, [("Content-Type", "application/xml")], xml.encode())


def _mask(headers: dict[str, str]) -> dict[str, str]:
    masked = dict(headers)
    if "authorization" in masked:
        scheme = masked["authorization"].split(" ", 1)[0]
        masked["authorization"] = f"{scheme} ***"
    return masked


class FakeAmplitude:
    """An in-memory Amplitude Cohorts API with its limits, faults and an S3 stand-in.

    Parameters: ``job_duration`` is seconds (a number), a ``(low, high)`` range drawn from
    ``seed``, or a callable ``(cohort) -> seconds``; ``latency`` likewise, split evenly
    between the way in (when a request is counted) and the way out; ``inline_threshold`` is
    the file size in bytes above which ``/file`` redirects to S3; ``gzip`` stores exports
    gzip-encoded (served with ``Content-Encoding: gzip``). A write (upload, membership) holds
    its cohort for ``write_duration`` seconds (default: one turn of the loop); a second write
    to that cohort meanwhile gets Amplitude's 429 and is recorded as a ``concurrent_write``
    violation.
    """

    def __init__(
        self,
        *,
        api_key: str = "test-api-key",
        secret_key: str = "test-secret-key",
        limits: Limits | None = None,
        job_duration: float | tuple[float, float] | Callable[[FakeCohort], float] = 0.0,
        latency: float | tuple[float, float] = 0.0,
        inline_threshold: int = 64 * 1024,
        gzip: bool = False,
        s3_link_ttl: float = 60.0,
        seed: int = 0,
        usage: int = 0,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        write_duration: float = 0.0,
    ) -> None:
        self.api_key = api_key
        self.secret_key = secret_key
        self.limits = limits or Limits()
        self.job_duration = job_duration
        self.latency = latency
        self.inline_threshold = inline_threshold
        self.gzip = gzip
        self.s3_link_ttl = s3_link_ttl
        self.wall_clock = wall_clock
        self.write_duration = write_duration
        self.rng = random.Random(seed)
        self.cohorts: dict[str, FakeCohort] = {}
        self.jobs: dict[str, _Job] = {}
        self.log: list[LoggedRequest] = []
        self.violations: list[Violation] = []
        self.usage: dict[str, int] = {}
        self.set_usage(usage)
        # Users the project knows beyond the generated members of its cohorts (add_users,
        # explicit members): Amplitude matches an upload's ids against the project's users.
        self._user_ids: dict[str, str] = {}  # user id -> Amplitude id
        self._amplitude_ids: dict[str, str] = {}  # Amplitude id -> user id ("" if none)
        self._also_known: list[FakeAmplitude] = []
        self.active = 0
        self.max_active = 0
        self.never_finish: set[str] = set()
        self.failing_jobs: set[str] = set()
        self._faults: dict[str, deque[Fault]] = {}
        self._fault_rate = 0.0
        self._fault_rng = random.Random(seed)
        #: Cohort requests the fake acted on (job started, quota charged) whose answer a
        #: random fault then cut off: each one costs the client a second, honest request.
        self.acted_answers_lost = 0
        #: Random faults injected, by endpoint.
        self.random_faults_injected: dict[str, int] = {}
        self._window_log: deque[float] = deque()
        self._writing: set[str] = set()
        #: Every membership change applied, in order: (cohort id, operation, number of ids).
        self.membership_changes: list[tuple[str, str, int]] = []
        self._signing_key = secrets.token_bytes(16)
        self._seq = 0
        self.s3_origin = S3_ORIGIN

    # -- set-up helpers -------------------------------------------------------------------
    def add_cohort(
        self,
        cohort_id: str | None = None,
        *,
        size: int = 10,
        name: str | None = None,
        seed: int | None = None,
        properties: Sequence[str] = (),
        group_type: str | None = None,
        members: Sequence[Member] | None = None,
        sync_metadata: Sequence[dict[str, Any]] = (),
        last_computed: int | None = None,
        **extra: Any,
    ) -> FakeCohort:
        """Add a cohort with ``size`` generated members (deterministic by ``seed``).

        ``last_computed``: epoch seconds the list reports (default: a fixed day of 2023).
        """
        self._seq += 1
        cohort_id = cohort_id or f"coh{self._seq:05d}"
        cohort = FakeCohort(
            id=cohort_id,
            name=name or f"Cohort {cohort_id}",
            group_type=group_type,
            property_names=tuple(properties),
            sync_metadata=list(sync_metadata),
            generated_size=size,
            seed=self._seq if seed is None else seed,
            extra=extra,
        )
        if last_computed is not None:
            cohort.last_computed = int(last_computed)
        if members is not None:
            cohort.replace(members)
            self._know(members)
        self.cohorts[cohort_id] = cohort
        return cohort

    def touch(self, cohort_id: str, *, churn: float = 0.1) -> FakeCohort:
        """Recompute a cohort as Amplitude does on its schedule: a ``churn`` share of its
        members (at least one) leave, as many new ones join, and ``last_computed`` moves to
        now (the fake's wall clock), always later than before. Costs no quota.

        An export requested before the touch still serves the members it was requested with.
        """
        if not 0.0 <= churn <= 1.0:
            raise ValueError(f"churn must be within [0, 1], got {churn!r}")
        cohort = self.cohorts[cohort_id]
        now = int(self.wall_clock().timestamp())
        cohort.recompute(churn, max(now, cohort.last_computed + 1))
        return cohort

    def add_users(self, user_ids: Iterable[str]) -> None:
        """Make users known to the project, as if they had sent events: uploads and
        membership changes by user id match them (each gets an Amplitude id). Members of
        the fake's cohorts, present and past, are known already."""
        self._know(self._new_user(user_id) for user_id in user_ids)

    def _know(self, members: Iterable[Member]) -> None:
        for member in members:
            self._amplitude_ids[member.amplitude_id] = member.user_id
            if member.user_id:
                self._user_ids[member.user_id] = member.amplitude_id

    def knows_users_of(self, other: FakeAmplitude) -> None:
        """Users of ``other`` (another project with the same people, as a mirror's source
        is) are users of this project too: uploads here match them."""
        self._also_known.append(other)

    def known_member(self, value: str, *, by_user: bool) -> Member | None:
        """The member an upload's id stands for, as Amplitude matches it: a user id matches
        only a user the project knows; an Amplitude id must be one (digits), and then
        stands for that user (the emulator does not track which numbers were handed out)."""
        if by_user and value in self._user_ids:
            return Member(self._user_ids[value], value)
        if not by_user and value in self._amplitude_ids:
            return Member(value, self._amplitude_ids[value])
        if not by_user and not self._valid_amplitude_id(value):
            return None
        for cohort in self.cohorts.values():
            found = (cohort.generated_member(user_id=value) if by_user
                     else cohort.generated_member(amplitude_id=value))
            if found is not None:
                return Member(found.amplitude_id, found.user_id)
        for other in self._also_known:
            if by_user and (member := other.known_member(value, by_user=True)) is not None:
                return member
        return None if by_user else Member(value, "")

    def set_usage(self, usage: int) -> None:
        """Cohort requests already spent this (calendar, UTC) month."""
        if isinstance(usage, bool) or not isinstance(usage, int) or usage < 0:
            raise ValueError(f"usage must be an int >= 0, got {usage!r}")
        self.usage = {self._month(): usage} if usage else {}

    def reset(self) -> None:
        """Forget the request log, the violations and the usage; keep the cohorts."""
        self.log.clear()
        self.violations.clear()
        self.usage.clear()

    def inject(self, endpoint: Endpoint, kind: FaultKind = "status", *, times: int = 1,
               status: int = 500, retry_after: float | None = None, after_bytes: int = 0,
               delay: float = 0.0, after_acting: bool = False) -> None:
        """Make the next ``times`` calls of ``endpoint`` misbehave.

        ``status``: answer ``status`` (429 with ``retry_after``); ``cut``: drop the connection
        after ``after_bytes`` of the body; ``truncate``: end the body after ``after_bytes``
        though Content-Length promised more; ``slow``: sleep ``delay`` before each chunk;
        ``expired_link`` (on ``file``): hand out an S3 link that has already expired.
        ``after_acting`` (with ``status``): do what the request asks, then answer ``status``
        instead of the result. ``cut`` and ``truncate`` always act first: the answer is lost
        on its way back.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {ENDPOINTS}")
        queue = self._faults.setdefault(endpoint, deque())
        for _ in range(times):
            queue.append(Fault(kind, status, retry_after, after_bytes, delay, after_acting))

    def random_faults(self, rate: float, *, seed: int = 0) -> None:
        """Fault a ``rate`` share of all answers at random (after any injected ones).

        Amplitude endpoints answer 500/502/503 or 429 (with Retry-After), or drop the
        connection after the server acted (a cohort request so cut is counted in
        ``acted_answers_lost``); ``/file`` also hands out expired links and truncated bodies;
        S3 answers 500/503, expired links, dropped and truncated bodies; uploads and
        membership changes may also be applied and then answered 500/502/504.
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {rate!r}")
        self._fault_rate = rate
        self._fault_rng = random.Random(seed)

    def _random_fault(self, endpoint: str) -> Fault | None:
        rng = self._fault_rng
        if endpoint == "unknown" or rng.random() >= self._fault_rate:
            return None
        self.random_faults_injected[endpoint] = self.random_faults_injected.get(endpoint, 0) + 1
        choices: list[Fault] = [Fault("status", rng.choice((500, 502, 503)))]
        if endpoint != "s3":
            choices.append(Fault("status", 429, retry_after=float(rng.randint(1, 5))))
        choices.append(Fault("cut", after_bytes=rng.choice((0, 100, 5000))))
        if endpoint in ("upload", "membership"):  # a write done, its answer lost on the way
            choices.append(Fault("status", rng.choice((500, 502, 504)), after_acting=True))
        if endpoint in ("file", "s3"):
            choices.append(Fault("truncate", after_bytes=rng.randint(0, 50_000)))
        if endpoint == "file":
            choices.append(Fault("expired_link"))
        return rng.choice(choices)

    def member_ids(self, cohort_id: str, *, by: Literal["amplitude_id", "user_id"] = "user_id"
                   ) -> set[str]:
        cohort = self.cohorts[cohort_id]
        return {getattr(m, by) for m in cohort.iter_members() if getattr(m, by)}

    def requests_to(self, endpoint: str) -> list[LoggedRequest]:
        return [entry for entry in self.log if entry.endpoint == endpoint]

    @property
    def cohort_requests(self) -> int:
        """How many cohort requests were accepted (spent quota)."""
        return sum(1 for e in self.log if e.endpoint == "request" and e.status == 202)

    def _month(self) -> str:
        return self.wall_clock().astimezone(UTC).strftime("%Y-%m")

    def close(self) -> None:
        """Free the rendered export files (large ones live in temp files)."""
        for job in self.jobs.values():
            if job.export is not None:
                job.export.close()
                job.export = None

    def __enter__(self) -> FakeAmplitude:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- entry points ---------------------------------------------------------------------
    def transport(self) -> Any:
        """An httpx transport that serves this fake in-process (no sockets)."""
        from ._transport import FakeTransport

        return FakeTransport(self)

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0, s3_port: int = 0,
                    s3_tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
        """Serve over real loopback sockets; yields the Amplitude base URL.

        ``s3_tls`` serves the S3 stand-in over https with that server context.
        """
        from ._server import serve

        async with serve(self, host, port, s3_port, s3_tls) as base_url:
            yield base_url

    async def handle(self, request: FakeRequest) -> FakeResponse:
        latency = self._draw(self.latency)
        if latency:
            await anyio.sleep(latency / 2)
        endpoint = "s3" if request.to_s3 else self._endpoint(request)
        counted = not request.to_s3
        if counted:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        closed = False

        def close() -> None:
            nonlocal closed
            if counted and not closed:
                closed = True
                self.active -= 1

        try:
            if counted and self.active > self.limits.max_concurrent_requests:
                self._violate("concurrency", f"{self.active} concurrent requests")
                response = _error(429, "too_many_requests", "Too many concurrent requests",
                                  headers=[("Retry-After", "1")])
            else:
                response = await self._dispatch(endpoint, request)
        except BaseException:
            close()
            raise
        if latency:
            await anyio.sleep(latency / 2)
        self.log.append(LoggedRequest(
            time=anyio.current_time(), method=request.method, path=request.path,
            query=tuple(request.query), headers=_mask(request.headers),
            status=response.status, endpoint=endpoint,
            host="s3" if request.to_s3 else "amplitude",
        ))
        response.on_close = close
        return response

    def _draw(self, value: float | tuple[float, float]) -> float:
        if isinstance(value, tuple):
            return self.rng.uniform(*value)
        return float(value)

    @staticmethod
    def _endpoint(request: FakeRequest) -> str:
        path = request.path
        if path == "/api/3/cohorts":
            return "list"
        if path == "/api/3/cohorts/usage":
            return "usage"
        if path == "/api/3/cohorts/upload":
            return "upload"
        if path == "/api/3/cohorts/membership":
            return "membership"
        if path.startswith("/api/5/cohorts/request-status/"):
            return "status"
        if path.startswith("/api/5/cohorts/request/") and path.endswith("/file"):
            return "file"
        if path.startswith("/api/5/cohorts/request/"):
            return "request"
        return "unknown"

    def _violate(self, kind: str, detail: str) -> None:
        self.violations.append(Violation(anyio.current_time(), kind, detail))

    def _authorized(self, request: FakeRequest) -> bool:
        expected = base64.b64encode(f"{self.api_key}:{self.secret_key}".encode()).decode()
        return hmac.compare_digest(request.headers.get("authorization", ""), f"Basic {expected}")

    async def _dispatch(self, endpoint: str, request: FakeRequest) -> FakeResponse:
        queue = self._faults.get(endpoint)
        fault = queue.popleft() if queue else self._random_fault(endpoint)
        if fault is not None and fault.kind == "status" and not fault.after_acting:
            return _injected(fault)
        if endpoint == "s3":
            response = await self._s3(request)
        elif endpoint == "unknown":
            response = _error(404, "not_found", f"no route for {request.method} {request.path}")
        elif not self._authorized(request):
            self._violate("auth", f"bad credentials on {endpoint}")
            response = _error(401, "unauthorized", "Invalid API key or secret key")
        else:
            handler = getattr(self, f"_on_{endpoint}")
            response = await handler(request, fault)
        if fault is not None:
            if (fault.kind in ("cut", "truncate") and endpoint == "request"
                    and response.status == 202):
                self.acted_answers_lost += 1
            if fault.kind == "status":  # after acting: the result is lost
                return _injected(fault)
            if fault.kind == "cut":
                response.cut_after = fault.after_bytes
            elif fault.kind == "truncate":
                response.truncate_to = fault.after_bytes
            elif fault.kind == "slow":
                response.body = _slowly(response.body, fault.delay)
        return response

    # -- Amplitude endpoints ----------------------------------------------------------------
    async def _on_list(self, request: FakeRequest, _fault: Fault | None) -> FakeResponse:
        sync = ("includeSyncInfo", "true") in request.query
        return _json(200, {"cohorts": [c.to_json(include_sync_info=sync)
                                       for c in self.cohorts.values()]})

    async def _on_usage(self, _request: FakeRequest, _fault: Fault | None) -> FakeResponse:
        now = self.wall_clock().astimezone(UTC)
        year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
        return _json(200, {"rest_download": {
            "limit": self.limits.monthly_quota if self.limits.monthly_quota is not None else 0,
            "usage": self.usage.get(self._month(), 0),
            "resets_at": datetime(year, month, 1).isoformat(),
        }})

    def _window_breach(self, now: float) -> str | None:
        for window in self.limits.cohort_requests:
            count = sum(1 for t in self._window_log if t > now - window.seconds)
            if count >= window.max_requests:
                return (f"{count + 1} cohort requests within {window.seconds:g}s "
                        f"(limit {window.max_requests})")
        return None

    async def _on_request(self, request: FakeRequest, _fault: Fault | None) -> FakeResponse:
        cohort_id = unquote(request.path.rsplit("/", 1)[1])
        now = anyio.current_time()
        longest = max((w.seconds for w in self.limits.cohort_requests), default=0.0)
        while self._window_log and self._window_log[0] <= now - longest:
            self._window_log.popleft()
        breach = self._window_breach(now)
        if breach is not None:
            self._violate("window", breach)
            return _error(429, "too_many_requests", f"Cohort request rate exceeded: {breach}",
                          headers=[("Retry-After", "60")])
        month = self._month()
        quota = self.limits.monthly_quota
        if quota is not None and self.usage.get(month, 0) >= quota:
            self._violate("quota", f"monthly quota of {quota} exhausted")
            return _error(429, "quota_exceeded", "Monthly cohort download limit exceeded")
        cohort = self.cohorts.get(cohort_id)
        if cohort is None:
            return _error(404, "not_found", f"Cohort {cohort_id} not found")
        if cohort.size > self.limits.max_cohort_size:
            self._violate("cohort_size", f"{cohort_id} has {cohort.size} members")
            return _error(400, "cohort_too_large",
                          f"Cohort exceeds {self.limits.max_cohort_size} members")
        self._window_log.append(now)
        self.usage[month] = self.usage.get(month, 0) + 1
        duration = (self.job_duration(cohort) if callable(self.job_duration)
                    else self._draw(self.job_duration))
        request_id = secrets.token_hex(12)
        props = ("props", "1") in request.query
        keys = tuple(v for k, v in request.query if k == "propKeys")
        self.jobs[request_id] = _Job(
            request_id=request_id, cohort=cohort.snapshot(), props=props, prop_keys=keys,
            requested_at=now, ready_at=now + duration,
            never_finish=cohort_id in self.never_finish, fail=cohort_id in self.failing_jobs,
            gzip=self.gzip,
        )
        return _json(202, {"request_id": request_id, "cohort_id": cohort_id})

    def _job(self, request: FakeRequest, position: int) -> _Job | None:
        parts = request.path.split("/")
        job = self.jobs.get(unquote(parts[position]))
        if job is None or anyio.current_time() > job.requested_at + _FILE_TTL:
            return None
        return job

    async def _on_status(self, request: FakeRequest, _fault: Fault | None) -> FakeResponse:
        job = self._job(request, -1)
        if job is None:
            return _error(404, "not_found", "Unknown request id")
        body = {"request_id": job.request_id, "cohort_id": job.cohort.id}
        if job.fail and anyio.current_time() >= job.ready_at:
            return _json(200, {**body, "async_status": "JOB FAILED"})
        if job.never_finish or anyio.current_time() < job.ready_at:
            return _json(202, {**body, "async_status": "JOB INPROGRESS"})
        return _json(200, {**body, "async_status": "JOB COMPLETED"})

    async def _export(self, job: _Job) -> IO[bytes]:
        if job.render_lock is None:
            job.render_lock = anyio.Lock()
        async with job.render_lock:
            if job.export is None:
                export = await anyio.to_thread.run_sync(
                    lambda: render_export(job.cohort, props=job.props, prop_keys=job.prop_keys,
                                          gzip_level=1 if job.gzip else None))
                export.seek(0, 2)
                job.export_size = export.tell()
                job.export = export
        return job.export

    def export_bytes(self, request_id: str) -> bytes:
        """The stored export of a finished job, as served (after a first fetch)."""
        job = self.jobs[request_id]
        assert job.export is not None, "not rendered yet"
        job.export.seek(0)
        return job.export.read()

    async def _on_file(self, request: FakeRequest, fault: Fault | None) -> FakeResponse:
        job = self._job(request, -2)
        if job is None:
            return _error(404, "not_found", "Unknown or expired request id")
        if job.never_finish or job.fail or anyio.current_time() < job.ready_at:
            return _error(400, "job_not_completed", "The export job has not completed")
        export = await self._export(job)
        if job.export_size > self.inline_threshold:
            expired = fault is not None and fault.kind == "expired_link"
            return FakeResponse(302, [("Location", self._presign(job, expired=expired)),
                                      ("Content-Length", "0")])
        if job.gzip and "gzip" not in request.headers.get("accept-encoding", ""):
            return _error(406, "not_acceptable", "this export is stored gzip-encoded")
        return self._serve_export(job, export, request)

    # -- writes ---------------------------------------------------------------------------
    def _body(self, request: FakeRequest) -> dict[str, Any] | FakeResponse:
        try:
            data = json.loads(request.body)
        except ValueError:
            return _error(400, "invalid_request", "Body is not valid JSON")
        if not isinstance(data, dict):
            return _error(400, "invalid_request", "Body must be a JSON object")
        return data

    def _check_ids(self, ids: Any) -> FakeResponse | None:
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            return _error(400, "invalid_request", "ids must be a non-empty list of strings")
        if len(ids) > self.limits.max_ids_per_request:
            self._violate("ids_per_request", f"{len(ids)} ids in one request")
            return _error(400, "too_many_ids",
                          f"At most {self.limits.max_ids_per_request} ids per request")
        return None

    @asynccontextmanager
    async def _writing_to(self, cohort_id: str) -> AsyncIterator[bool]:
        """Amplitude refuses concurrent writes to one cohort; so does the fake."""
        if cohort_id in self._writing:
            self._violate("concurrent_write", f"concurrent writes to {cohort_id}")
            yield False
            return
        self._writing.add(cohort_id)
        try:
            # A write takes a moment, long enough for another to overlap it: one turn of the
            # loop, or write_duration seconds (so writers in other processes can overlap too).
            if self.write_duration:
                await anyio.sleep(self.write_duration)
            else:
                await anyio.lowlevel.checkpoint()
            yield True
        finally:
            self._writing.discard(cohort_id)

    @staticmethod
    def _valid_amplitude_id(value: str) -> bool:
        return value.isdigit()

    @staticmethod
    def _new_user(user_id: str) -> Member:
        digest = int(hashlib.sha256(user_id.encode()).hexdigest()[:12], 16)
        return Member(str(200_000_000_000 + digest % 99_999_999_999), user_id)

    async def _on_upload(self, request: FakeRequest, _fault: Fault | None) -> FakeResponse:
        data = self._body(request)
        if isinstance(data, FakeResponse):
            return data
        missing = [k for k in ("name", "app_id", "id_type", "ids", "owner", "published")
                   if k not in data]
        if missing:
            return _error(400, "invalid_request", f"Missing required fields: {missing}")
        if data["id_type"] not in ("BY_AMP_ID", "BY_USER_ID"):
            return _error(400, "invalid_request", "id_type must be BY_AMP_ID or BY_USER_ID")
        if not isinstance(data["app_id"], int):
            return _error(400, "invalid_request", "app_id must be an integer")
        bad = self._check_ids(data["ids"])
        if bad is not None:
            return bad
        by_user = data["id_type"] == "BY_USER_ID"
        ids: list[str] = data["ids"]
        invalid = [] if by_user else [i for i in ids if not self._valid_amplitude_id(i)]
        if invalid and not data.get("skip_invalid_ids", True):
            return _error(400, "invalid_ids", "The upload contains invalid ids",
                          {"invalid_ids": invalid[:100]})
        existing = data.get("existing_cohort_id")
        if existing is not None and existing not in self.cohorts:
            return _error(404, "not_found", f"Cohort {existing} not found")
        target = existing or f"up{secrets.token_hex(4)}"
        async with self._writing_to(target) as ok:
            if not ok:
                return _error(429, "too_many_requests", "Cohort is being updated",
                              headers=[("Retry-After", "1")])
            refused = set(invalid)
            # Matched: the ids of users the project knows; the rest join nobody.
            members = [m for m in (self.known_member(i, by_user=by_user)
                                   for i in ids if i not in refused) if m is not None]
            if not data.get("skip_save", False):
                if existing is not None:
                    self.cohorts[existing].replace(members)
                else:
                    cohort = self.add_cohort(target, size=0, name=data["name"],
                                             group_type=data.get("cg"))
                    cohort.owners = [data["owner"]]
                    cohort.published = bool(data["published"])
                    cohort.app_id = data["app_id"]
                    cohort.created_at = int(self.wall_clock().timestamp())
                    cohort.replace(members)
        return _json(200, {"cohortId": target, "metadata": {
            "matched": len(members), "totals": len(ids),
            "invalid_ids_sample": invalid[:10]}})

    async def _on_membership(self, request: FakeRequest, _fault: Fault | None) -> FakeResponse:
        data = self._body(request)
        if isinstance(data, FakeResponse):
            return data
        cohort = self.cohorts.get(data.get("cohort_id", ""))
        if cohort is None:
            return _error(404, "not_found", f"Cohort {data.get('cohort_id')} not found")
        memberships = data.get("memberships")
        if not isinstance(memberships, list) or not memberships:
            return _error(400, "invalid_request", "memberships must be a non-empty list")
        total = 0
        for change in memberships:
            if (not isinstance(change, dict) or change.get("id_type") not in ("BY_ID", "BY_NAME")
                    or change.get("operation") not in ("ADD", "REMOVE")):
                return _error(400, "invalid_request", f"invalid membership entry {change!r}")
            bad = self._check_ids(change.get("ids"))
            if bad is not None:
                return bad
            total += len(change["ids"])
        if total > self.limits.max_ids_per_request:
            self._violate("ids_per_request", f"{total} ids in one membership request")
            return _error(400, "too_many_ids",
                          f"At most {self.limits.max_ids_per_request} ids per request")
        results = []
        async with self._writing_to(cohort.id) as ok:
            if not ok:
                return _error(429, "too_many_requests", "Cohort is being updated",
                              headers=[("Retry-After", "1")])
            for change in memberships:
                by_name = change["id_type"] == "BY_NAME"
                skipped = []
                for value in change["ids"]:
                    if change["operation"] == "ADD":
                        member = self.known_member(value, by_user=by_name)
                        if member is None:  # not an id of a user the project knows
                            skipped.append(value)
                        elif not (by_name and cohort.has_user(value)):
                            cohort.add(member)
                    else:
                        removed = (cohort.remove_by_user_id(value) if by_name
                                   else cohort.remove_by_amplitude_id(value))
                        if not removed:
                            skipped.append(value)
                self.membership_changes.append(
                    (cohort.id, change["operation"], len(change["ids"])))
                results.append({"skipped_ids": skipped, "id_type": change["id_type"],
                                "operation": change["operation"]})
        return _json(200, {"cohort_id": cohort.id, "memberships_result": results})

    # -- S3 -----------------------------------------------------------------------------
    def _signature(self, request_id: str, expires: str) -> str:
        message = f"{request_id}:{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    def _presign(self, job: _Job, *, expired: bool) -> str:
        issued = anyio.current_time() - (self.s3_link_ttl + 1 if expired else 0)
        expires = f"{issued + self.s3_link_ttl:.3f}"
        query = urlencode({
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": "AKIAFAKEEXPORTS/s3/aws4_request",
            "X-Amz-Expires": f"{self.s3_link_ttl:g}",
            "X-Amz-Date": expires,
            "X-Amz-SignedHeaders": "host",
            "X-Amz-Signature": self._signature(job.request_id, expires),
        })
        return f"{self.s3_origin}/exports/{job.request_id}.csv?{query}"

    async def _s3(self, request: FakeRequest) -> FakeResponse:
        if "authorization" in request.headers:
            return _s3_error(400, "InvalidArgument", "Only one auth mechanism allowed; only the "
                             "X-Amz-Algorithm query parameter, Signature query string parameter "
                             "or the Authorization header should be specified")
        query = dict(request.query)
        request_id = request.path.rsplit("/", 1)[-1].removesuffix(".csv")
        job = self.jobs.get(request_id)
        expires = query.get("X-Amz-Date", "")
        if job is None or not hmac.compare_digest(
            query.get("X-Amz-Signature", ""), self._signature(request_id, expires)
        ):
            return _s3_error(403, "SignatureDoesNotMatch", "The request signature we "
                             "calculated does not match the signature you provided.")
        if anyio.current_time() > float(expires):
            return _s3_error(403, "AccessDenied", "Request has expired")
        return self._serve_export(job, await self._export(job), request)

    def _serve_export(self, job: _Job, export: IO[bytes], request: FakeRequest) -> FakeResponse:
        size = job.export_size
        headers = [("Content-Type", "text/csv"), ("Accept-Ranges", "bytes")]
        if job.gzip:
            headers.append(("Content-Encoding", "gzip"))
        start, status = 0, 200
        wanted = request.headers.get("range", "")
        if wanted.startswith("bytes=") and wanted.endswith("-"):
            try:
                start = int(wanted[6:-1])
            except ValueError:
                start = 0
            if start >= size:
                return FakeResponse(416, [("Content-Range", f"bytes */{size}")])
            status = 206
            headers.append(("Content-Range", f"bytes {start}-{size - 1}/{size}"))
        headers.append(("Content-Length", str(size - start)))
        return FakeResponse(status, headers, _read_range(export, job.read_lock, start, size))


async def _read_range(
    export: IO[bytes], lock: threading.Lock, start: int, end: int
) -> AsyncIterator[bytes]:
    """Stream bytes [start, end) of a shared export; large ones in 1 MiB reads off the loop."""
    large = end - start > (8 << 20)
    step = (1 << 20) if large else _CHUNK
    position = start

    def read(at: int) -> bytes:
        with lock:  # several transfers may read one export at once
            export.seek(at)
            return export.read(min(step, end - at))

    while position < end:
        chunk = await anyio.to_thread.run_sync(read, position) if large else read(position)
        if not chunk:
            break
        position += len(chunk)
        yield chunk


async def _slowly(body: bytes | AsyncIterator[bytes], delay: float) -> AsyncIterator[bytes]:
    if isinstance(body, bytes):
        for start in range(0, len(body), 4096):
            await anyio.sleep(delay)
            yield body[start : start + 4096]
        return
    async for chunk in body:
        await anyio.sleep(delay)
        yield chunk

