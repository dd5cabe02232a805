"""amp-cohorts where people trip: pipes, CSV files, --json, help, and the live view in a pty."""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import re

import anyio
import pexpect
import pytest
from rich.console import Console

import amp_cohorts_async as amp
from amp_cohorts_async.cli._help import EXAMPLES
from amp_cohorts_async.cli._live import ProgressView
from amp_cohorts_async.cli._main import build_parser
from amp_cohorts_async.testing import FakeAmplitude

from .test_cli import CLI, cli, env_for

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


async def test_list_into_head_exits_quietly(served: tuple[FakeAmplitude, str]) -> None:
    fake, base_url = served
    for n in range(3000):  # more than a pipe holds, so the write after head left fails
        fake.add_cohort(f"extra-{n:04d}", size=1)
    command = (f"{' '.join(CLI)} list --base-url {base_url} | head -1; "
               'echo "exit ${PIPESTATUS[0]}" >&2')
    result = await anyio.run_process(["bash", "-c", command], env=env_for(fake), check=False)
    assert result.stdout.decode() == "small\tCohort small\t25\n"
    assert result.stderr.decode() == "exit 141\n"  # no "error: Broken pipe", no traceback


async def test_a_csv_with_several_columns_needs_a_column(
    served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    fake, _ = served
    fake.add_users(["ann@corp.example", "bob@corp.example"])
    users = tmp_path / "users.csv"
    users.write_text("email,plan\nann@corp.example,pro\nbob@corp.example,free\n")
    upload = ["upload", str(users), "--name", "Trialists", "--owner", "me@corp.example",
              "--app-id", "123456"]
    code, _, err = await cli(served, *upload)
    assert code == 2
    assert "has several columns ('email', 'plan')" in err
    assert "--column NAME" in err
    assert fake.requests_to("upload") == []
    code, out, err = await cli(served, *upload, "--column", "email")
    assert code == 0, err
    assert "2 of 2 ids matched in 1 request" in out
    cohort_id = out.split()[1].rstrip(":")
    assert fake.member_ids(cohort_id) == {"ann@corp.example", "bob@corp.example"}


async def test_counts_read_as_english(served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
                                      ) -> None:
    ids = tmp_path / "one.txt"
    ids.write_text("user-1-3@example.com\n")
    code, out, err = await cli(served, "membership", "remove", "small", str(ids))
    assert code == 0, err
    assert out == "cohort small: REMOVE 1 id in 1 request, 1 skipped\n"


async def test_download_json_streams_progress_and_errors_as_objects(
    served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    code, out, err = await cli(served, "download", "small", "gone", "-o", str(tmp_path),
                               "--json", "--poll-interval", "0.1")
    assert code == 4  # its only failure: a missing cohort
    events = [json.loads(line) for line in err.splitlines()]
    assert {e["phase"] for e in events if e["cohort_id"] == "small"} >= {
        "queued", "requested", "polling", "done"}
    failed = [e for e in events if e["phase"] == "failed"]
    assert [e["cohort_id"] for e in failed] == ["gone"]
    assert failed[0]["error"]["type"] == "NotFoundError"
    assert failed[0]["error"]["status"] == 404
    summary = {s["cohort_id"]: s for s in json.loads(out)}
    assert summary["gone"]["error"]["type"] == "NotFoundError"
    assert summary["gone"]["error"]["status"] == 404
    assert summary["small"]["error"] is None

    fake, base_url = served
    result = await anyio.run_process(
        [*CLI, "usage", "--json", "--base-url", base_url],
        env={**env_for(fake), "AMPLITUDE_SECRET_KEY": "wrong"}, check=False)
    assert result.returncode == 3
    error = json.loads(result.stderr)["error"]
    assert (error["type"], error["status"]) == ("AuthenticationError", 401)
    assert "wrong" not in result.stderr.decode()


def test_every_command_has_an_example_and_every_option_a_help_line() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) <= set(EXAMPLES)
    for name, command in commands.choices.items():
        text = command.format_help()
        assert "example:\n  amp-cohorts " + name in text, name
        assert command.description, name
        for option in command._actions:
            assert option.help, f"{name} {option.option_strings or option.dest}"


def test_time_scale_is_refused_for_a_remote_host() -> None:
    from amp_cohorts_async.cli._main import time_scaled_limits

    with pytest.raises(amp.InvalidRequestError, match="loopback"):
        time_scaled_limits(0.05, "https://amplitude.com")
    limits = time_scaled_limits(0.05, "http://127.0.0.1:8000")
    assert limits is not None
    assert [w.seconds for w in limits.cohort_requests] == [30.0, 3.0]


def render(view: ProgressView, height: int = 24) -> list[str]:
    console = Console(file=io.StringIO(), width=80, height=height, color_system=None)
    console.print(view._render())
    output: str = console.file.getvalue()  # type: ignore[attr-defined]
    return output.splitlines()


def test_the_live_view_labels_kept_reused_failed_and_sent() -> None:
    view = ProgressView(["kept", "reused", "bad", "sent"], stream=io.StringIO(), live=False,
                        kept={"kept"}, reused={"reused"})
    view(amp.ProgressEvent(cohort_id="kept", phase="done", bytes_done=10, bytes_total=10))
    view(amp.ProgressEvent(cohort_id="reused", phase="polling"))
    view(amp.ProgressEvent(cohort_id="bad", phase="failed", error=amp.CohortJobError(
        "export job of bad failed")))
    view(amp.ProgressEvent(cohort_id="sent", phase="waiting", wait_seconds=0.0,
                           wait_reason="limits"))
    text = "\n".join(render(view))
    assert "done, 10 B (kept from the earlier batch)" in text
    assert "export running (reusing the earlier export, no quota)" in text
    assert "failed: export job of bad failed" in text
    assert "request sent" in text


async def test_the_live_view_fits_80x24_with_30_cohorts(
    served: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    fake, base_url = served
    scale = 0.01
    fake.limits = amp.Limits().time_scaled(scale)
    fake.job_duration = (0.5, 1.5)
    ids = [f"cohort-{n:02d}" for n in range(29)]
    for cohort_id in ids:
        fake.add_cohort(cohort_id, size=50)
    ids.insert(3, "missing")

    def run() -> str:
        child = pexpect.spawn(
            CLI[0], [*CLI[1:], "download", *ids, "-o", str(tmp_path), "--poll-interval",
                     "0.2", "--base-url", base_url, "--time-scale", str(scale)],
            env={**env_for(fake), "TERM": "xterm"}, dimensions=(24, 80), encoding="utf-8",
            timeout=120)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 4, child.before  # its only failure: a missing cohort
        return str(child.before)

    text = ANSI.sub("", await anyio.to_thread.run_sync(run))
    # Each frame ends with the overall bar and its count, never rich's "..." for overflow;
    # the cohorts that do not fit are counted on one row.
    assert re.search(r"\d+/30 cohorts finished", text)
    assert re.search(r"\+ \d+ more", text)
    assert not re.search(r"^\s*\.\.\.\s*$", text, re.MULTILINE)
    # The missing cohort's row gave its reason while the others were still running.
    assert "failed: HTTP 404" in text[:text.index("30/30 cohorts finished")]
    assert "files are in" in text
    assert not fake.violations


def test_the_demo_says_in_words_what_its_scaled_limits_are() -> None:
    from amp_cohorts_async.cli._demo import NEXT_STEPS, demo_limits, describe_scaled_limits

    text = describe_scaled_limits(demo_limits())
    assert "run 20 times faster" in text
    assert "4 per 3 s instead of per minute" in text
    assert "60 per 30 s instead of per 10 minutes" in text
    assert "amp-cohorts list" in NEXT_STEPS
