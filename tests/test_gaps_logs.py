"""Logs and results where the other tests left a one-line break unnoticed: the redaction
the formatter itself applies (to a traceback, a message and a field it did not build), a
resumed batch's closing counts, and waits of one reason added up in a result (a retry's
told once)."""

from __future__ import annotations

import io
import json
import logging
import pathlib
from collections.abc import Iterator

import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async._logs import TOLD_WAIT, JsonFormatter, log_to_stream
from amp_cohorts_async.testing import FakeAmplitude

SIGNED = ("https://hooks.example.test/progress?X-Amz-Credential=AKIDEXAMPLE%2Fcred"
          "&X-Amz-Signature=5ec0ndc0ffee5ec0ndc0ffee")
SECRETS = ("AKIDEXAMPLE", "5ec0ndc0ffee5ec0ndc0ffee")


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logger = logging.getLogger("amp_cohorts_async")
    handler = log_to_stream(logging.INFO, stream, as_json=True)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


@pytest.mark.looptime
async def test_a_progress_callback_error_is_logged_with_its_traceback_redacted(
    client: amp.CohortsClient, tmp_path: pathlib.Path, json_lines: io.StringIO,
) -> None:
    """The user's callback failed with a signed URL in its text (its own webhook, say): the
    download goes on, and the JSON line tells the error without the signature."""

    def on_progress(event: amp.ProgressEvent) -> None:
        if event.phase == "done":
            raise RuntimeError(f"posting progress to {SIGNED} failed")

    result = await client.download_cohort("small", tmp_path, on_progress=on_progress)

    assert result.path.exists()
    objects = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    (raised,) = [o for o in objects if "on_progress callback raised" in o["message"]]
    assert "RuntimeError: posting progress to https://hooks.example.test/progress?[redacted]" \
        in raised["exception"]
    for secret in SECRETS:
        assert secret not in json_lines.getvalue()


def test_the_formatter_redacts_a_message_and_a_field_it_did_not_build() -> None:
    """Defence in depth: a record whose message or an object field carries a signed URL
    (the library's own lines redact at the source) still leaves none on the line."""
    record = logging.LogRecord("amp_cohorts_async", logging.INFO, __file__, 1,
                               "fetching %s", (SIGNED,), None)
    record.target = httpx.URL(SIGNED)  # an object: shown by its text
    record.waited = {"limits": 1.5}  # a mapping of plain values: kept as it is

    line = json.loads(JsonFormatter().format(record))

    assert line["message"] == "fetching https://hooks.example.test/progress?[redacted]"
    assert line["target"] == "https://hooks.example.test/progress?[redacted]"
    assert line["waited"] == {"limits": 1.5}
    for secret in SECRETS:
        assert secret not in json.dumps(line)


@pytest.mark.looptime
async def test_a_resumed_batch_counts_kept_downloaded_and_failed_apart(
    client: amp.CohortsClient, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture,
) -> None:
    await client.download_cohorts(["small"], tmp_path)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="amp_cohorts_async")

    outcomes = await client.download_cohorts(["small", "large", "nope"], tmp_path, resume=True)

    assert [o.ok for o in outcomes] == [True, True, False]
    (batch,) = [r for r in caplog.records if getattr(r, "event", None) == "batch"]
    assert (batch.cohorts, batch.downloaded, batch.kept, batch.failed) == (3, 1, 1, 1)
    assert batch.getMessage() == (
        "batch of 3 cohorts: 1 downloaded, 1 kept from an earlier run, 1 failed")


@pytest.mark.looptime
async def test_a_result_adds_up_every_wait_of_one_reason(
    client: amp.CohortsClient, fake: FakeAmplitude, tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="amp_cohorts_async")  # short waits are told there
    fake.inject("s3", "status", status=500, times=2)  # two backoffs before the file comes

    result = await client.download_cohort("large", tmp_path)

    delays = [r.retry_in for r in caplog.records if getattr(r, "event", None) == "retried"]
    assert len(delays) == 2
    assert max(delays) >= TOLD_WAIT  # long enough to be told: by its "retried" line only
    assert not [r for r in caplog.records if getattr(r, "event", None) == "waited"
                and r.wait_reason == "retry"]
    assert result.retries == 2
    # Virtual time: each backoff holds exactly its delay; the result holds their sum.
    assert result.waited["retry"] == pytest.approx(sum(delays), abs=0.002)
