"""FileLimits: the shared limits of one host in one SQLite file, across processes and runs.

The operations FileLimits shares with RedisLimits are tested for both in test_redis_limits.py;
here: where the file lives, what it refuses, and real processes (successive, concurrent, killed,
interrupted) against the emulator served on loopback. Windows are scaled to seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import re
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude

from .test_redis_limits import SCALED, WORKER, run_workers

SLOT = amp.PermitRequest(slot=True, cohort=False)


def app_of(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


# -- where the state lives --------------------------------------------------------------------

async def test_the_default_file_is_one_per_app_in_the_cache_and_holds_no_key(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    api_key = f"key-{uuid.uuid4().hex}"
    with FakeAmplitude(api_key=api_key) as fake:
        fake.add_cohort("c", size=3)
        async with amp.FileLimits() as limits, amp.CohortsClient(
            api_key, fake.secret_key, transport=fake.transport(), limits_backend=limits
        ) as client:
            await client.request_cohort("c")
            assert await limits.quota_used() == 1
    expected = tmp_path / "cache" / "amp-cohorts-async" / f"limits-{app_of(api_key)}.sqlite3"
    assert limits.path == expected
    assert expected.is_file()
    assert (expected.parent.stat().st_mode & 0o777) == 0o700
    stored = b"".join(p.read_bytes() for p in expected.parent.iterdir())
    assert api_key.encode() not in stored


def test_a_relative_cache_home_is_ignored(tmp_path: pathlib.Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path))
    limits = amp.FileLimits()
    limits.bind(amp.Limits(), "abc")
    assert limits.path == tmp_path / ".cache" / "amp-cohorts-async" / "limits-abc.sqlite3"


async def test_successive_instances_see_each_others_state(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "limits.sqlite3"
    limits = amp.Limits(cohort_requests=(amp.RateWindow(1, 60.0),))
    request = amp.PermitRequest(slot=False, cohort=True, quota=500)
    async with amp.FileLimits(path) as first:
        first.bind(limits, "app")
        permit = await first.acquire(request)
        assert isinstance(permit, amp.Permit)
        await first.release([permit], amp.Settlement(stamp=True, refund=False))
        await first.pause(30.0)
    async with amp.FileLimits(path) as second:  # a later run
        second.bind(limits, "app")
        wait = await second.acquire(request)
        assert isinstance(wait, amp.PermitWait)
        assert wait.reason == "window"
        assert 59.0 < wait.seconds <= 60.0 + 1e-3
        paused = await second.acquire(SLOT)
        assert isinstance(paused, amp.PermitWait)
        assert paused.reason == "pause"
        assert await second.quota_used() == 1


async def test_a_deleted_file_is_a_state_loss_that_its_holders_survive(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone clears the cache while a run holds permits: the new file knows nothing of them,
    so everyone waits as after a Redis flush, and the holders re-assert what they hold."""
    path = tmp_path / "limits.sqlite3"
    limits = amp.Limits(max_concurrent_requests=2, cohort_requests=(amp.RateWindow(5, 30.0),),
                        monthly_quota=None)
    cohort = amp.PermitRequest(slot=False, cohort=True)
    async with amp.FileLimits(path) as old, amp.FileLimits(path) as newcomer:
        old.bind(limits, "app")
        newcomer.bind(limits, "app")
        slot, request = await old.acquire(SLOT), await old.acquire(cohort)
        assert isinstance(slot, amp.Permit)
        assert isinstance(request, amp.Permit)
        for file in tmp_path.glob("limits.sqlite3*"):
            file.unlink()
        await newcomer.aclose()  # a run started after the cache was cleared: a new file
        assert isinstance(await newcomer.acquire(SLOT), amp.Permit)  # never used it: at once
        await newcomer.set_known_usage(request.month, 3)
        assert await old.renew([slot, request]) == 0  # re-asserted, not reported lost
        assert old.state_losses == 1
        assert "deleted or replaced while in use" in caplog.text
        for want, reason, longest in ((SLOT, "slots", 30.0), (cohort, "window", 30.001)):
            wait = await newcomer.acquire(want)
            assert isinstance(wait, amp.PermitWait)
            assert wait.reason == reason
            assert 0 < wait.seconds <= longest
        assert await old.release([slot], None) == 0
        assert await old.release([request], amp.Settlement(stamp=False, refund=True)) == 0
        assert await newcomer.quota_used(request.month) == 3  # charged before: not refunded
        assert newcomer.state_losses == 0


# -- what it refuses, clearly -----------------------------------------------------------------

async def use(limits: amp.FileLimits, app: str = "app") -> None:
    limits.bind(amp.Limits(), app)
    async with limits:
        await limits.acquire(SLOT)


