"""FakeAmplitude's own behaviour: endpoints, file format, S3 hand-off, limits and faults."""

from __future__ import annotations

import base64
import csv
import gzip
import io
import pathlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude, Member

AUTH = {"Authorization": "Basic " + base64.b64encode(b"test-api-key:test-secret-key").decode()}


@pytest.fixture
async def http(fake: FakeAmplitude) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=fake.transport(), base_url="https://amplitude.com", headers=AUTH
    ) as client:
        yield client


async def start_job(http: httpx.AsyncClient, cohort_id: str, query: str = "") -> str:
    response = await http.get(f"/api/5/cohorts/request/{cohort_id}{query}")
    assert response.status_code == 202
    body = response.json()
    assert body["cohort_id"] == cohort_id
    return str(body["request_id"])


@pytest.mark.looptime
async def test_job_runs_for_its_duration(fake: FakeAmplitude, http: httpx.AsyncClient) -> None:
    request_id = await start_job(http, "small")
    status = await http.get(f"/api/5/cohorts/request-status/{request_id}")
    assert (status.status_code, status.json()["async_status"]) == (202, "JOB INPROGRESS")
    assert (await http.get(f"/api/5/cohorts/request/{request_id}/file")).status_code == 400
    await anyio.sleep(10)
    status = await http.get(f"/api/5/cohorts/request-status/{request_id}")
    assert (status.status_code, status.json()["async_status"]) == (200, "JOB COMPLETED")


@pytest.mark.looptime
async def test_file_format_with_props_and_prop_keys(
    fake: FakeAmplitude, http: httpx.AsyncClient
) -> None:
    request_id = await start_job(http, "small", "?props=1&propKeys=city")
    await anyio.sleep(10)
    response = await http.get(f"/api/5/cohorts/request/{request_id}/file")
    assert response.status_code == 200
    text = response.text
    lines = text.splitlines()
    assert lines[0] == '"amplitude_id","user_id","city"'
    assert all(line.startswith('"') and line.endswith('"') for line in lines)
    rows = list(csv.reader(io.StringIO(text)))
    assert len(rows) == 26
    assert any(row[1] == "" for row in rows[1:])  # users without a user id
    assert any("," in row[2] or '"' in row[2] for row in rows[1:])  # quoting matters


@pytest.mark.looptime
async def test_group_cohort_values_carry_a_tab(fake: FakeAmplitude, http: httpx.AsyncClient
                                                ) -> None:
    fake.add_cohort("orgs", size=3, group_type="org")
    request_id = await start_job(http, "orgs")
    await anyio.sleep(10)
    rows = list(csv.reader(io.StringIO(
        (await http.get(f"/api/5/cohorts/request/{request_id}/file")).text)))
    assert rows[0] == ["group_id", "group_name"]
    assert all(value.startswith("\t") for row in rows[1:] for value in row)


@pytest.mark.looptime
async def test_large_file_redirects_to_s3_with_a_fresh_link_each_time(
    fake: FakeAmplitude, http: httpx.AsyncClient
) -> None:
    request_id = await start_job(http, "large")
    await anyio.sleep(10)
    first = await http.get(f"/api/5/cohorts/request/{request_id}/file")
    await anyio.sleep(1)
    second = await http.get(f"/api/5/cohorts/request/{request_id}/file")
    assert first.status_code == second.status_code == 302
    assert first.headers["Location"] != second.headers["Location"]
    s3_url = first.headers["Location"]
    assert s3_url.startswith(fake.s3_origin)
    assert "X-Amz-Signature=" in s3_url
    async with httpx.AsyncClient(transport=fake.transport()) as s3:
        refused = await s3.get(s3_url, headers=AUTH)
        assert refused.status_code == 400
        assert "Only one auth mechanism allowed" in refused.text
        ok = await s3.get(s3_url)
        assert ok.status_code == 200
        assert ok.text.startswith('"amplitude_id"')
        ranged = await s3.get(s3_url, headers={"Range": "bytes=10-"})
        assert ranged.status_code == 206
        assert ranged.content == ok.content[10:]
        size = len(ok.content)
        assert ranged.headers["Content-Range"] == f"bytes 10-{size - 1}/{size}"
        forged = await s3.get(s3_url.replace("X-Amz-Signature=", "X-Amz-Signature=0"))
        assert forged.status_code == 403
        await anyio.sleep(61)
        expired = await s3.get(s3_url)
        assert expired.status_code == 403
        assert "Request has expired" in expired.text
    # /file stays valid for 7 days and hands out a new link.
    assert (await http.get(f"/api/5/cohorts/request/{request_id}/file")).status_code == 302
    await anyio.sleep(7 * 24 * 3600)
    assert (await http.get(f"/api/5/cohorts/request/{request_id}/file")).status_code == 404


