"""What an operator reads: one INFO line per lifecycle event with its values as fields, wire
detail at DEBUG, httpx's lines of the library's requests kept out unless asked for, no secret
anywhere; and results that say what each export went through."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import textwrap

import anyio
import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async._logs import JsonFormatter
from amp_cohorts_async.testing import FakeAmplitude

from .conftest import FAST_POLL
from .test_secrets import _secrets

LOGGER = "amp_cohorts_async"


def events(caplog: pytest.LogCaptureFixture, cohort_id: str | None = None
           ) -> list[logging.LogRecord]:
    """The lifecycle records (those with an ``event`` field), of one cohort if given."""
    return [r for r in caplog.records if r.name == LOGGER and hasattr(r, "event")
            and r.event != "http"
            and (cohort_id is None or getattr(r, "cohort_id", None) == cohort_id)]


def named(records: list[logging.LogRecord], event: str) -> list[logging.LogRecord]:
    return [r for r in records if r.event == event]


@pytest.mark.looptime
async def test_a_download_through_the_302_tells_its_lifecycle(
    client: amp.CohortsClient, fake: FakeAmplitude, tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    result = await client.download_cohort("large", tmp_path)
    assert fake.requests_to("s3"), "the file came through the presigned redirect"
    lines = events(caplog, "large")
    assert [r.event for r in lines] == ["requested", "ready", "downloaded"]
    assert all(r.levelno == logging.INFO for r in lines)
    requested, ready, downloaded = lines
    assert requested.request_id == result.request_id
    assert result.request_id in requested.getMessage()
    assert ready.request_id == result.request_id
    assert ready.seconds >= 10.0  # the emulator's job takes 10 s (virtual time)
    assert ready.polls >= 1
    assert downloaded.bytes == result.size_bytes == len(result.path.read_bytes())
    assert downloaded.seconds >= 0.0
    assert downloaded.path == str(result.path)
    assert f"{result.size_bytes} bytes" in downloaded.getMessage()
    # What the result says it went through: the request, each poll, the file; no retry.
    assert result.attempts == downloaded.attempts == 2 + ready.polls
    assert result.retries == downloaded.retries == 0
    assert downloaded.waited == dict(result.waited)


@pytest.mark.looptime
async def test_a_retried_429_is_told_and_counted(
    client: amp.CohortsClient, fake: FakeAmplitude, tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake.inject("request", "status", status=429, retry_after=30)
    result = await client.download_cohort("small", tmp_path)
    lines = events(caplog, "small")
    assert [r.event for r in lines] == ["retried", "waited", "requested", "ready",
                                        "downloaded"]
    retried, waited = lines[:2]
    assert retried.attempt == 1
    assert retried.status_code == 429
    assert retried.error_type == "RateLimitError"
    assert retried.retry_in == 30
    assert retried.request_id is None  # the request that would have made one was refused
    assert waited.wait_reason == "amplitude"
    assert 30 <= waited.seconds <= 34  # Retry-After, plus the restart spread (<= 1 s)
    assert result.retries == 1
    assert result.waited["amplitude"] == pytest.approx(waited.seconds, abs=1e-3)
    assert lines[-1].retries == 1


@pytest.mark.looptime
async def test_waits_for_the_limits_and_retry_backoff_have_their_reasons(
    fake: FakeAmplitude, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake.add_cohort("third", size=10)
    limits = amp.Limits(cohort_requests=(amp.RateWindow(1, 60.0),))
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 poll=FAST_POLL, limits=limits, seed=3) as client:
        outcomes = await client.download_cohorts(["small", "third"], tmp_path)
        fake.inject("file", "status", status=503)
        retried = await client.download_file(outcomes[0].result.request_id,  # type: ignore[union-attr]
                                             tmp_path / "again.csv")
    results = [o.result for o in outcomes]
    assert None not in results
    # One request a minute: whichever went second waited about a minute for the window.
    second = max(results, key=lambda r: r.waited.get("limits", 0.0))  # type: ignore[union-attr]
    assert second is not None
    assert second.waited["limits"] >= 50
    told = [r for r in named(events(caplog, second.cohort_id), "waited")
            if r.wait_reason == "limits"]
    assert told
    assert sum(r.seconds for r in told) == pytest.approx(second.waited["limits"],
                                                                  abs=1e-2)
    # A backoff before a retry is counted as "retry"; its line is the "retried" one.
    assert retried.retries == 1
    assert retried.waited["retry"] > 0
    assert not [r for r in named(events(caplog), "waited") if r.wait_reason == "retry"]
    assert [r.status_code for r in named(events(caplog), "retried")] == [503]


@pytest.mark.looptime
async def test_a_failed_cohort_says_its_error_type_and_what_it_went_through(
    fake: FakeAmplitude, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake.inject("s3", "status", status=500, times=2)  # only "large" goes through S3
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 poll=FAST_POLL, retry=amp.RetryPolicy(max_attempts=2),
                                 seed=3) as client:
        report = await client.sync_cohorts(["small", "large"], tmp_path)
    entries = {e.cohort_id: e for e in report.entries}
    failed = [entries["large"]]
    downloaded = [entries["small"]]
    assert (failed[0].action, downloaded[0].action) == ("failed", "downloaded")
    assert failed[0].retries == 1
    assert failed[0].waited["retry"] > 0
    assert failed[0].attempts >= 4  # request, a poll, the file twice
    assert downloaded[0].result is not None
    assert downloaded[0].attempts == downloaded[0].result.attempts >= 3
    (line,) = named(events(caplog, failed[0].cohort_id), "failed")
    assert line.error_type == "DownloadError"
    assert line.attempts == failed[0].attempts


@pytest.mark.looptime
async def test_a_batch_outcome_says_what_its_export_went_through_failed_or_not(
    fake: FakeAmplitude, tmp_path: pathlib.Path,
) -> None:
    fake.inject("s3", "status", status=500, times=2)  # only "large" goes through S3
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 poll=FAST_POLL, retry=amp.RetryPolicy(max_attempts=2),
                                 seed=3) as client:
        small, large = await client.download_cohorts(["small", "large"], tmp_path)
        again = await client.download_cohorts(["small"], tmp_path, resume=True)
    assert large.error is not None
    assert large.retries == 1
    assert large.waited["retry"] > 0
    assert large.attempts >= 4  # request, a poll, the file twice
    assert small.result is not None
    assert (small.attempts, small.retries, small.waited) == (
        small.result.attempts, small.result.retries, small.result.waited)
    assert small.attempts >= 3
    assert (again[0].attempts, again[0].retries, again[0].waited) == (0, 0, {})  # kept


@pytest.mark.looptime
async def test_a_sync_run_ends_with_one_line_and_names_what_needs_attention(
    client: amp.CohortsClient, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await client.sync_cohorts(["small", "large", "gone", "lost"], tmp_path, max_requests=1)
    skipped = {(r.cohort_id, r.action) for r in named(events(caplog), "skipped")}
    assert skipped == {("gone", "missing"), ("lost", "missing"), ("large", "over_budget")}
    (first,) = named(events(caplog), "synced")
    assert first.actions == {"downloaded": 1, "missing": 2, "over_budget": 1}
    assert first.requests_spent == 1
    assert first.quota_remaining == 499
    assert first.cohorts == 4
    caplog.clear()
    await client.sync_cohorts(["small"], tmp_path)
    (second,) = named(events(caplog), "synced")
    assert "sync of 1 cohorts: 1 unchanged; 0 cohort requests spent" in second.getMessage()
    assert [r.event for r in events(caplog)] == ["synced"]  # nothing else to tell


@pytest.mark.looptime
async def test_wire_detail_is_at_debug_and_has_no_query(
    client: amp.CohortsClient, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await client.download_cohort("small", tmp_path)
    assert not [r for r in caplog.records if getattr(r, "event", None) == "http"]
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    await client.download_cohort("large", tmp_path)
    wire = [r for r in caplog.records if getattr(r, "event", None) == "http"]
    assert {r.levelno for r in wire} == {logging.DEBUG}
    assert [r.status_code for r in wire if "/file" in r.url] == [302]
    (s3,) = [r for r in wire if "/file" not in r.url and "/api/" not in r.url]
    assert s3.status_code == 200
    assert all("?" not in r.url or r.url.endswith("?[redacted]") for r in wire)


@pytest.mark.looptime
async def test_httpx_lines_of_the_library_only_when_asked_for(
    client: amp.CohortsClient, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)  # the root at INFO, as basicConfig(level=INFO) sets it

    def own(request: httpx.Request) -> httpx.Response:
        return httpx.Response(204)

    async with httpx.AsyncClient(transport=httpx.MockTransport(own)) as theirs:
        await client.download_cohort("large", tmp_path)
        await theirs.get("https://example.test/own")
    httpx_lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert len(httpx_lines) == 1
    assert "example.test/own" in httpx_lines[0]
    caplog.clear()
    logging.getLogger("httpx").setLevel(logging.INFO)  # asking for them
    try:
        await client.download_cohort("large", tmp_path)
    finally:
        logging.getLogger("httpx").setLevel(logging.NOTSET)
    httpx_lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert any("/api/5/cohorts/request/large" in line for line in httpx_lines)
    assert any("X-Amz-Signature" not in line and "[redacted]" in line for line in httpx_lines)


def record_text(record: logging.LogRecord) -> str:
    """Everything a handler could show of ``record``: message, args, every field."""
    parts = [record.getMessage(), repr(record.args), JsonFormatter().format(record)]
    parts.extend(f"{key}={value!r}" for key, value in record.__dict__.items())
    return "\n".join(parts)


async def test_no_secret_in_any_record_its_args_or_fields(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="httpx")  # httpx's own lines asked for, too
    with FakeAmplitude(api_key="api-key-AAAA1111", secret_key="secret-key-BBBB2222",
                       inline_threshold=100) as fake:
        fake.add_cohort("big", size=500)
        fake.inject("request", "status", status=429, retry_after=0.01)
        fake.inject("s3", "status", status=403)  # an expired link: a fresh one from /file
        fake.inject("s3", "cut", after_bytes=200)  # a broken transfer, resumed
        async with fake.serve() as base_url:
            async with amp.CohortsClient(
                fake.api_key, fake.secret_key, base_url=base_url,
                poll=amp.PollPolicy(initial_interval=0.01),
                retry=amp.RetryPolicy(initial_delay=0.01),
            ) as client:
                result = await client.download_cohort("big", tmp_path)
        secrets = _secrets(fake)
    assert result.retries >= 3
    # Real time: every exchange spent a moment getting its permits; counted, not told.
    assert result.waited["limits"] > 0
    assert all(r.seconds >= 0.05 for r in caplog.records if getattr(r, "event", "") == "waited")
    signatures = [s for s in secrets if s not in (fake.api_key, fake.secret_key)]
    assert len(signatures) >= 4, "three links were handed out, each signed"
    names = {r.name for r in caplog.records}
    assert {"amp_cohorts_async", "httpx"} <= names
    assert {r.event for r in caplog.records if r.name == LOGGER and hasattr(r, "event")} >= {
        "requested", "ready", "downloaded", "retried", "http"}
    for record in caplog.records:
        text = record_text(record)
        for secret in secrets:
            assert secret not in text, f"{secret!r} in a {record.name} record"


SCRIPT = textwrap.dedent("""
    import logging, sys, tempfile
    import anyio
    import amp_cohorts_async as amp
    from amp_cohorts_async.testing import FakeAmplitude

    if sys.argv[1] == "configured":
        logging.getLogger("amp_cohorts_async").addHandler(logging.NullHandler())

    async def main() -> None:
        with FakeAmplitude() as fake, tempfile.TemporaryDirectory() as out:
            fake.add_cohort("abc", size=10)
            async with amp.CohortsClient(fake.api_key, fake.secret_key,
                                         transport=fake.transport(),
                                         poll=amp.PollPolicy(initial_interval=0.01)) as c:
                await c.download_cohort("abc", out)
                await c.download_cohort("abc", out)  # a second client would not add a handler
            async with amp.CohortsClient(fake.api_key, fake.secret_key,
                                         transport=fake.transport()) as again:
                await again.get_usage()

    anyio.run(main)
