"""Embedding amp_cohorts_async in FastAPI.

One CohortsClient for the whole app, owned by its lifespan (so every request shares the same
limits: 5 concurrent requests, the cohort-request windows, the monthly quota) and handed to
routes through a dependency. Downloads run in the lifespan's task group, so shutting the app
down cancels them cleanly (no partial files), and their progress can be polled.

    AMPLITUDE_API_KEY=... AMPLITUDE_SECRET_KEY=... uvicorn examples.fastapi_app:app

Under several workers (``uvicorn --workers 4``, gunicorn) each worker is a process with its
own client, and a status poll may reach another worker than the one that started the
download. The workers draw from one set of limits (the account's) instead of four through a
file in the user's cache (``amp.FileLimits``) on one host, or, across hosts, through the
Redis that AMPLITUDE_LIMITS_URL names; with AMPLITUDE_LIMITS_URL set they also keep the
downloads' state in that Redis, where every worker sees it (without it, run one worker):

    pip install 'amp-cohorts-async[examples]'
    AMPLITUDE_LIMITS_URL=redis://localhost:6379/0 uvicorn examples.fastapi_app:app --workers 4

AMPLITUDE_TIME_SCALE (for the emulator only: ``python -m amp_cohorts_async.testing
--time-scale 0.05``) runs the client on the emulator's faster clock.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol

import anyio
import anyio.abc
import attrs
from fastapi import Depends, FastAPI, HTTPException, Request, Response

import amp_cohorts_async as amp


@attrs.define
class DownloadJob:
    cohort_id: str
    last_event: amp.ProgressEvent | None = None
    result: amp.DownloadResult | None = None
    error: str | None = None

    def view(self) -> dict[str, Any]:
        event = self.last_event
        return {
            "cohort_id": self.cohort_id,
            "phase": "failed" if self.error else (event.phase if event else "queued"),
            "bytes_done": event.bytes_done if event else 0,
            "bytes_total": event.bytes_total if event else None,
            "wait_seconds": event.wait_seconds if event else None,
            "path": str(self.result.path) if self.result else None,
            "sha256": self.result.sha256 if self.result else None,
            "error": self.error,
        }


class JobStore(Protocol):
    """Where the downloads' state lives, for the status route to read."""

    async def save(self, job_id: str, view: dict[str, Any]) -> None: ...
    async def load(self, job_id: str) -> dict[str, Any] | None: ...
    async def aclose(self) -> None: ...


class MemoryJobs:
    """This process only: enough for one worker."""

    def __init__(self) -> None:
        self._views: dict[str, dict[str, Any]] = {}

    async def save(self, job_id: str, view: dict[str, Any]) -> None:
        self._views[job_id] = view

    async def load(self, job_id: str) -> dict[str, Any] | None:
        return self._views.get(job_id)

    async def aclose(self) -> None:
        self._views.clear()


class RedisJobs:
    """In Redis, where every worker of the app sees every download (kept for a day)."""

    TTL_SECONDS = 24 * 3600

    def __init__(self, url: str) -> None:
        import redis.asyncio

        self._redis = redis.asyncio.Redis.from_url(url)

    @staticmethod
    def _key(job_id: str) -> str:
        return f"amp-cohorts-example:download:{job_id}"

    async def save(self, job_id: str, view: dict[str, Any]) -> None:
        await self._redis.set(self._key(job_id), json.dumps(view), ex=self.TTL_SECONDS)

    async def load(self, job_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(self._key(job_id))
        view: dict[str, Any] | None = None if raw is None else json.loads(raw)
        return view

    async def aclose(self) -> None:
        await self._redis.aclose()


def jobs_from_environment() -> JobStore:
    """RedisJobs when AMPLITUDE_LIMITS_URL names a Redis (the limits need it anyway)."""
    url = os.environ.get("AMPLITUDE_LIMITS_URL")
    return RedisJobs(url) if url else MemoryJobs()


def get_client(request: Request) -> amp.CohortsClient:
    """The app's one client, for routes (a dependency)."""
    client: amp.CohortsClient = request.app.state.client
    return client


Client = Annotated[amp.CohortsClient, Depends(get_client)]


def client_from_environment() -> amp.CohortsClient:
    """Keys (and AMPLITUDE_BASE_URL) from the environment. The limits are shared with every
    other worker process of the app: on the Redis AMPLITUDE_LIMITS_URL names, else in a file
    on this host."""
    url = os.environ.get("AMPLITUDE_LIMITS_URL")
    scale = os.environ.get("AMPLITUDE_TIME_SCALE")
    limits = amp.Limits().time_scaled(float(scale)) if scale else None
    if url:
        from amp_cohorts_async.redis import RedisLimits

        return amp.CohortsClient(limits=limits, limits_backend=RedisLimits.from_url(url))
    return amp.CohortsClient(limits=limits, limits_backend=amp.FileLimits())


def create_app(
    make_client: Callable[[], amp.CohortsClient] = client_from_environment,
    download_dir: str | pathlib.Path = "downloads",
    make_jobs: Callable[[], JobStore] = jobs_from_environment,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.Path(download_dir).mkdir(parents=True, exist_ok=True)
        client = make_client()
        jobs = make_jobs()
        try:
            async with client, anyio.create_task_group() as tasks:
                app.state.client = client
                app.state.tasks = tasks
                app.state.jobs = jobs
                yield
                tasks.cancel_scope.cancel()  # shutting down: stop downloads, no partial file
        finally:
            await jobs.aclose()
            await client.scheduler.backend.aclose()  # the Redis connections or the file

    app = FastAPI(lifespan=lifespan)

    @app.middleware("http")
    async def served_by(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                        ) -> Response:
        response = await call_next(request)
        response.headers["X-Worker"] = str(os.getpid())  # which worker process answered
        return response

    @app.get("/cohorts")
    async def list_cohorts(client: Client) -> list[dict[str, Any]]:
        cohorts = await client.list_cohorts()
        return [{"id": c.id, "name": c.name, "size": c.size} for c in cohorts]

    @app.post("/downloads/{cohort_id}", status_code=202)
    async def start_download(cohort_id: str, request: Request, client: Client
                             ) -> dict[str, str]:
        job_id = secrets.token_hex(8)
        job = DownloadJob(cohort_id)
        jobs: JobStore = request.app.state.jobs
        tasks: anyio.abc.TaskGroup = request.app.state.tasks
        written = anyio.Lock()

        async def publish() -> None:
            # Serialised, and each write takes the state as it is then: the last write
            # always carries the latest state, whatever order the events came in.
            async with written:
                await jobs.save(job_id, job.view())

        def on_progress(event: amp.ProgressEvent) -> None:  # called on the event loop
            job.last_event = event
            tasks.start_soon(publish)

        async def run() -> None:
            try:
                job.result = await client.download_cohort(
                    cohort_id, download_dir, on_progress=on_progress
                )
            except amp.AmplitudeError as error:
                job.error = str(error)
            await publish()

        await publish()  # known to every worker before the caller can ask
        tasks.start_soon(run)
        return {"job_id": job_id}

    @app.get("/downloads/{job_id}")
    async def download_status(job_id: str, request: Request) -> dict[str, Any]:
        view = await request.app.state.jobs.load(job_id)
        if view is None:
            raise HTTPException(404, "no such download")
        return view  # type: ignore[no-any-return]

    return app


def _app_from_environment() -> FastAPI:
    return create_app(client_from_environment)


app = _app_from_environment()