@pytest.mark.looptime
async def test_gzip_exports() -> None:
    with FakeAmplitude(gzip=True, inline_threshold=10**9) as fake:
        fake.add_cohort("z", size=50)
        async with httpx.AsyncClient(transport=fake.transport(), base_url="https://a.test",
                                     headers=AUTH) as http:
            request_id = await start_job(http, "z")
            async with http.stream("GET", f"/api/5/cohorts/request/{request_id}/file") as r:
                raw = b"".join([chunk async for chunk in r.aiter_raw()])
            assert r.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(raw).startswith(b'"amplitude_id"')


async def test_credentials_are_checked(fake: FakeAmplitude) -> None:
    async with httpx.AsyncClient(transport=fake.transport(), base_url="https://a.test") as http:
        response = await http.get("/api/3/cohorts", auth=("test-api-key", "nope"))
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"
    assert fake.log[-1].headers["authorization"] == "Basic ***"


async def test_list_and_usage(fake: FakeAmplitude, http: httpx.AsyncClient) -> None:
    fake.add_cohort("synced", size=1, sync_metadata=[{"target": "braze", "frequency": "hourly"}])
    plain = (await http.get("/api/3/cohorts")).json()["cohorts"]
    assert [c["id"] for c in plain] == ["small", "large", "synced"]
    assert "syncMetadata" not in plain[0]
    synced = (await http.get("/api/3/cohorts?includeSyncInfo=true")).json()["cohorts"]
    assert synced[2]["syncMetadata"] == [{"target": "braze", "frequency": "hourly"}]
    assert synced[0]["appId"] == 123456
    assert synced[1]["size"] == 20_000
    await start_job(http, "small")
    usage = (await http.get("/api/3/cohorts/usage")).json()["rest_download"]
    assert usage["limit"] == 500
    assert usage["usage"] == 1


async def fetch_export(http: httpx.AsyncClient, request_id: str) -> list[str]:
    response = await http.get(f"/api/5/cohorts/request/{request_id}/file",
                              follow_redirects=True)
    assert response.status_code == 200
    return response.text.splitlines()[1:]


@pytest.mark.looptime
async def test_touch_recomputes_a_cohort_with_new_members_and_a_later_last_computed(
    fake: FakeAmplitude, http: httpx.AsyncClient
) -> None:
    fake.cohorts["small"].last_computed = 4_000_000_000  # later than any wall clock of the test

    async def listed() -> dict[str, Any]:
        cohorts = (await http.get("/api/3/cohorts")).json()["cohorts"]
        return {c["id"]: c for c in cohorts}

    before = (await listed())["small"]
    assert before["lastComputed"] == 4_000_000_000
    old_job = await start_job(http, "small")
    unfetched_job = await start_job(http, "small")
    await anyio.sleep(10)
    old_rows = set(await fetch_export(http, old_job))

    fake.touch("small", churn=0.2)
    after = await listed()
    assert after["small"]["lastComputed"] == 4_000_000_001  # later, even within one second
    assert after["small"]["size"] == 25
    new_job = await start_job(http, "small")
    await anyio.sleep(10)
    new_rows = set(await fetch_export(http, new_job))
    assert len(old_rows - new_rows) == len(new_rows - old_rows) == 5  # 20 % left, 20 % joined
    # A job requested before the recomputation still exports what it was requested with.
    assert set(await fetch_export(http, unfetched_job)) == old_rows
    assert fake.cohort_requests == 3

    fake.cohorts["large"].last_computed = 0
    fake.touch("large")
    assert (await listed())["large"]["lastComputed"] > 1_700_000_000  # now, by the wall clock


@pytest.mark.looptime
async def test_touch_recomputes_uploaded_members_too(fake: FakeAmplitude) -> None:
    cohort = fake.add_cohort("up", size=0, members=[
        Member(str(100 + i), f"u{i}") for i in range(10)], last_computed=1_700_000_000)
    before = {m.amplitude_id for m in cohort.iter_members()}
    fake.touch("up", churn=0.3)
    after = {m.amplitude_id for m in cohort.iter_members()}
    assert len(before - after) == len(after - before) == 3
    assert cohort.last_computed > 1_700_000_000


