"""What a resumed transfer or batch may conclude from the server's answers.

Two rules with one-line implementations that nothing else would notice breaking: a 416 to a
``Range`` that starts at the file's length completes the download (no restart, no third
request), and a request id taken from the journal is trusted only when the status names the
cohort (an answer without ``cohort_id`` is not enough).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest

import amp_cohorts_async as amp

CSV = b'"amplitude_id","user_id"\n' + b"".join(
    f'"{100 + i}","user-{i}"\n'.encode() for i in range(200))
S3 = "https://bucket.s3.amazonaws.com/export.csv?X-Amz-Signature=sig"


class _CutAfterTheLastByte(httpx.AsyncByteStream):
    """The whole body, then the connection drops before the response is seen to end."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body
        raise httpx.ReadError("connection reset by peer")


@pytest.mark.parametrize("leg", ["inline", "s3"])
async def test_416_after_the_last_byte_completes_the_download(
    tmp_path: pathlib.Path, leg: str
) -> None:
    ranges: list[str | None] = []

    def respond(request: httpx.Request) -> httpx.Response:
        if leg == "s3" and request.url.host == "amplitude.com":
            return httpx.Response(302, headers={"Location": S3})
        ranges.append(request.headers.get("range"))
        if "range" in request.headers:
            return httpx.Response(416, headers={"Content-Range": f"bytes */{len(CSV)}"})
        return httpx.Response(200, headers={"Content-Length": str(len(CSV)),
                                            "Content-Type": "text/csv"},
                              stream=_CutAfterTheLastByte(CSV))

    async with amp.CohortsClient("k", "s", transport=httpx.MockTransport(respond),
                                 retry=amp.RetryPolicy(initial_delay=0.001)) as client:
        result = await client.download_file("r1", tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_bytes() == CSV
    assert result.size_bytes == len(CSV)
    # The second request asked for what follows the last byte and was told there is nothing:
    # done. Starting over would have cost a third request of the whole file.
    assert ranges == [None, f"bytes={len(CSV)}-"]


async def test_416_naming_another_length_starts_over(tmp_path: pathlib.Path) -> None:
    ranges: list[str | None] = []

    def respond(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("range"))
        if len(ranges) == 1:
            return httpx.Response(200, headers={"Content-Length": str(len(CSV))},
                                  stream=_CutAfterTheLastByte(CSV))
        if "range" in request.headers:
            return httpx.Response(416, headers={"Content-Range": f"bytes */{len(CSV) + 9}"})
        return httpx.Response(200, content=CSV)

    async with amp.CohortsClient("k", "s", transport=httpx.MockTransport(respond),
                                 retry=amp.RetryPolicy(initial_delay=0.001)) as client:
        await client.download_file("r1", tmp_path / "out.csv")
    assert ranges == [None, f"bytes={len(CSV)}-", None]
    assert (tmp_path / "out.csv").read_bytes() == CSV


async def test_a_journal_request_is_not_reused_when_the_status_names_no_cohort(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The journal's r-old may be any cohort's export: without a cohort id in the status it
    cannot be told apart, so it is not fetched and one fresh export is paid for."""
    journal = {"version": 1, "entries": {"c1": {
        "cohort_id": "c1", "request_id": "r-old", "requested_at": datetime.now(UTC).isoformat(),
        "file": None, "size_bytes": None, "sha256": None, "members": None}}}
    (tmp_path / ".amp-cohorts-journal.json").write_text(json.dumps(journal))
    requested: list[str] = []
    fetched: list[str] = []

    def respond(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/3/cohorts":
            return httpx.Response(200, json={"cohorts": []})
        if "/request-status/" in path:  # no cohort_id in any status answer
            return httpx.Response(200, json={"request_id": path.rsplit("/", 1)[1],
                                             "async_status": "JOB COMPLETED"})
        if path.endswith("/file"):
            fetched.append(path.split("/")[-2])
            return httpx.Response(200, content=CSV)
        requested.append(path.rsplit("/", 1)[1])
        return httpx.Response(202, json={"request_id": "r-new", "cohort_id": "c1"})

    async with amp.CohortsClient("k", "s", transport=httpx.MockTransport(respond),
                                 limits=amp.Limits(monthly_quota=None),
                                 poll=amp.PollPolicy(initial_interval=0.01)) as client:
        (outcome,) = await client.download_cohorts(["c1"], tmp_path, resume=True)
    assert outcome.result is not None
    assert outcome.result.request_id == "r-new"
    assert requested == ["c1"]
    assert fetched == ["r-new"]
    assert "not reusing request r-old" in caplog.text


async def test_a_journal_behind_a_link_is_never_read(tmp_path: pathlib.Path) -> None:
    """A batch sets a linked journal aside before reading it; the read itself (also used to
    look before deciding, and racing a link planted after that check) must not follow one."""
    from amp_cohorts_async._store import JOURNAL_NAME, DirectoryStore

    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"version": 1, "entries": {"c1": {
        "cohort_id": "c1", "request_id": "r-planted",
        "requested_at": datetime.now(UTC).isoformat(), "file": None, "size_bytes": None,
        "sha256": None, "members": None}}}))
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / JOURNAL_NAME).symlink_to(outside)
    assert await DirectoryStore(batch).load(set_aside=False) == {}
    assert (batch / JOURNAL_NAME).is_symlink()  # a look changes nothing
