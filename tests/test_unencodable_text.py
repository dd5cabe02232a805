"""Text no request can carry (a byte that was not UTF-8, kept by Python as a lone surrogate).

It reaches the library from command-line arguments, environment variables and file names.
Everywhere it is an InvalidRequestError before anything is sent, naming the argument and not
echoing it (it may be a key); in a batch it fails that cohort only.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Awaitable, Callable

import anyio
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude

BAD = "a\udcffb"  # b"a\xffb" decoded with surrogateescape, as sys.argv and os.environ do
LONE = "a\ud800b"  # a lone surrogate from elsewhere (JSON's "\ud800", a slicing bug)
UPLOAD = {"name": "n", "app_id": 1, "id_type": "BY_USER_ID", "ids": ["a"], "owner": "o@x.io",
          "published": False}


def change(*ids: str) -> amp.MembershipChange:
    return amp.MembershipChange(ids=list(ids), id_type="BY_NAME", operation="ADD")


Call = Callable[[amp.CohortsClient, pathlib.Path], Awaitable[object]]
CASES: list[tuple[str, Call]] = [
    ("request id", lambda c, d: c.request_cohort(BAD)),
    ("request prop key", lambda c, d: c.request_cohort("small", props=True, prop_keys=["k", BAD])),
    ("status id", lambda c, d: c.get_request_status(BAD)),
    ("file request id", lambda c, d: c.download_file(BAD, d / "x.csv")),
    ("cohort id", lambda c, d: c.download_cohort(BAD, d)),
    ("cohort prop key", lambda c, d: c.download_cohort("small", d, props=True, prop_keys=[BAD])),
    ("batch prop key", lambda c, d: c.download_cohorts(["small"], d, props=True, prop_keys=[BAD])),
    ("upload name", lambda c, d: c.upload_cohort(**{**UPLOAD, "name": BAD})),
    ("upload owner", lambda c, d: c.upload_cohort(**{**UPLOAD, "owner": BAD})),
    ("upload id", lambda c, d: c.upload_cohort(**{**UPLOAD, "ids": ["x", "Zürich", BAD]})),
    ("upload lone surrogate", lambda c, d: c.upload_cohort(**{**UPLOAD, "ids": [LONE]})),
    ("upload group", lambda c, d: c.upload_cohort(**{**UPLOAD, "cg": BAD})),
    ("upload existing cohort", lambda c, d: c.upload_cohort(**{**UPLOAD,
                                                              "existing_cohort_id": BAD})),
    ("membership cohort", lambda c, d: c.update_membership(BAD, [change("a")])),
    ("membership id", lambda c, d: c.update_membership("small", [change("a"), change("b", BAD)])),
    ("membership group", lambda c, d: c.update_membership("small", [change("a")],
                                                          count_group=BAD)),
]


@pytest.mark.parametrize(("name", "call"), CASES, ids=[c[0] for c in CASES])
async def test_every_coroutine_refuses_it_before_sending(
    fake: FakeAmplitude, tmp_path: pathlib.Path, name: str, call: Call
) -> None:
    async with amp.CohortsClient(fake.api_key, fake.secret_key,
                                 transport=fake.transport()) as client:
        with pytest.raises(amp.InvalidRequestError, match="not valid text") as caught:
            await call(client, tmp_path)
    assert fake.log == []
    assert list(tmp_path.iterdir()) == []
    assert "\udcff" not in str(caught.value)


def test_the_message_names_the_place_and_the_byte() -> None:
    with pytest.raises(amp.InvalidRequestError) as caught:
        amp.CohortsClient("key", "s\udcffcret")
    assert str(caught.value) == ("secret_key is not valid text: character 2 is the byte 0xff, "
                                 "which is not UTF-8")


@pytest.mark.parametrize(("name", "kwargs"), [
    ("api key", {"api_key": BAD}),
    ("secret key", {"secret_key": "s" + LONE}),
    ("base url host", {"base_url": f"https://{BAD}.example.com"}),
    ("base url path", {"base_url": f"https://proxy.example.com/{BAD}/"}),
])
def test_the_constructor_refuses_it(name: str, kwargs: dict[str, str]) -> None:
    kwargs = {"api_key": "k", "secret_key": "s", **kwargs}
    with pytest.raises(amp.InvalidRequestError, match="not valid text"):
        amp.CohortsClient(**kwargs)  # type: ignore[arg-type]


def test_a_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMPLITUDE_API_KEY", BAD)
    monkeypatch.setenv("AMPLITUDE_SECRET_KEY", "s")
    with pytest.raises(amp.InvalidRequestError, match="api_key is not valid text"):
        amp.CohortsClient()


async def test_in_a_batch_it_fails_that_cohort_only(
    fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    fake.job_duration = 0.0
    events: list[tuple[str, str]] = []
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 poll=amp.PollPolicy(initial_interval=0.01)) as client:
        outcomes = await client.download_cohorts(
            [BAD, "small", "", "..", amp.Cohort(id=LONE)], tmp_path,
            on_progress=lambda e: events.append((e.cohort_id, e.phase)))
    assert [o.cohort_id for o in outcomes] == [BAD, "small", "", "..", LONE]
    assert outcomes[1].ok
    for outcome in outcomes[:1] + outcomes[2:]:
        assert isinstance(outcome.error, amp.InvalidRequestError)
    assert (BAD, "failed") in events
    assert ("small", "done") in events
    assert fake.cohort_requests == 1
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".csv"] == ["small.csv"]


async def test_a_batch_of_only_such_ids_sends_nothing(
    fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    async with amp.CohortsClient(fake.api_key, fake.secret_key,
                                 transport=fake.transport()) as client:
        (outcome,) = await client.download_cohorts([BAD], tmp_path)
    assert isinstance(outcome.error, amp.InvalidRequestError)
    assert fake.log == []


@pytest.mark.parametrize(("argv", "env"), [
    ([b"request", b"a\xffb"], {}),
    ([b"download", b"small", b"a\xffb", b"-o", b"{out}"], {}),
    ([b"upload", b"{ids}", b"--name", b"caf\xe9", b"--owner", b"o@x.io", b"--app-id", b"1"],
     {}),
    ([b"list"], {b"AMPLITUDE_API_KEY": b"k\xff"}),
    ([b"sync", b"{out}", b"small", b"a\xffb"], {}),
], ids=["request id", "download id", "upload name", "key in the environment", "sync id"])
async def test_the_command_line_exits_2_with_one_line(
    fake: FakeAmplitude, tmp_path: pathlib.Path, argv: list[bytes], env: dict[bytes, bytes]
) -> None:
    (tmp_path / "ids.txt").write_text("u1\n")
    names = {b"{out}": os.fsencode(tmp_path / "out"), b"{ids}": os.fsencode(tmp_path / "ids.txt")}
    async with fake.serve() as base_url:
        environment = {**os.environb, b"AMPLITUDE_API_KEY": fake.api_key.encode(),
                       b"AMPLITUDE_SECRET_KEY": fake.secret_key.encode(), **env}
        result = await anyio.run_process(
            [sys.executable.encode(), b"-m", b"amp_cohorts_async",
             *(names.get(a, a) for a in argv), b"--base-url", base_url.encode()],
            env=environment, check=False)  # type: ignore[arg-type]
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 2, err
    assert err.startswith("error: ")
    assert "not valid text" in err
    assert err.count("\n") == 1
    assert fake.log == []
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


async def test_the_command_line_prints_what_its_terminal_cannot_encode_escaped(
    fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    """A download into a directory whose name holds a non-UTF-8 byte, on an ASCII terminal,
    with a cohort named in Chinese: the work is done, so the command must not fail printing."""
    fake.job_duration = 0.0
    fake.cohorts["small"].name = "Zürich 東京"
    out = os.fsencode(tmp_path) + b"/\xffdir"
    async with fake.serve() as base_url:
        environment = {**os.environb, b"AMPLITUDE_API_KEY": fake.api_key.encode(),
                       b"AMPLITUDE_SECRET_KEY": fake.secret_key.encode(),
                       b"PYTHONIOENCODING": b"ascii"}
        results = [await anyio.run_process(
            [sys.executable.encode(), b"-m", b"amp_cohorts_async", *argv,
             b"--base-url", base_url.encode()], env=environment, check=False)  # type: ignore[arg-type]
            for argv in ([b"download", b"small", b"-o", out, b"--poll-interval", b"0.05"],
                         [b"list"])]
    for result in results:
        assert result.returncode == 0, result.stderr
    assert b"\\udcffdir" in results[0].stdout
    assert b"Z\\xfcrich \\u6771\\u4eac" in results[1].stdout
    assert (pathlib.Path(os.fsdecode(out)) / "small.csv").exists()


def test_a_limits_url_that_cannot_be_sent() -> None:
    from amp_cohorts_async.redis import RedisLimits

    with pytest.raises(amp.InvalidRequestError, match="the limits URL is not valid text"):
        RedisLimits.from_url(f"redis://{BAD}:6379/0")


@pytest.mark.parametrize(("api_key", "secret_key", "message"), [
    ("key-AAAA:1111", "secret-BBBB", "api_key must not contain ':'"),
    ("key-AAAA1111", "secret-BBBB\n", "secret_key has a space or line break around it"),
    (" key-AAAA1111", "secret-BBBB", "api_key has a space or line break around it"),
    ("key-AAAA1111", "secret\x00BBBB", "secret_key must not contain control characters"),
], ids=["colon in the api key", "secret read with its newline", "leading space",
        "NUL in the secret"])
def test_keys_that_amplitude_could_only_refuse(
    api_key: str, secret_key: str, message: str
) -> None:
    with pytest.raises(amp.InvalidRequestError, match=message) as caught:
        amp.CohortsClient(api_key, secret_key)
    for part in ("AAAA", "1111", "BBBB"):
        assert part not in str(caught.value)


async def test_in_a_sync_it_fails_that_cohort_only(
    fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    fake.job_duration = 0.0
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 poll=amp.PollPolicy(initial_interval=0.01)) as client:
        report = await client.sync_cohorts([BAD, "small"], tmp_path)
    assert [(e.cohort_id, e.action) for e in report.entries] == [(BAD, "failed"),
                                                                  ("small", "downloaded")]
    assert isinstance(report.entries[0].error, amp.InvalidRequestError)
    assert fake.cohort_requests == 1