@pytest.mark.looptime
async def test_window_limits_are_enforced_and_recorded(
    fake: FakeAmplitude, http: httpx.AsyncClient
) -> None:
    for _ in range(4):
        await start_job(http, "small")
    refused = await http.get("/api/5/cohorts/request/small")
    assert refused.status_code == 429
    assert "Retry-After" in refused.headers
    assert [v.kind for v in fake.violations] == ["window"]
    await anyio.sleep(60)
    await start_job(http, "small")  # exactly a minute later: allowed


async def test_concurrency_limit_is_enforced() -> None:
    with FakeAmplitude(latency=1.0) as fake:
        async with httpx.AsyncClient(transport=fake.transport(), base_url="https://a.test",
                                     headers=AUTH) as http:
            statuses: list[int] = []

            async def call() -> None:
                statuses.append((await http.get("/api/3/cohorts")).status_code)

            async with anyio.create_task_group() as group:
                for _ in range(6):
                    group.start_soon(call)
    assert sorted(statuses) == [200] * 5 + [429]
    assert [v.kind for v in fake.violations] == ["concurrency"]
    assert fake.active == 0


async def test_monthly_quota() -> None:
    now = datetime(2026, 5, 31, 12, tzinfo=UTC)
    with FakeAmplitude(usage=500, wall_clock=lambda: now) as fake:
        fake.add_cohort("c")
        async with httpx.AsyncClient(transport=fake.transport(), base_url="https://a.test",
                                     headers=AUTH) as http:
            response = await http.get("/api/5/cohorts/request/c")
            assert response.status_code == 429
            assert response.json()["error"]["type"] == "quota_exceeded"
            usage = (await http.get("/api/3/cohorts/usage")).json()["rest_download"]
    assert usage["resets_at"] == "2026-06-01T00:00:00"
    assert [v.kind for v in fake.violations] == ["quota"]


async def test_cohort_size_limit(http: httpx.AsyncClient, fake: FakeAmplitude) -> None:
    fake.add_cohort("huge", size=2_000_001)
    response = await http.get("/api/5/cohorts/request/huge")
    assert response.status_code == 400
    assert [v.kind for v in fake.violations] == ["cohort_size"]


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_status_faults(fake: FakeAmplitude, http: httpx.AsyncClient, status: int) -> None:
    fake.inject("list", "status", status=status, retry_after=3, times=2)
    assert (await http.get("/api/3/cohorts")).status_code == status
    second = await http.get("/api/3/cohorts")
    assert second.status_code == status
    assert second.headers["Retry-After"] == "3"
    assert (await http.get("/api/3/cohorts")).status_code == 200


@pytest.mark.looptime
async def test_body_faults(fake: FakeAmplitude, http: httpx.AsyncClient) -> None:
    request_id = await start_job(http, "small")
    await anyio.sleep(10)
    url = f"/api/5/cohorts/request/{request_id}/file"
    full = (await http.get(url)).content
    fake.inject("file", "truncate", after_bytes=100)
    async with http.stream("GET", url) as response:
        truncated = b"".join([c async for c in response.aiter_raw()])
    assert truncated == full[:100]
    assert int(response.headers["Content-Length"]) == len(full)
    fake.inject("file", "cut", after_bytes=50)
    with pytest.raises(httpx.ReadError):
        await http.get(url)
    fake.inject("file", "slow", delay=5.0)
    started = anyio.current_time()
    assert (await http.get(url)).content == full
    assert anyio.current_time() - started >= 5.0


@pytest.mark.looptime
async def test_never_finishing_and_failing_jobs(fake: FakeAmplitude, http: httpx.AsyncClient
                                               ) -> None:
    fake.never_finish.add("small")
    fake.failing_jobs.add("large")
    stuck = await start_job(http, "small")
    failed = await start_job(http, "large")
    await anyio.sleep(3600)
    assert (await http.get(f"/api/5/cohorts/request-status/{stuck}")).status_code == 202
    body = (await http.get(f"/api/5/cohorts/request-status/{failed}")).json()
    assert body["async_status"] == "JOB FAILED"


@pytest.mark.looptime
async def test_expired_link_fault(fake: FakeAmplitude, http: httpx.AsyncClient) -> None:
    request_id = await start_job(http, "large")
    await anyio.sleep(10)
    fake.inject("file", "expired_link")
    location = (await http.get(f"/api/5/cohorts/request/{request_id}/file")).headers["Location"]
    async with httpx.AsyncClient(transport=fake.transport()) as s3:
        assert (await s3.get(location)).status_code == 403


