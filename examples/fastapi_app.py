"""Embedding amp_cohorts_async in FastAPI.

One CohortsClient for the whole app, owned by its lifespan (so every request shares the same
limits: 5 concurrent requests, the cohort-request windows, the monthly quota) and handed to
routes through a dependency. Downloads run in the lifespan's task group, so shutting the app
down cancels them cleanly (no partial files), and their progress can be polled.

    AMPLITUDE_API_KEY=... AMPLITUDE_SECRET_KEY=... uvicorn examples.fastapi_app:app

Under several workers (``uvicorn --workers 4``, gunicorn) each worker is a process with its
own client; they draw from one set of limits (the account's) instead of four through a file
in the user's cache (``amp.FileLimits``) on one host, or, across hosts, through the Redis that
AMPLITUDE_LIMITS_URL names:

    AMPLITUDE_LIMITS_URL=redis://localhost:6379/0 uvicorn examples.fastapi_app:app --workers 4
"""

from __future__ import annotations

import os
import pathlib
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import attrs
from fastapi import Depends, FastAPI, HTTPException, Request

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
    if url:
        from amp_cohorts_async.redis import RedisLimits

        return amp.CohortsClient(limits_backend=RedisLimits.from_url(url))
    return amp.CohortsClient(limits_backend=amp.FileLimits())


def create_app(
    make_client: Callable[[], amp.CohortsClient] = client_from_environment,
    download_dir: str | pathlib.Path = "downloads",
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.Path(download_dir).mkdir(parents=True, exist_ok=True)
        client = make_client()
        try:
            async with client, anyio.create_task_group() as tasks:
                app.state.client = client
                app.state.tasks = tasks
                app.state.jobs = {}
                yield
                tasks.cancel_scope.cancel()  # shutting down: stop downloads, no partial file
        finally:
            await client.scheduler.backend.aclose()  # the Redis connections or the file

    app = FastAPI(lifespan=lifespan)

    @app.get("/cohorts")
    async def list_cohorts(client: Client) -> list[dict[str, Any]]:
        cohorts = await client.list_cohorts()
        return [{"id": c.id, "name": c.name, "size": c.size} for c in cohorts]

    @app.post("/downloads/{cohort_id}", status_code=202)
    async def start_download(cohort_id: str, request: Request, client: Client
                             ) -> dict[str, str]:
        job_id = secrets.token_hex(8)
        job = DownloadJob(cohort_id)
        request.app.state.jobs[job_id] = job

        def on_progress(event: amp.ProgressEvent) -> None:
            job.last_event = event

        async def run() -> None:
            try:
                job.result = await client.download_cohort(
                    cohort_id, download_dir, on_progress=on_progress
                )
            except amp.AmplitudeError as error:
                job.error = str(error)

        request.app.state.tasks.start_soon(run)
        return {"job_id": job_id}

    @app.get("/downloads/{job_id}")
    async def download_status(job_id: str, request: Request) -> dict[str, Any]:
        job = request.app.state.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, "no such download")
        view: dict[str, Any] = job.view()
        return view

    return app


def _app_from_environment() -> FastAPI:
    return create_app(client_from_environment)


app = _app_from_environment()
