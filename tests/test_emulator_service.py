"""The emulator as a service (``python -m amp_cohorts_async.testing``) and the fixture's options."""

from __future__ import annotations

import pathlib
import re
import signal
import sys
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude
from amp_cohorts_async.testing.pytest_plugin import FakeAmplitudeFixture

AUTH = ("test-api-key", "test-secret-key")


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[anyio.abc.Process, str]]:
    process = await anyio.open_process(
        [sys.executable, "-m", "amp_cohorts_async.testing", "--cohort", "a:10",
         "--time-scale", "0.01", "--job-seconds", "0.1"])
    assert process.stdout is not None
    try:
        seen = ""
        with anyio.fail_after(30):
            while not (found := re.search(r"listening on (http://\S+)", seen)):
                seen += (await process.stdout.receive()).decode()
        yield process, found.group(1)
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()


async def test_the_emulator_endpoints_over_http(
    emulator: tuple[anyio.abc.Process, str]
) -> None:
    process, base_url = emulator
    async with httpx.AsyncClient(base_url=base_url) as http:
        added = await http.post("/_emulator/cohorts", json={
            "id": "b", "size": 5, "properties": ["plan"], "last_computed": 1_700_000_000})
        assert added.status_code == 201
        listed = (await http.get("/api/3/cohorts", auth=AUTH)).json()["cohorts"]
        b = next(c for c in listed if c["id"] == "b")
        assert (b["size"], b["lastComputed"]) == (5, 1_700_000_000)

        assert (await http.post("/_emulator/usage", json={"usage": 42})).status_code == 200
        usage = (await http.get("/api/3/cohorts/usage", auth=AUTH)).json()["rest_download"]
        assert usage["usage"] == 42

        touched = (await http.post("/_emulator/cohorts/b/touch")).json()
        assert touched["last_computed"] > 1_700_000_000
        assert (await http.post("/_emulator/cohorts/nope/touch")).status_code == 404
        assert (await http.post("/_emulator/usage", json={"usage": -1})).status_code == 400
        assert (await http.post("/_emulator/cohorts", content=b"[")).status_code == 400

        await http.get("/api/3/cohorts", auth=("test-api-key", "wrong"))  # an auth breach
        violations = (await http.get("/_emulator/violations")).json()
        assert [v["kind"] for v in violations] == ["auth"]
        log = (await http.get("/_emulator/log")).json()
        assert [entry["path"] for entry in log] == [
            "/api/3/cohorts", "/api/3/cohorts/usage", "/api/3/cohorts"]
        assert {entry["headers"]["authorization"] for entry in log} == {"Basic ***"}

        assert (await http.post("/_emulator/reset")).status_code == 200
        assert (await http.get("/_emulator/violations")).json() == []
        assert (await http.get("/_emulator/log")).json() == []
        usage = (await http.get("/api/3/cohorts/usage", auth=AUTH)).json()["rest_download"]
        assert usage["usage"] == 0
        assert {c["id"] for c in (await http.get("/api/3/cohorts", auth=AUTH)).json()[
            "cohorts"]} == {"a", "b"}  # the cohorts stay

        await http.get("/api/3/cohorts", auth=("test-api-key", "wrong"))
    process.send_signal(signal.SIGTERM)
    assert process.stdout is not None
    with anyio.fail_after(30):
        assert await process.wait() == 0
        rest = b"".join([chunk async for chunk in process.stdout]).decode()
    assert "stopped: 3 API requests, 1 limit violations:" in rest
    assert "auth: bad credentials on list" in rest
    assert "wrong" not in rest


async def test_a_time_scaled_emulator_and_client_agree(
    emulator: tuple[anyio.abc.Process, str], tmp_path: pathlib.Path
) -> None:
    _, base_url = emulator
    limits = amp.Limits().time_scaled(0.01)
    async with amp.CohortsClient(*AUTH, base_url=base_url, limits=limits,
                                 poll=amp.PollPolicy(initial_interval=0.05)) as client:
        for n in range(6):  # more than one 4-per-minute window, scaled to 0.6 s
            await client.download_cohort("a", tmp_path / f"a{n}.csv")
    async with httpx.AsyncClient(base_url=base_url) as http:
        assert (await http.get("/_emulator/violations")).json() == []


@pytest.mark.fake_amplitude(usage=500, cohorts={"c1": 10})
async def test_the_fixture_takes_usage_and_cohorts(
    fake_amplitude: FakeAmplitudeFixture, tmp_path: pathlib.Path
) -> None:
    assert fake_amplitude.fake.cohorts["c1"].size == 10
    async with fake_amplitude.client as client:
        assert (await client.get_usage()).remaining == 0
        with pytest.raises(amp.QuotaExceededError):
            await client.download_cohorts(["c1"], tmp_path)
    assert fake_amplitude.fake.cohort_requests == 0


@pytest.mark.parametrize("fake_amplitude", [
    {"limits": amp.Limits(max_concurrent_requests=2), "job_duration": 50.0},
], indirect=True)
async def test_the_fixture_takes_limits_and_job_durations(
    fake_amplitude: FakeAmplitudeFixture, tmp_path: pathlib.Path
) -> None:
    fake: FakeAmplitude = fake_amplitude.fake
    fake.add_cohort("c1", size=10)
    async with fake_amplitude.client as client:
        assert client.limits.max_concurrent_requests == 2  # the client obeys the fake's
        started = anyio.current_time()
        await client.download_cohort("c1", tmp_path)
        assert anyio.current_time() - started >= 50.0  # virtual time: the job's 50 s
    assert fake.violations == []