async def test_upload_and_membership_apply_to_members(
    fake: FakeAmplitude, http: httpx.AsyncClient
) -> None:
    fake.add_users(["a", "b", "c"])
    response = await http.post("/api/3/cohorts/upload", json={
        "name": "n", "app_id": 1, "id_type": "BY_USER_ID", "ids": ["a", "b"],
        "owner": "o@example.com", "published": True})
    body = response.json()
    cohort_id = body["cohortId"]
    assert body["metadata"] == {"matched": 2, "totals": 2, "invalid_ids_sample": []}
    assert fake.member_ids(cohort_id) == {"a", "b"}
    response = await http.post("/api/3/cohorts/membership", json={
        "cohort_id": cohort_id, "memberships": [
            {"ids": ["c"], "id_type": "BY_NAME", "operation": "ADD"},
            {"ids": ["a", "zz"], "id_type": "BY_NAME", "operation": "REMOVE"}]})
    assert response.json()["memberships_result"][1]["skipped_ids"] == ["zz"]
    assert fake.member_ids(cohort_id) == {"b", "c"}
    too_many = await http.post("/api/3/cohorts/upload", json={
        "name": "n", "app_id": 1, "id_type": "BY_AMP_ID", "ids": ["1"] * 100_001,
        "owner": "o", "published": True})
    assert too_many.status_code == 400
    assert fake.violations[-1].kind == "ids_per_request"


async def test_concurrent_writes_to_one_cohort_are_refused(
    fake: FakeAmplitude, http: httpx.AsyncClient
) -> None:
    statuses = []

    async def add(value: str) -> None:
        response = await http.post("/api/3/cohorts/membership", json={
            "cohort_id": "small",
            "memberships": [{"ids": [value], "id_type": "BY_ID", "operation": "ADD"}]})
        statuses.append(response.status_code)

    async with anyio.create_task_group() as group:
        group.start_soon(add, "1")
        group.start_soon(add, "2")
    assert sorted(statuses) == [200, 429]


@pytest.mark.looptime
async def test_a_write_holds_its_cohort_for_write_duration() -> None:
    with FakeAmplitude(write_duration=2.0) as slow:
        slow.add_cohort("c", size=3)
        async with httpx.AsyncClient(transport=slow.transport(), base_url="https://amplitude.com",
                                     headers=AUTH) as writer:
            statuses: list[int] = []

            async def add(value: str, after: float) -> None:
                await anyio.sleep(after)
                response = await writer.post("/api/3/cohorts/membership", json={
                    "cohort_id": "c",
                    "memberships": [{"ids": [value], "id_type": "BY_ID", "operation": "ADD"}]})
                statuses.append(response.status_code)

            async with anyio.create_task_group() as group:
                group.start_soon(add, "1", 0.0)
                group.start_soon(add, "2", 1.5)  # inside the first write
                group.start_soon(add, "3", 2.5)  # after it
        assert statuses == [429, 200, 200]
        assert [v.kind for v in slow.violations] == ["concurrent_write"]


@pytest.mark.parametrize("endpoint", ["upload", "membership"])
async def test_a_write_with_no_ids_is_refused(fake: FakeAmplitude, http: httpx.AsyncClient,
                                              endpoint: str) -> None:
    body = ({"name": "n", "app_id": 1, "id_type": "BY_USER_ID", "ids": [], "owner": "o",
             "published": True} if endpoint == "upload" else
            {"cohort_id": "small",
             "memberships": [{"ids": [], "id_type": "BY_ID", "operation": "ADD"}]})
    response = await http.post(f"/api/3/cohorts/{endpoint}", json=body)
    assert response.status_code == 400
    assert "non-empty" in response.json()["error"]["message"]
    assert fake.cohorts.keys() == {"small", "large"}


async def test_served_over_sockets(fake: FakeAmplitude) -> None:
    async with fake.serve() as base_url:
        async with httpx.AsyncClient(base_url=base_url, headers=AUTH) as http:
            response = await http.get("/api/3/cohorts")
    assert response.status_code == 200
    assert len(response.json()["cohorts"]) == 2


def test_client_model_round_trip_of_fake_cohorts(fake: FakeAmplitude) -> None:
    from amp_cohorts_async._convert import CohortList, structure

    data = {"cohorts": [c.to_json(include_sync_info=True) for c in fake.cohorts.values()]}
    parsed = structure(data, CohortList, what="list")
    assert [c.id for c in parsed.cohorts] == ["small", "large"]
    assert isinstance(parsed.cohorts[0], amp.Cohort)


