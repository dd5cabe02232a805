"""Every edge a named error: bad arguments, hostile answers, corrupt journals, bad command lines.

Each case asserts the exception class (an ``AmplitudeError``, never a raw Python or httpx one),
that an invalid argument sent nothing, and that the destination directory is unchanged.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.cli import main
from amp_cohorts_async.testing import FakeAmplitude

CSV = b'"amplitude_id","user_id"\n"1","a"\n'
DEEP = b"[" * 100_000 + b"]" * 100_000


def snapshot(directory: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*")}


UPLOAD = {"name": "n", "app_id": 1, "id_type": "BY_USER_ID", "ids": ["a"], "owner": "o@x.io",
          "published": False}
CHANGE = amp.MembershipChange(ids=["a"], id_type="BY_NAME", operation="ADD")

Call = Callable[[amp.CohortsClient, pathlib.Path], Awaitable[object]]

# -- arguments of every coroutine: InvalidRequestError, nothing sent --------------------------
ARGUMENT_CASES: list[tuple[str, Call]] = [
    ("list sync flag", lambda c, d: c.list_cohorts(include_sync_info="yes")),  # type: ignore[arg-type]
    ("request empty id", lambda c, d: c.request_cohort("")),
    ("request blank id", lambda c, d: c.request_cohort("   ")),
    ("request 100k id", lambda c, d: c.request_cohort("x" * 100_000)),
    ("request dot-dot id", lambda c, d: c.request_cohort("..")),
    ("request None id", lambda c, d: c.request_cohort(None)),  # type: ignore[arg-type]
    ("request newline id", lambda c, d: c.request_cohort("a\nb")),
    ("request props text", lambda c, d: c.request_cohort("c", props="1")),  # type: ignore[arg-type]
    ("request keys as text", lambda c, d: c.request_cohort("c", props=True, prop_keys="city")),
    ("request keys without props", lambda c, d: c.request_cohort("c", prop_keys=["city"])),
    ("status empty id", lambda c, d: c.get_request_status("")),
    ("status int id", lambda c, d: c.get_request_status(123)),  # type: ignore[arg-type]
    ("file into a directory", lambda c, d: c.download_file("r", d)),
    ("file empty dest", lambda c, d: c.download_file("r", "")),
    ("file missing parent", lambda c, d: c.download_file("r", d / "missing" / "x.csv")),
    ("file dest int", lambda c, d: c.download_file("r", 42)),  # type: ignore[arg-type]
    ("file NUL in dest", lambda c, d: c.download_file("r", str(d / "a\x00b"))),
    ("cohort empty id", lambda c, d: c.download_cohort("", d)),
    ("cohort uncreatable dir/", lambda c, d: c.download_cohort("c", "/proc/no-such/dir/")),
    ("cohort callback int", lambda c, d: c.download_cohort("c", d, on_progress=5)),  # type: ignore[arg-type]
    ("batch None", lambda c, d: c.download_cohorts(None, d)),  # type: ignore[arg-type]
    ("batch one string", lambda c, d: c.download_cohorts("abc", d)),
    ("batch None id", lambda c, d: c.download_cohorts([None], d)),  # type: ignore[list-item]
    ("batch uncreatable dir", lambda c, d: c.download_cohorts(["c"], "/proc/no-such/dir")),
    ("batch dir int", lambda c, d: c.download_cohorts(["c"], 3)),  # type: ignore[arg-type]
    ("batch resume text", lambda c, d: c.download_cohorts(["c"], d, resume="no")),  # type: ignore[arg-type]
    ("batch props int", lambda c, d: c.download_cohorts(["c"], d, props=1)),  # type: ignore[arg-type]
    ("upload empty name", lambda c, d: c.upload_cohort(**{**UPLOAD, "name": ""})),
    ("upload app id 0", lambda c, d: c.upload_cohort(**{**UPLOAD, "app_id": 0})),
    ("upload app id bool", lambda c, d: c.upload_cohort(**{**UPLOAD, "app_id": True})),
    ("upload id type", lambda c, d: c.upload_cohort(**{**UPLOAD, "id_type": "BY_EMAIL"})),
    ("upload ids text", lambda c, d: c.upload_cohort(**{**UPLOAD, "ids": "abc"})),
    ("upload no ids", lambda c, d: c.upload_cohort(**{**UPLOAD, "ids": []})),
    ("upload int ids", lambda c, d: c.upload_cohort(**{**UPLOAD, "ids": [1, 2]})),
    ("upload blank id", lambda c, d: c.upload_cohort(**{**UPLOAD, "ids": ["a", " "]})),
    ("upload published text", lambda c, d: c.upload_cohort(**{**UPLOAD, "published": "yes"})),
    ("upload owner None", lambda c, d: c.upload_cohort(**{**UPLOAD, "owner": None})),
    ("membership empty cohort", lambda c, d: c.update_membership("", [CHANGE])),
    ("membership no changes", lambda c, d: c.update_membership("c", [])),
    ("membership text changes", lambda c, d: c.update_membership("c", "ADD")),  # type: ignore[arg-type]
    ("membership object change", lambda c, d: c.update_membership("c", [object()])),  # type: ignore[list-item]
]


async def _iterate(path: Any) -> None:
    async for _row in amp.iter_members(path):
        pass


READER_CASES: list[tuple[str, Callable[[pathlib.Path], Awaitable[None]], type[Exception]]] = [
    ("members of a directory", lambda d: _iterate(d), amp.InvalidRequestError),
    ("members of None", lambda d: _iterate(None), amp.InvalidRequestError),
    ("members of a missing file", lambda d: _iterate(d / "missing.csv"), amp.InvalidRequestError),
]


@pytest.fixture
def fake() -> Iterator[FakeAmplitude]:
    with FakeAmplitude() as fake:
        fake.add_cohort("c", size=5)
        yield fake


@pytest.mark.parametrize(("name", "call"), ARGUMENT_CASES, ids=[c[0] for c in ARGUMENT_CASES])
async def test_bad_arguments_raise_before_anything_is_sent(
    fake: FakeAmplitude, tmp_path: pathlib.Path, name: str, call: Call
) -> None:
    before = snapshot(tmp_path)
    async with amp.CohortsClient(fake.api_key, fake.secret_key,
                                 transport=fake.transport()) as client:
        with pytest.raises(amp.InvalidRequestError):
            await call(client, tmp_path)
    assert fake.log == []
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("name", "call", "error"), READER_CASES, ids=[c[0] for c in READER_CASES])
async def test_bad_reader_arguments(
    tmp_path: pathlib.Path, name: str, call: Callable[[pathlib.Path], Awaitable[None]],
    error: type[Exception],
) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(error):
        await call(tmp_path)
    assert snapshot(tmp_path) == before


def _truncated_gzip() -> bytes:
    data = gzip.compress(CSV + b"".join(b'"%d","u"\n' % i for i in range(50_000)))
    return data[: len(data) // 2]


@pytest.mark.parametrize(("content", "error"), [
    (b'"a","b"\n"\xff\xfe","x"\n', amp.ResponseValidationError),  # not UTF-8
    (_truncated_gzip(), amp.ResponseValidationError),  # EOFError deep into the file
    (b"\x1f\x8bnot gzip at all", amp.ResponseValidationError),
], ids=["invalid utf-8", "truncated gzip", "corrupt gzip"])
async def test_unreadable_files_are_named_errors(
    tmp_path: pathlib.Path, content: bytes, error: type[Exception]
) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(error):
        await _iterate(path)


# -- the constructor and the configuration values ---------------------------------------------
CONSTRUCTION_CASES: list[tuple[str, Callable[[], object]]] = [
    ("unknown region", lambda: amp.CohortsClient("k", "s", region="asia")),
    ("region None", lambda: amp.CohortsClient("k", "s", region=None)),  # type: ignore[arg-type]
    ("port out of range", lambda: amp.CohortsClient("k", "s", base_url="https://h:99999")),
    ("ftp base url", lambda: amp.CohortsClient("k", "s", base_url="ftp://x")),
    ("plain http remote", lambda: amp.CohortsClient("k", "s", base_url="http://10.0.0.1")),
    ("base url int", lambda: amp.CohortsClient("k", "s", base_url=5)),  # type: ignore[arg-type]
    ("empty api key", lambda: amp.CohortsClient("", "s")),
    ("int api key", lambda: amp.CohortsClient(5, "s")),  # type: ignore[arg-type]
    ("limits text", lambda: amp.CohortsClient("k", "s", limits="x")),  # type: ignore[arg-type]
    ("retry text", lambda: amp.CohortsClient("k", "s", retry="x")),  # type: ignore[arg-type]
    ("transport text", lambda: amp.CohortsClient("k", "s", transport="x")),  # type: ignore[arg-type]
    ("http client object", lambda: amp.CohortsClient("k", "s", http_client=object())),  # type: ignore[arg-type]
    ("client and transport", lambda: amp.CohortsClient(
        "k", "s", http_client=httpx.AsyncClient(), transport=httpx.MockTransport(lambda r: None))),
    ("seed text", lambda: amp.CohortsClient("k", "s", seed="x")),  # type: ignore[arg-type]
    ("wall clock int", lambda: amp.CohortsClient("k", "s", wall_clock=5)),  # type: ignore[arg-type]
    ("download text", lambda: amp.CohortsClient("k", "s", download="x")),  # type: ignore[arg-type]
    ("window of infinite length", lambda: amp.RateWindow(1, math.inf)),
    ("window of NaN length", lambda: amp.RateWindow(1, math.nan)),
    ("retry-after cap text", lambda: amp.RetryPolicy(max_retry_after="5")),  # type: ignore[arg-type]
    ("jitter of 1", lambda: amp.PollPolicy(jitter=1)),
    ("hosts as one string", lambda: amp.DownloadPolicy(extra_hosts="x.com")),  # type: ignore[arg-type]
    ("not a host", lambda: amp.DownloadPolicy(extra_hosts=["not a host"])),
    ("gzip ratio 0", lambda: amp.DownloadPolicy(max_gzip_ratio=0)),
    ("count_members a string", lambda: amp.DownloadPolicy(count_members="yes")),  # type: ignore[arg-type]
    ("count_members 1", lambda: amp.DownloadPolicy(count_members=1)),  # type: ignore[arg-type]
    ("no concurrency", lambda: amp.Limits(max_concurrent_requests=0)),
    ("membership ids None", lambda: amp.MembershipChange(ids=None, id_type="BY_ID",  # type: ignore[arg-type]
                                                         operation="ADD")),
    ("membership id type", lambda: amp.MembershipChange(ids=["a"], id_type="X", operation="ADD")),
    ("membership operation", lambda: amp.MembershipChange(ids=["a"], id_type="BY_ID",
                                                          operation="MERGE")),
]


@pytest.mark.parametrize(("name", "build"), CONSTRUCTION_CASES,
                         ids=[c[0] for c in CONSTRUCTION_CASES])
def test_values_that_cannot_work_are_refused_at_construction(
    name: str, build: Callable[[], object]
) -> None:
    with pytest.raises(amp.InvalidRequestError):
        build()


# -- hostile answers: named errors, nothing written ----------------------------------------------
def _gzip_bomb() -> bytes:
    return gzip.compress(CSV + b"0" * (24 << 20), compresslevel=9)


Answer = tuple[int, dict[str, str], bytes]
HOSTILE_ANSWERS: list[tuple[str, str, Answer, type[Exception]]] = [
    ("list nested 100k deep", "list", (200, {}, DEEP), amp.ResponseValidationError),
    ("error body nested 100k deep", "list", (500, {}, DEEP), amp.ServerError),
    ("list of the wrong shape", "list", (200, {}, b'{"cohorts": "x"}'),
     amp.ResponseValidationError),
    ("list as an array", "list", (200, {}, b"[]"), amp.ResponseValidationError),
    ("list not JSON", "list", (200, {}, b"<html>"), amp.ResponseValidationError),
    ("usage of the wrong type", "usage", (200, {}, b'{"limit": "x"}'),
     amp.ResponseValidationError),
    ("redirect without Location", "file", (302, {}, b""), amp.DownloadError),
    ("redirect to javascript:", "file", (302, {"Location": "javascript:alert(1)"}, b""),
     amp.DownloadError),
    ("redirect 100k long", "file",
     (302, {"Location": "https://b.s3.amazonaws.com/" + "x" * 100_000}, b""), amp.DownloadError),
    ("redirect to metadata", "file",
     (302, {"Location": "https://169.254.169.254/latest/meta-data"}, b""), amp.DownloadError),
    ("redirect to a private address", "file", (302, {"Location": "https://10.0.0.7/x"}, b""),
     amp.DownloadError),
    ("redirect to loopback", "file", (302, {"Location": "http://127.0.0.1:9/x"}, b""),
     amp.DownloadError),
    ("redirect over plain http", "file",
     (302, {"Location": "http://bucket.s3.amazonaws.com/x"}, b""), amp.DownloadError),
    ("redirect to ftp", "file", (302, {"Location": "ftp://bucket.s3.amazonaws.com/x"}, b""),
     amp.DownloadError),
    ("redirect to another host", "file", (302, {"Location": "https://evil.example/x"}, b""),
     amp.DownloadError),
    ("redirect to a look-alike", "file",
     (302, {"Location": "https://s3.amazonaws.com.evil.example/x"}, b""), amp.DownloadError),
    ("redirect to a suffix look-alike", "file",
     (302, {"Location": "https://evilamazonaws.com/x"}, b""), amp.DownloadError),
    ("redirect with credentials", "file",
     (302, {"Location": "https://u:p@bucket.s3.amazonaws.com/x"}, b""), amp.DownloadError),
    ("an html page", "file", (200, {"Content-Type": "text/html"}, b"<html>login</html>"),
     amp.DownloadError),
    ("a CSV-looking body served as html", "file", (200, {"Content-Type": "text/html"}, CSV),
     amp.DownloadError),
    ("html without a type", "file", (200, {}, b"<!doctype html><html>\n"), amp.DownloadError),
    ("a JSON document", "file", (200, {}, b'{"error": "nope"}\n'), amp.DownloadError),
    ("an empty body", "file", (200, {}, b""), amp.DownloadError),
    ("a gzip bomb", "file", (200, {"Content-Encoding": "gzip"}, _gzip_bomb()), amp.DownloadError),
    ("corrupt gzip", "file", (200, {"Content-Encoding": "gzip"}, b"\x1f\x8b" + b"x" * 64),
     amp.DownloadError),
    ("unknown encoding", "file", (200, {"Content-Encoding": "br"}, CSV), amp.DownloadError),
    ("206 without Content-Range", "file", (206, {}, CSV), amp.DownloadError),
    # A 2xx upload answer that cannot be read: Amplitude acted, so the cohort list is read to
    # find what it made; here the list answers {} too, so whether a cohort exists is unknown.
    ("upload answer of the wrong shape", "upload", (200, {}, b"{}"), amp.UncertainUploadError),
    ("membership answer of the wrong shape", "membership",
     (200, {}, b'{"cohort_id": "c", "memberships_result": "no"}'), amp.ResponseValidationError),
]

CALL_FOR: dict[str, Call] = {
    "list": lambda c, d: c.list_cohorts(),
    "usage": lambda c, d: c.get_usage(),
    "file": lambda c, d: c.download_file("r1", d / "out.csv"),
    "upload": lambda c, d: c.upload_cohort(**UPLOAD),
    "membership": lambda c, d: c.update_membership("c", [CHANGE]),
}


@pytest.mark.parametrize(("name", "endpoint", "answer", "error"), HOSTILE_ANSWERS,
                         ids=[c[0] for c in HOSTILE_ANSWERS])
async def test_hostile_answers_are_named_errors_and_write_nothing(
    tmp_path: pathlib.Path, name: str, endpoint: str, answer: Answer, error: type[Exception]
) -> None:
    status, headers, body = answer
    other_hosts: list[str] = []

    def respond(request: httpx.Request) -> httpx.Response:
        if request.url.host != "amplitude.com":
            other_hosts.append(request.url.host)  # a redirect that should not be followed
            return httpx.Response(200, content=CSV)
        return httpx.Response(status, headers=headers, content=body)

    before = snapshot(tmp_path)
    async with amp.CohortsClient("k", "s", transport=httpx.MockTransport(respond),
                                 retry=amp.RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(error):
            await CALL_FOR[endpoint](client, tmp_path)
    assert other_hosts == []
    assert snapshot(tmp_path) == before


async def test_a_larger_ratio_lets_a_highly_compressible_export_through(
    tmp_path: pathlib.Path
) -> None:
    body = _gzip_bomb()

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=body)

    async with amp.CohortsClient("k", "s", transport=httpx.MockTransport(respond),
                                 download=amp.DownloadPolicy(max_gzip_ratio=5000)) as client:
        result = await client.download_file("r1", tmp_path / "out.csv")
    assert result.size_bytes == len(CSV) + (24 << 20)


@pytest.mark.parametrize(("location", "policy"), [
    ("https://exports.cdn.example.com/x.csv?sig=1", amp.DownloadPolicy(
        extra_hosts=["*.cdn.example.com"])),
    ("https://proxy.corp.example/x.csv", amp.DownloadPolicy(extra_hosts=["proxy.corp.example"])),
    ("https://10.1.2.3/x.csv", amp.DownloadPolicy(extra_hosts=["10.1.2.3"])),
    ("https://bucket.s3.us-west-2.amazonaws.com/x.csv?X-Amz-Signature=s", amp.DownloadPolicy()),
])
async def test_allowed_download_hosts_are_followed(
    tmp_path: pathlib.Path, location: str, policy: amp.DownloadPolicy
) -> None:
    seen: list[str] = []

    def respond(request: httpx.Request) -> httpx.Response:
        if request.url.host == "amplitude.com":
            return httpx.Response(302, headers={"Location": location})
        seen.append(str(request.url))
        return httpx.Response(200, content=CSV)

    async with amp.CohortsClient("k", "s", transport=httpx.MockTransport(respond),
                                 download=policy) as client:
        await client.download_file("r1", tmp_path / "out.csv")
    assert seen == [location]
    assert (tmp_path / "out.csv").read_bytes() == CSV


# -- the command line: one line, a documented exit code ------------------------------------------
def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    err = capsys.readouterr().err
    return int(caught.value.code or 0), err


@pytest.mark.parametrize(("argv", "code"), [
    (["download", "c", "-o", "{file}"], 2),  # -o names an existing file
    (["download", "c", "-o", "{file}/under"], 2),  # a path under a file
    (["download", "c", "-o", "/proc/no-such-dir/out"], 2),  # cannot be created
    (["upload", "{latin1}", "--name", "n", "--owner", "o@x.io", "--app-id", "1"], 2),
    (["upload", "{missing}", "--name", "n", "--owner", "o@x.io", "--app-id", "1"], 2),
    (["list", "--base-url", "http://10.0.0.1"], 2),
    (["list", "--base-url", "https://h:99999"], 2),
    (["request", "x" * 100_000], 2),
    (["fetch", "r1", "-o", "{dir}"], 2),  # a directory where a file is needed
], ids=["existing file", "path under a file", "uncreatable", "not utf-8", "missing ids file",
        "plain http remote", "bad port", "over-long id", "fetch into a directory"])
def test_bad_command_lines_fail_in_one_line(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    argv: list[str], code: int,
) -> None:
    monkeypatch.setenv("AMPLITUDE_API_KEY", "k")
    monkeypatch.setenv("AMPLITUDE_SECRET_KEY", "s")
    (tmp_path / "file").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "dir").mkdir()
    names = {"file": tmp_path / "file", "latin1": tmp_path / "latin1.txt",
             "missing": tmp_path / "missing.txt", "dir": tmp_path / "dir"}
    before = snapshot(tmp_path)
    exit_code, err = _run_cli([arg.format(**names) for arg in argv], capsys)
    assert exit_code == code
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


# -- the resume journal: input, not truth ---------------------------------------------------------
JOURNAL = ".amp-cohorts-journal.json"


def _entry(**fields: Any) -> dict[str, Any]:
    return {"cohort_id": "c", "request_id": "r", "requested_at": "2999-01-01T00:00:00+00:00",
            "file": None, "size_bytes": None, "sha256": None, **fields}


@pytest.mark.parametrize("content", [
    b"not json",
    b"[]",
    DEEP,
    json.dumps({"version": 2, "entries": {}}).encode(),
    json.dumps({"version": 1, "entries": []}).encode(),
    json.dumps({"version": 1, "entries": {"c": _entry(sha256="xyz")}}).encode(),
    json.dumps({"version": 1, "entries": {"c": _entry(file="../../etc/passwd")}}).encode(),
    json.dumps({"version": 1, "entries": {"c": _entry(size_bytes=-1)}}).encode(),
    json.dumps({"version": 1, "entries": {"c": _entry(requested_at="2026-01-01T00:00:00")}}
               ).encode(),
    json.dumps({"version": 1, "entries": {"c": _entry(request_id=7)}}).encode(),
    json.dumps({"version": 1, "entries": {"c": _entry(extra=1)}}).encode(),
    b"\xff\xfe",
], ids=["not json", "array", "nested 100k", "version 2", "entries array", "bad sha256",
        "file outside", "negative size", "naive time", "int request id", "unknown field",
        "not utf-8"])
async def test_an_invalid_journal_is_set_aside_and_the_batch_runs(
    fake: FakeAmplitude, tmp_path: pathlib.Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / JOURNAL).write_bytes(content)
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 poll=amp.PollPolicy(initial_interval=0.01)) as client:
        (outcome,) = await client.download_cohorts(["c"], tmp_path, resume=True)
    assert outcome.ok
    assert fake.cohort_requests == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(JOURNAL + ".invalid-")]
    assert "ignoring the resume journal" in caplog.text


async def test_a_journal_linked_elsewhere_is_neither_read_nor_written_through(
    fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"version": 1, "entries": {}}))
    batch = tmp_path / "batch"
    batch.mkdir()
    os.symlink(outside, batch / JOURNAL)
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 poll=amp.PollPolicy(initial_interval=0.01)) as client:
        (outcome,) = await client.download_cohorts(["c"], batch, resume=True)
    assert outcome.ok
    assert outside.read_text() == json.dumps({"version": 1, "entries": {}})
    assert not (batch / JOURNAL).is_symlink()
    assert json.loads((batch / JOURNAL).read_text())["entries"]["c"]["sha256"]


async def test_a_linked_journal_is_not_trusted_even_when_it_is_valid(
    fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    # Followed, the link would say "c is finished" (its file and checksum match): no request,
    # the planted file kept. Refused (O_NOFOLLOW), the batch exports c afresh.
    batch = tmp_path / "batch"
    batch.mkdir()
    planted = b'"amplitude_id","user_id"\n"666","planted"\n'
    (batch / "c.csv").write_bytes(planted)
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"version": 1, "entries": {"c": _entry(
        request_id="r-planted", requested_at=datetime.now(UTC).isoformat(), file="c.csv",
        size_bytes=len(planted), sha256=hashlib.sha256(planted).hexdigest())}}))
    os.symlink(outside, batch / JOURNAL)
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 poll=amp.PollPolicy(initial_interval=0.01)) as client:
        (outcome,) = await client.download_cohorts(["c"], batch, resume=True)
    assert outcome.result is not None
    assert outcome.result.request_id != "r-planted"
    assert fake.cohort_requests == 1
    members = {row["amplitude_id"] async for row in amp.iter_members(batch / "c.csv")}
    assert members == fake.member_ids("c", by="amplitude_id")


async def test_a_journal_entry_naming_another_cohorts_request_is_not_trusted(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeAmplitude() as fake:
        fake.add_cohort("c1", size=5)
        fake.add_cohort("c2", size=7)
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     poll=amp.PollPolicy(initial_interval=0.01)) as client:
            other = tmp_path / "other"
            other.mkdir()
            (c2,) = await client.download_cohorts(["c2"], other)
            assert c2.result is not None
            # A planted entry: c1's line holds c2's (valid, fresh) request id.
            entry = _entry(cohort_id="c1", request_id=c2.result.request_id,
                           requested_at=datetime.now(UTC).isoformat())
            (tmp_path / JOURNAL).write_text(json.dumps({"version": 1, "entries": {"c1": entry}}))
            (c1,) = await client.download_cohorts(["c1"], tmp_path, resume=True)
        assert c1.result is not None
        assert c1.result.request_id != c2.result.request_id
        members = {row["amplitude_id"] async for row in amp.iter_members(c1.result.path)}
        assert members == fake.member_ids("c1", by="amplitude_id")
        assert fake.cohort_requests == 2  # c2's, then a fresh one for c1
        assert "not reusing request" in caplog.text


async def test_a_status_naming_another_cohort_is_refused(tmp_path: pathlib.Path) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        if "request-status" in request.url.path:
            return httpx.Response(200, json={"request_id": "r1", "cohort_id": "c2",
                                             "async_status": "JOB COMPLETED"})
        if request.url.path.endswith("/file"):
            return httpx.Response(200, content=CSV)
        return httpx.Response(202, json={"request_id": "r1", "cohort_id": "c1"})

    async with amp.CohortsClient("k", "s", transport=httpx.MockTransport(respond),
                                 poll=amp.PollPolicy(initial_interval=0.01)) as client:
        with pytest.raises(amp.CohortJobError, match="cohort 'c2'"):
            await client.download_cohort("c1", tmp_path)
    assert snapshot(tmp_path) == {}
