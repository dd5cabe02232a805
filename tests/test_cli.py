"""amp-cohorts as users run it: subprocesses against the emulator over real sockets."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
from typing import Any

import anyio
import pytest

from amp_cohorts_async.testing import FakeAmplitude

CLI = [sys.executable, "-m", "amp_cohorts_async"]


def env_for(fake: FakeAmplitude) -> dict[str, str]:
    return {**os.environ, "AMPLITUDE_API_KEY": fake.api_key,
            "AMPLITUDE_SECRET_KEY": fake.secret_key, "NO_COLOR": "1"}


async def cli(served: tuple[FakeAmplitude, str], *args: str, stdin: bytes | None = None
              ) -> tuple[int, str, str]:
    fake, base_url = served
    result = await anyio.run_process(
        [*CLI, *args, "--base-url", base_url], env=env_for(fake), input=stdin, check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_list_json_and_table(served: tuple[FakeAmplitude, str]) -> None:
    code, out, _ = await cli(served, "list", "--json")
    assert code == 0
    assert [c["id"] for c in json.loads(out)] == ["small", "large"]
    code, out, _ = await cli(served, "list")
    assert code == 0
    assert out.splitlines()[0].split("\t") == ["small", "Cohort small", "25"]


async def test_usage(served: tuple[FakeAmplitude, str]) -> None:
    code, out, _ = await cli(served, "usage", "--json")
    assert code == 0
    assert json.loads(out)["limit"] == 500
    code, out, _ = await cli(served, "usage")
    assert out.startswith("0 of 500 cohort requests used this month")


async def test_download_ids_and_all(served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
                                    ) -> None:
    code, out, err = await cli(served, "download", "small", "-o", str(tmp_path), "--props",
                               "--poll-interval", "0.1")
    assert code == 0, err
    assert (tmp_path / "small.csv").read_text().startswith('"amplitude_id","user_id","city"')
    assert "small: done" in out
    assert "files are in" in out
    code, out, err = await cli(served, "download", "--all", "-o", str(tmp_path / "all"),
                               "--json", "--poll-interval", "0.1")
    assert code == 0, err
    summary = json.loads(out)
    assert [s["cohort_id"] for s in summary] == ["large", "small"] or [
        s["cohort_id"] for s in summary] == ["small", "large"]
    assert {s["members"] for s in summary} == {25, 20_000}
    assert all(s["seconds"] > 0 for s in summary)


async def test_request_status_fetch(served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
                                    ) -> None:
    code, out, _ = await cli(served, "request", "large", "--prop-key", "city")
    assert code == 0
    request_id = out.strip()
    await anyio.sleep(0.3)
    code, out, _ = await cli(served, "status", request_id)
    assert (code, out.strip()) == (0, "JOB COMPLETED")
    code, out, _ = await cli(served, "fetch", request_id, "-o", str(tmp_path / "l.csv"), "--json")
    assert code == 0
    assert json.loads(out)["size_bytes"] == (tmp_path / "l.csv").stat().st_size
    assert served[0].requests_to("request")[0].query == (("props", "1"), ("propKeys", "city"))


async def test_upload_from_stdin_and_csv_and_membership(
    served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    fake = served[0]
    fake.add_users(["u1", "u2", "u3", "u4"])
    code, out, err = await cli(served, "upload", "-", "--name", "From stdin", "--owner",
                               "o@example.com", "--app-id", "1", "--json",
                               stdin=b"u1\nu2\n\nu2\n")
    assert code == 0, err
    result = json.loads(out)
    assert result["duplicates_removed"] == 1
    cohort_id = result["cohort_id"]
    assert fake.member_ids(cohort_id) == {"u1", "u2"}
    csv_file = tmp_path / "ids.csv"
    csv_file.write_text("email,user\nx,u3\ny,u4\n")
    code, out, err = await cli(served, "membership", "add", cohort_id, str(csv_file),
                               "--column", "user")
    assert code == 0, err
    code, _, _ = await cli(served, "membership", "remove", cohort_id, "-", stdin=b"u1\n")
    assert fake.member_ids(cohort_id) == {"u2", "u3", "u4"}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("download", "missing", "--poll-interval", "0.1"), 4, "FAILED: HTTP 404"),
        (("request", "missing"), 4, "error: HTTP 404"),
        (("download",), 2, "error: name at least one cohort id, or --all"),
        (("upload", "/no/such/file", "--name", "n", "--owner", "o", "--app-id", "1"), 2,
         "cannot read /no/such/file"),
    ],
)
async def test_expected_failures_are_one_line(
    served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path, args: tuple[str, ...], code: int,
    message: str,
) -> None:
    got, out, err = await cli(served, *args)
    assert got == code
    assert message in out + err
    assert "Traceback" not in err


async def test_bad_credentials(served: tuple[FakeAmplitude, str]) -> None:
    fake, base_url = served
    result = await anyio.run_process(
        [*CLI, "list", "--base-url", base_url],
        env={**env_for(fake), "AMPLITUDE_SECRET_KEY": "wrong"}, check=False)
    assert result.returncode == 3
    assert result.stderr.decode().startswith("error: HTTP 401")
    assert "wrong" not in result.stderr.decode()
    result = await anyio.run_process(
        [*CLI, "list", "--base-url", base_url, "--debug"],
        env={**env_for(fake), "AMPLITUDE_SECRET_KEY": "wrong"}, check=False)
    assert "Traceback" in result.stderr.decode()


async def test_missing_credentials(served: tuple[FakeAmplitude, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMPLITUDE_")}
    result = await anyio.run_process([*CLI, "usage"], env=env, check=False)
    assert result.returncode == 2
    assert result.stderr.decode() == ("error: set AMPLITUDE_API_KEY and AMPLITUDE_SECRET_KEY in "
                                      "the environment (the project's API key and secret key)\n")


async def test_ctrl_c_then_resume_spends_no_extra_quota(
    served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    fake, base_url = served
    fake.inject("s3", "slow", delay=0.5, times=1)
    async with await anyio.open_process(
        [*CLI, "download", "large", "small", "-o", str(tmp_path), "--poll-interval", "0.1",
         "--base-url", base_url], env=env_for(fake),
    ) as process:
        with anyio.fail_after(20):
            while not fake.requests_to("s3"):  # mid-download of the large file
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)
        process.send_signal(signal.SIGINT)
        assert process.stderr is not None
        assert process.stdout is not None
        with anyio.fail_after(20):
            # Read each stream to its end: one receive() may return only part of it.
            err = b"".join([chunk async for chunk in process.stderr]).decode()
            out = b"".join([chunk async for chunk in process.stdout]).decode()
            code = await process.wait()
    assert code == 130
    assert "--resume" in err
    assert "large: cancelled" in out  # stopped, not failed
    assert "large: failed" not in out
    assert not (tmp_path / "large.csv").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    assert (tmp_path / ".amp-cohorts-journal.json").exists()
    spent = fake.cohort_requests
    code, _out, err = await cli(served, "download", "large", "small", "-o", str(tmp_path),
                               "--resume", "--poll-interval", "0.1")
    assert code == 0, err
    assert fake.cohort_requests == spent
    assert (tmp_path / "large.csv").exists()


async def test_progress_renders_under_a_terminal(
    served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    import pexpect

    fake, base_url = served
    fake.job_duration = 1.0
    child = pexpect.spawn(
        CLI[0], [*CLI[1:], "download", "large", "small", "-o", str(tmp_path),
                 "--poll-interval", "0.3", "--base-url", base_url],
        env=env_for(fake), dimensions=(40, 120), timeout=30,
    )
    text = await read_screen(child)
    for phase in ("export requested", "export running", "done", "cohorts"):
        assert phase in text, phase
    assert "\x1b[" in text  # a live, redrawn display, not plain lines
    assert child.exitstatus == 0


async def test_plain_summary_resume_and_exit_codes(
    served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    fake = served[0]
    code, out, err = await cli(served, "download", "small", "-o", str(tmp_path),
                               "--poll-interval", "0.1")
    assert code == 0, err
    lines = out.splitlines()
    header = lines.index("cohort\tmembers\tbytes\tsha256\tseconds\tfile or error")
    assert lines[header + 1].split("\t")[:2] == ["small", "25"]  # counted while writing
    assert "1 cohort in " in out
    assert "1 cohort request spent" in out
    # A plain rerun makes a fresh export, and says how --resume would have helped.
    code, out, _ = await cli(served, "download", "small", "-o", str(tmp_path),
                             "--poll-interval", "0.1")
    assert "note: 1 file here comes from a batch of the last 6 days; --resume keeps it" in out
    assert fake.cohort_requests == 2
    code, out, _ = await cli(served, "download", "small", "missing", "-o", str(tmp_path),
                             "--poll-interval", "0.1", "--resume")
    assert code == 4  # the only failure: a cohort that does not exist
    assert "resumed: kept 1 verified file, reused 0 export requests, requested 0 new exports" \
        in out
    code, out, _ = await cli(served, "download", "missing", "-o", str(tmp_path / "none"),
                             "--poll-interval", "0.1")
    assert code == 4
    assert "files are in" not in out  # no file was written


async def test_upload_where_no_id_matched(served: tuple[FakeAmplitude, str]) -> None:
    args = ("upload", "-", "--name", "n", "--owner", "o@example.com", "--app-id", "1",
            "--id-type", "BY_AMP_ID")
    code, out, err = await cli(served, *args, stdin=b"not-a-number\n")
    assert code == 6
    assert "no id matched" in err
    code, out, err = await cli(served, *args, "--allow-empty", stdin=b"not-a-number\n")
    assert code == 0, err
    served[0].add_users(["u1"])
    code, out, err = await cli(served, "upload", "-", "--name", "n", "--owner",
                               "o@example.com", "--app-id", "1", "--dry-run", stdin=b"u1\n")
    assert code == 0, err
    assert out.startswith("dry run, nothing saved: 1 of 1 ids matched in 1 request")


async def test_help_is_plain_text() -> None:
    result = await anyio.run_process([*CLI, "--help"], check=False)
    text = result.stdout.decode()
    assert "AMPLITUDE_API_KEY" in text
    assert "``" not in text


async def test_the_countdown_ticks_and_names_amplitudes_pause(
    served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    import pexpect

    fake, base_url = served
    fake.inject("request", "status", status=429, retry_after=4)
    child = pexpect.spawn(
        CLI[0], [*CLI[1:], "download", "small", "-o", str(tmp_path), "--poll-interval", "0.2",
                 "--base-url", base_url],
        env=env_for(fake), dimensions=(40, 120), timeout=30,
    )
    text = await read_screen(child)
    assert "Amplitude asked to wait (429)" in text
    left = {n for n in range(6) if f"asked to wait (429), {n}s left" in text}
    assert len(left) >= 3, left  # 4s, 3s, 2s, 1s...: the countdown moved between events
    assert child.exitstatus == 0


async def read_screen(child: Any) -> str:
    """Everything a pseudo-terminal child printed until it exited."""
    import pexpect

    screen = b""
    while True:
        try:
            screen += await anyio.to_thread.run_sync(child.read_nonblocking, 65536, 20)
        except pexpect.EOF:
            break
    child.close()
    return screen.decode("utf-8", "replace")


async def test_env_base_url_and_a_refused_connection_fail_fast(
    tmp_path: pathlib.Path
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    env = {**os.environ, "AMPLITUDE_API_KEY": "k", "AMPLITUDE_SECRET_KEY": "s",
           "AMPLITUDE_BASE_URL": f"http://127.0.0.1:{port}"}
    result = await anyio.run_process([*CLI, "list"], env=env, check=False)
    err = result.stderr.decode()
    assert result.returncode == 1
    assert err.startswith(f"error: connection refused by 127.0.0.1:{port}")
    assert err.count("\n") == 1
    assert "attempts)" not in err  # one attempt: an error after retries says "(after N attempts)"


async def test_the_command_without_rich_prints_plain_lines(
    served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    """Installed without the cli extra, on a terminal: plain lines and one note."""
    import pexpect

    fake, base_url = served
    blocker = tmp_path / "no_rich"
    blocker.mkdir()
    (blocker / "rich.py").write_text("raise ModuleNotFoundError(name='rich')\n")
    child = pexpect.spawn(
        CLI[0], [*CLI[1:], "download", "small", "-o", str(tmp_path / "out"),
                 "--poll-interval", "0.1", "--base-url", base_url],
        env={**env_for(fake), "PYTHONPATH": str(blocker)}, dimensions=(40, 120), timeout=30,
    )
    text = await read_screen(child)
    assert child.exitstatus == 0, text
    assert text.count("install amp-cohorts-async[cli] for a live view") == 1
    assert "small: done" in text