async def test_standalone_server_module() -> None:
    import sys

    async with await anyio.open_process(
        [sys.executable, "-m", "amp_cohorts_async.testing", "--cohort", "abc:7:city",
         "--job-seconds", "0"]
    ) as process:
        assert process.stdout is not None
        with anyio.fail_after(20):
            first_line = (await process.stdout.receive()).decode().splitlines()[0]
        base_url = first_line.rsplit(" ", 1)[1]
        async with httpx.AsyncClient(base_url=base_url, headers=AUTH) as http:
            cohorts = (await http.get("/api/3/cohorts")).json()["cohorts"]
        process.terminate()
    assert [(c["id"], c["size"]) for c in cohorts] == [("abc", 7)]


def test_standalone_help_documents_every_flag_and_the_limits(
    capsys: pytest.CaptureFixture[str]
) -> None:
    from amp_cohorts_async.testing.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "Amplitude's real limits" in text
    assert "--time-scale" in text
    for flag in ("--host", "--port", "--s3-port", "--cohort", "--job-seconds",
                 "--inline-threshold", "--gzip", "--api-key", "--secret-key", "--seed"):
        assert flag in text
    assert text.count("(default:") >= 10


def test_standalone_refuses_cohorts_it_could_never_export(
    capsys: pytest.CaptureFixture[str]
) -> None:
    from amp_cohorts_async.testing.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--cohort", "huge:2000001"])
    assert "at most 2,000,000" in capsys.readouterr().err


async def test_standalone_prints_both_keys_and_scales_its_windows() -> None:
    import sys

    async with await anyio.open_process(
        [sys.executable, "-m", "amp_cohorts_async.testing", "--time-scale", "0.05",
         "--api-key", "k1", "--secret-key", "s1"]
    ) as process:
        assert process.stdout is not None
        text = ""
        with anyio.fail_after(20):
            while "limits:" not in text:
                text += (await process.stdout.receive()).decode()
        process.terminate()
    assert "API key: k1  secret key: s1" in text
    assert "4 cohort requests per 3s" in text


async def test_the_pytest_plugin_fixture(fake_amplitude: Any, tmp_path: pathlib.Path) -> None:
    import asyncio

    import looptime

    loop = asyncio.get_running_loop()
    assert isinstance(loop, looptime.LoopTimeEventLoop)
    assert loop.looptime_on  # the fixture turned virtual time on
    started = anyio.current_time()
    fake_amplitude.fake.add_cohort("p", size=50)
    result = await fake_amplitude.client.download_cohort("p", tmp_path)
    assert result.path.read_text().count("\n") == 51  # the header and 50 members
    assert fake_amplitude.fake.violations == []
    assert anyio.current_time() - started >= 10.0  # the 10 s export job, in virtual time


async def test_uploads_match_ids_as_amplitude_does(
    fake: FakeAmplitude, http: httpx.AsyncClient
) -> None:
    """Only users the project knows are matched: an upload of whole CSV lines, or of ids the
    project never saw, cannot pass for a successful one."""
    known = sorted(fake.member_ids("small"))[:2]
    known_amplitude_id = sorted(fake.member_ids("large", by="amplitude_id"))[0]
    fake.add_users(["registered@corp.example"])

    async def upload(id_type: str, ids: list[str]) -> dict[str, object]:
        response = await http.post("/api/3/cohorts/upload", json={
            "name": "n", "app_id": 1, "id_type": id_type, "ids": ids,
            "owner": "o@example.com", "published": True})
        body: dict[str, object] = response.json()
        return body

    body = await upload("BY_USER_ID", [*known, "registered@corp.example",
                                       "user-0@corp.example,0", "stranger@corp.example"])
    assert body["metadata"] == {"matched": 3, "totals": 5, "invalid_ids_sample": []}
    assert fake.member_ids(str(body["cohortId"])) == {*known, "registered@corp.example"}
    body = await upload("BY_AMP_ID", [known_amplitude_id, "user-0@corp.example,0"])
    assert body["metadata"] == {"matched": 1, "totals": 2,
                                "invalid_ids_sample": ["user-0@corp.example,0"]}
    response = await http.post("/api/3/cohorts/membership", json={
        "cohort_id": body["cohortId"], "memberships": [
            {"ids": [known[0], "stranger@corp.example"], "id_type": "BY_NAME",
             "operation": "ADD"}]})
    assert response.json()["memberships_result"][0]["skipped_ids"] == ["stranger@corp.example"]
    touched_out = sorted(fake.member_ids("small"))[0]
    fake.touch("small", churn=1.0)  # everyone leaves the cohort, and stays a known user
    assert touched_out not in fake.member_ids("small")
    body = await upload("BY_USER_ID", [touched_out])
    assert body["metadata"] == {"matched": 1, "totals": 1, "invalid_ids_sample": []}