""")


async def run_script(mode: str, level: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "AMP_COHORTS_LOG"}
    if level is not None:
        env["AMP_COHORTS_LOG"] = level
    result = await anyio.run_process([sys.executable, "-c", SCRIPT, mode], env=env,
                                     check=True)
    return result.stderr.decode()


async def test_the_env_switch_sends_lines_to_stderr_without_code() -> None:
    async with anyio.create_task_group() as group:
        found: dict[str, str] = {}

        async def one(key: str, mode: str, level: str | None) -> None:
            found[key] = await run_script(mode, level)

        for key, mode, level in (("off", "plain", None), ("info", "plain", "info"),
                                 ("debug", "plain", "DEBUG"),
                                 ("configured", "configured", "info"),
                                 ("unknown", "plain", "verbose")):
            group.start_soon(one, key, mode, level)
    assert found["off"] == ""
    info = found["info"].splitlines()
    assert sum("cohort abc: export requested" in line for line in info) == 2  # once each
    assert sum("cohort abc: downloaded" in line for line in info) == 2
    assert all(" INFO amp_cohorts_async: " in line for line in info)
    assert "/api/3/cohorts/usage -> 200" not in found["info"]
    assert "DEBUG amp_cohorts_async: GET " in found["debug"]
    assert "/api/3/cohorts/usage -> 200" in found["debug"]
    assert found["configured"] == ""  # the user's logger: left as they set it
    assert found["unknown"].strip() == (
        "AMP_COHORTS_LOG='verbose' is not one of info, debug: ignored")  # said, not silent


async def test_cli_log_format_json(served: tuple[FakeAmplitude, str],
                                   tmp_path: pathlib.Path) -> None:
    fake, base_url = served
    fake.inject("status", "status", status=503)
    # The environment's own cache (this test's): the command line keeps its limits there.
    env = {**{k: v for k, v in os.environ.items() if k != "AMP_COHORTS_LOG"},
           "AMPLITUDE_API_KEY": fake.api_key, "AMPLITUDE_SECRET_KEY": fake.secret_key,
           "NO_COLOR": "1"}
    result = await anyio.run_process(
        [sys.executable, "-m", "amp_cohorts_async", "download", "small", "large", "-o",
         str(tmp_path), "--poll-interval", "0.05", "--base-url", base_url, "--log-format",
         "json"], env=env, check=False)
    assert result.returncode == 0, result.stderr.decode()
    objects = [json.loads(line) for line in result.stderr.decode().splitlines()]
    assert objects
    assert all(o["logger"] == "amp_cohorts_async" for o in objects)
    by_event = {(o["event"], o.get("cohort_id")): o for o in objects}
    for cohort in ("small", "large"):
        downloaded = by_event["downloaded", cohort]
        assert downloaded["bytes"] == (tmp_path / f"{cohort}.csv").stat().st_size
        assert downloaded["level"] == "info"
        assert by_event["requested", cohort]["request_id"] == downloaded["request_id"]
    assert [o["status_code"] for o in objects if o["event"] == "retried"] == [503]
    assert "small: done" in result.stdout.decode()  # the human output is unchanged...
    assert "\nheld: 1 retry\n" in result.stdout.decode()  # ...plus what held it
    plain = await anyio.run_process(
        [sys.executable, "-m", "amp_cohorts_async", "download", "small", "-o",
         str(tmp_path / "plain"), "--poll-interval", "0.05", "--base-url", base_url, "--json"],
        env=env, check=True)
    results = json.loads(plain.stdout)
    assert results[0]["result"]["attempts"] == results[0]["attempts"] >= 3
    assert results[0]["result"]["retries"] == results[0]["retries"] == 0
    # A sync at DEBUG: each exchange on stderr, what held it under the table.
    fake.inject("status", "status", status=429, retry_after=2)
    debug = await anyio.run_process(
        [sys.executable, "-m", "amp_cohorts_async", "sync", str(tmp_path / "sync"), "large",
         "--poll-interval", "0.05", "--base-url", base_url, "--log-format", "json"],
        env={**env, "AMP_COHORTS_LOG": "debug"}, check=True)
    assert "held: 2s in Amplitude's pause after a 429, 1 retry" in debug.stdout.decode()
    lines = [json.loads(line) for line in debug.stderr.decode().splitlines()]
    wire = [o for o in lines if o["event"] == "http"]
    assert {o["level"] for o in wire} == {"debug"}
    assert any(o["status_code"] == 302 and o["location"].endswith("?[redacted]") for o in wire)
    assert [o["actions"] for o in lines if o["event"] == "synced"] == [{"downloaded": 1}]
    assert len(_secrets(fake)) > 3  # the keys, the token, a presigned link's credentials
    for secret in _secrets(fake):
        assert secret not in debug.stderr.decode()


@pytest.mark.looptime
async def test_a_200_cohort_batch_logs_one_line_per_event(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)  # the root at INFO: httpx's lines would show here
    with FakeAmplitude(job_duration=(20.0, 120.0), seed=2) as fake:
        ids = [fake.add_cohort(f"c{n:03d}", size=50).id for n in range(200)]
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     seed=1) as client:
            outcomes = await client.download_cohorts(ids, tmp_path)
        requests = len(fake.log)
    assert all(o.ok for o in outcomes)
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    kinds = [getattr(r, "event", r.name) for r in lines]
    for event in ("requested", "ready", "downloaded"):
        assert kinds.count(event) == 200
    waits = kinds.count("waited")
    assert waits <= 200  # one wait for the rate windows per cohort at most
    (batch,) = [r for r in lines if getattr(r, "event", None) == "batch"]
    assert (batch.cohorts, batch.downloaded, batch.failed) == (200, 200, 0)
    assert len(lines) == 600 + waits + 1
    print(f"200 cohorts: {requests} requests, {len(lines)} INFO lines ({waits} waits)")
