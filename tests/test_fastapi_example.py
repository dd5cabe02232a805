"""The FastAPI example, driven through its ASGI app with the emulator behind the client."""

from __future__ import annotations

import pathlib
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