async def test_a_corrupt_file_is_a_named_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "limits.sqlite3"
    path.write_bytes(b"\x00garbage, not a database" * 200)
    with pytest.raises(amp.LimitsBackendError, match=r"not a limits database.*delete it"):
        await use(amp.FileLimits(path))
    assert path.read_bytes().startswith(b"\x00garbage")  # left for the user to look at


async def test_another_programs_database_is_not_written_to(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "other.sqlite3"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE notes (text TEXT)")
    other.close()
    with pytest.raises(amp.LimitsBackendError, match="not a limits database"):
        await use(amp.FileLimits(path))
    with sqlite3.connect(path) as other:
        tables = [row[0] for row in other.execute("SELECT name FROM sqlite_schema")]
    other.close()
    assert tables == ["notes"]


async def test_a_file_of_another_app_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "limits.sqlite3"
    await use(amp.FileLimits(path), app="one")
    with pytest.raises(amp.LimitsBackendError, match="another app"):
        await use(amp.FileLimits(path), app="two")


async def test_a_new_file_another_process_is_writing_is_waited_for(
    tmp_path: pathlib.Path,
) -> None:
    """SQLite answers a switch to WAL "database is locked" at once, without its busy wait,
    while another connection writes the new, still empty file (two processes that start
    together). FileLimits waits its turn instead of failing."""
    path = tmp_path / "limits.sqlite3"
    path.touch()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    limits = amp.FileLimits(path)

    async def finish_the_other_write() -> None:
        await anyio.sleep(0.2)
        other.execute("COMMIT")

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(finish_the_other_write)
            await use(limits)
    finally:
        other.close()
    assert quota_rows_of_a_wal_file(path) == 0


def quota_rows_of_a_wal_file(path: pathlib.Path) -> int:
    with sqlite3.connect(path) as db:
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
        used = db.execute("SELECT count(*) FROM quota").fetchone()[0]
    db.close()
    assert mode == "wal"
    return int(used)


async def test_a_file_made_before_write_leases_gains_them(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "limits.sqlite3"
    await use(amp.FileLimits(path))
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE writers")
    db.close()
    limits = amp.FileLimits(path)
    limits.bind(amp.Limits(), "app")
    async with limits:
        token = await limits.acquire_write("c1")
        assert token is not None
        assert await limits.acquire_write("c1") is None
        await limits.release_write("c1", token)


async def test_a_path_that_is_not_a_regular_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(amp.InvalidRequestError, match="not a regular file"):
        amp.FileLimits(tmp_path)  # a directory
    fifo = tmp_path / "fifo"
    limits = amp.FileLimits(fifo)
    os.mkfifo(fifo)  # made after the check at construction: SQLite would block on it
    with anyio.fail_after(10), pytest.raises(amp.LimitsBackendError, match="not a regular"):
        await use(limits)


async def test_a_file_that_cannot_be_created_is_a_named_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "blocker" / "limits.sqlite3"
    limits = amp.FileLimits(path)
    (tmp_path / "blocker").write_text("a file where a directory should be")
    with pytest.raises(amp.LimitsBackendError, match=re.escape(f"{path} cannot be used")):
        await use(limits)
    with pytest.raises(amp.InvalidRequestError, match="cannot be used"):
        amp.FileLimits(path)  # seen at once when it is already so


@pytest.mark.parametrize("bad", [
    lambda: amp.FileLimits(42),  # type: ignore[arg-type]
    lambda: amp.FileLimits(lease_ttl=0.1),
    lambda: amp.FileLimits(lease_ttl=math.inf),
    lambda: amp.FileLimits(lease_ttl=True),
])
def test_bad_arguments(bad: object) -> None:
    with pytest.raises(amp.InvalidRequestError):
        bad()  # type: ignore[operator]


# -- processes on one host --------------------------------------------------------------------

async def test_four_processes_share_one_file_without_a_violation(tmp_path: pathlib.Path) -> None:
    spec = f"file:{tmp_path / 'limits.sqlite3'}"
    with FakeAmplitude(limits=SCALED, job_duration=0.3, latency=(0.001, 0.005)) as fake:
        ids = [fake.add_cohort(f"c{i:02d}", size=20).id for i in range(60)]
        async with fake.serve() as base_url:
            results = await run_workers(base_url, spec, [ids[i::4] for i in range(4)],
                                        tmp_path, "unused")
    assert [r["ok"] for r in results] == [15, 15, 15, 15]
    assert fake.violations == []
    assert not [e for e in fake.log if e.status == 429]
    started = [e.path for e in fake.log if e.endpoint == "request" and e.status == 202]
    assert len(started) == len(set(started)) == 60  # every cohort started once
    assert fake.max_active <= SCALED.max_concurrent_requests


async def test_a_run_after_a_run_waits_for_the_window_the_first_one_filled(
    tmp_path: pathlib.Path
) -> None:
    """The second process starts at once; the file tells it what the first one just sent."""
    spec = f"file:{tmp_path / 'limits.sqlite3'}"
    with FakeAmplitude(limits=SCALED, job_duration=0.1) as fake:
        ids = [fake.add_cohort(f"c{i:02d}", size=5).id for i in range(30)]
        async with fake.serve() as base_url:
            for run, batch in enumerate((ids[:20], ids[20:])):
                (tmp_path / f"run{run}").mkdir()
                results = await run_workers(base_url, spec, [batch], tmp_path / f"run{run}",
                                            "unused", AMP_TEST_RETRY_AFTER_CAP="0.5")
                assert results[0]["ok"] == len(batch)
    assert not [e for e in fake.log if e.status == 429]
    assert fake.violations == []
    assert fake.cohort_requests == 30


async def test_a_killed_holder_gives_its_slot_back_within_the_ttl(
    tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "limits.sqlite3"
    env = {**os.environ, "AMP_TEST_LEASE_TTL": "1.0"}
    hog = await anyio.open_process([sys.executable, str(WORKER), "hog", f"file:{path}"],
                                   env=env)
    async with hog:
        assert hog.stdout is not None
        reader = BufferedByteReceiveStream(hog.stdout)
        token = json.loads(await reader.receive_until(b"\n", 1 << 16))["token"]
        await anyio.sleep(1.5)  # alive and renewing past its TTL: still held
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT count(*) FROM slots WHERE token = ?",
                              (token,)).fetchone() == (1,)
        db.close()
        os.kill(hog.pid, signal.SIGKILL)
        await hog.wait()
    async with amp.FileLimits(path, lease_ttl=1.0) as limits:
        limits.bind(SCALED, "hog")
        held = [await limits.acquire(SLOT) for _ in range(SCALED.max_concurrent_requests - 1)]
        assert all(isinstance(p, amp.Permit) for p in held)
        with anyio.fail_after(5):  # the dead holder's slot: back once its lease ran out
            while not isinstance(await limits.acquire(SLOT), amp.Permit):
                await anyio.sleep(0.05)


async def test_ctrl_c_then_resume_waits_for_the_window_instead_of_drawing_a_429(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command line keeps its limits in the cache by default: the resumed run knows the
    requests of the interrupted one (Amplitude's real limits: 4 cohort requests a minute)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("AMPLITUDE_LIMITS_URL", raising=False)
    with FakeAmplitude(job_duration=0.2, api_key=f"key-{uuid.uuid4().hex}") as fake:
        ids = [fake.add_cohort(f"c{i}", size=5).id for i in range(5)]
        async with fake.serve() as base_url:
            env = {**os.environ, "AMPLITUDE_API_KEY": fake.api_key,
                   "AMPLITUDE_SECRET_KEY": fake.secret_key}
            command = [sys.executable, "-m", "amp_cohorts_async", "download", *ids, "-o",
                       str(tmp_path / "out"), "--base-url", base_url, "--poll-interval", "0.1"]
            # The first run sends 4 requests (journaled), then waits for the window: Ctrl-C.
            first = await interrupt_when(command, env, lambda output: (
                output.count(b"export requested") >= 4 and b"rate limits" in output))
            assert fake.cohort_requests == 4
            # At once, the same download --resume: the 5th request must wait, not be sent.
            second = await interrupt_when([*command, "--resume"], env,
                                          lambda output: b"wait" in output)
    assert b"waiting for the rate limits" in second, second
    assert not [e for e in fake.log if e.status == 429]
    assert fake.cohort_requests == 4
    assert fake.violations == []
    assert b"interrupted" in first


async def interrupt_when(command: list[str], env: dict[str, str],
                         wanted: Callable[[bytes], bool]) -> bytes:
    """Run ``command`` until its output so far is ``wanted``, then Ctrl-C it; returns all it
    printed."""
    async with await anyio.open_process(command, env=env, stderr=subprocess.STDOUT) as process:
        assert process.stdout is not None
        reader = BufferedByteReceiveStream(process.stdout)
        output = b""
        with anyio.fail_after(60):
            while not wanted(output):
                output += await reader.receive_until(b"\n", 1 << 16) + b"\n"
            process.send_signal(signal.SIGINT)
            output += b"".join([chunk async for chunk in reader])
            assert await process.wait() == 130, output
        return output
