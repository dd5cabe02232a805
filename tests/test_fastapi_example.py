"""The FastAPI example, driven through its ASGI app with the emulator behind the client."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import sys

import anyio
import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
from fastapi_app import create_app


@pytest.mark.looptime
async def test_list_start_and_follow_a_download(fake: FakeAmplitude, tmp_path: pathlib.Path
                                                ) -> None:
    app = create_app(
        lambda: amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                  poll=amp.PollPolicy(initial_interval=1.0)),
        tmp_path,
    )
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://app") as http:
            cohorts = (await http.get("/cohorts")).json()
            assert [c["id"] for c in cohorts] == ["small", "large"]
            started = await http.post("/downloads/large")
            assert started.status_code == 202
            job_id = started.json()["job_id"]
            phases = []
            for _ in range(60):
                status = (await http.get(f"/downloads/{job_id}")).json()
                phases.append(status["phase"])
                if status["phase"] in ("done", "failed"):
                    break
                await anyio.sleep(0.5)
            assert status["phase"] == "done", status
            assert pathlib.Path(status["path"]).exists()
            assert "polling" in phases
            missing = await http.post("/downloads/nope")
            for _ in range(20):
                failed = (await http.get(f"/downloads/{missing.json()['job_id']}")).json()
                if failed["phase"] == "failed":
                    break
                await anyio.sleep(0.5)
            assert "404" in failed["error"]
            assert (await http.get("/downloads/unknown")).status_code == 404


@pytest.mark.looptime
async def test_shutdown_cancels_downloads_and_leaves_no_partial_file(
    fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    fake.never_finish.add("large")
    app = create_app(
        lambda: amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport()),
        tmp_path,
    )
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://app") as http:
            await http.post("/downloads/large")
            await anyio.sleep(10)
    assert list(tmp_path.iterdir()) == []


def test_workers_share_limits_in_a_file_or_on_redis(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    from fastapi_app import client_from_environment

    from amp_cohorts_async.redis import RedisLimits

    monkeypatch.setenv("AMPLITUDE_API_KEY", "k")
    monkeypatch.setenv("AMPLITUDE_SECRET_KEY", "s")
    monkeypatch.delenv("AMPLITUDE_LIMITS_URL", raising=False)
    assert isinstance(client_from_environment().scheduler.backend, amp.FileLimits)
    monkeypatch.setenv("AMPLITUDE_LIMITS_URL", redis_url)
    assert isinstance(client_from_environment().scheduler.backend, RedisLimits)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_four_uvicorn_workers_answer_every_poll_from_redis(
    served: tuple[FakeAmplitude, str], redis_url: str, tmp_path: pathlib.Path
) -> None:
    fake, base_url = served
    scale = 0.01
    fake.limits = amp.Limits().time_scaled(scale)
    fake.job_duration = (0.3, 1.0)
    for n in range(8):
        fake.add_cohort(f"c{n}", size=100)
    limits_url = redis_url.rsplit("/", 1)[0] + "/7"  # a database of its own
    port = _free_port()
    app_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AMPLITUDE_API_KEY": fake.api_key,
           "AMPLITUDE_SECRET_KEY": fake.secret_key, "AMPLITUDE_BASE_URL": base_url,
           "AMPLITUDE_LIMITS_URL": limits_url, "AMPLITUDE_TIME_SCALE": str(scale)}
    examples = pathlib.Path(__file__).parents[1] / "examples"
    server = await anyio.open_process(
        [sys.executable, "-m", "uvicorn", "fastapi_app:app", "--app-dir", str(examples),
         "--workers", "4", "--host", "127.0.0.1", "--port", str(port), "--log-level",
         "warning"], cwd=tmp_path, env=env)
    try:
        with anyio.fail_after(120):
            while True:  # until the workers listen
                try:
                    async with httpx.AsyncClient(base_url=app_url) as probe:
                        if (await probe.get("/cohorts")).status_code == 200:
                            break
                except httpx.TransportError:
                    await anyio.sleep(0.2)
            # Each export started over a fresh connection, so the workers share them out.
            started: dict[str, str] = {}
            for n in range(24):
                async with httpx.AsyncClient(base_url=app_url) as fresh:
                    response = await fresh.post(f"/downloads/c{n % 8}")
                assert response.status_code == 202
                started[response.json()["job_id"]] = response.headers["X-Worker"]
                if len(started) >= 8 and len(set(started.values())) >= 2:
                    break
            # Polled over one kept-alive connection: one worker answers for all of them.
            polled_by: set[str] = set()
            pending = set(started)
            async with httpx.AsyncClient(base_url=app_url,
                                         limits=httpx.Limits(max_connections=1)) as poller:
                while pending:
                    for job_id in sorted(pending):
                        status = await poller.get(f"/downloads/{job_id}")
                        assert status.status_code == 200, status.text  # a known job, always
                        polled_by.add(status.headers["X-Worker"])
                        if status.json()["phase"] in ("done", "failed"):
                            assert status.json()["phase"] == "done", status.json()
                            pending.discard(job_id)
                    await anyio.sleep(0.2)
    finally:
        server.send_signal(signal.SIGINT)
        with anyio.move_on_after(30):
            await server.wait()
        if server.returncode is None:
            server.kill()
        await server.aclose()
    assert len(polled_by) == 1
    assert set(started.values()) - polled_by  # jobs another worker started were known here
    assert fake.violations == []
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == [
        f"c{n}.csv" for n in range(8)]
