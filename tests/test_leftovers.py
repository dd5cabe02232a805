"""Temp files a killed run left behind are removed by the next run in that directory; files
that only look like them, and temp files of runs still alive, are never touched."""

from __future__ import annotations

import fcntl
import os
import pathlib
import signal
import sys
import time

import anyio
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude

from .conftest import FAST_POLL

OURS = ".small.csv.amp-0123456789ab.part"
LOOK_ALIKES = (
    ".small.csv.0123456789ab.part",  # no mark of ours
    ".small.csv.amp-0123456789AB.part",  # not our hex
    ".small.csv.amp-0123456789a.part",  # too short
    "small.csv.amp-0123456789ab.part",  # not hidden
    ".small.csv.amp-0123456789ab.part.bak",
    ".small.csv.amp-0123456789ab.partial",
    "notes.txt",
)
AN_HOUR_AGO = time.time() - 3600


def make(path: pathlib.Path, *, age: float = AN_HOUR_AGO) -> pathlib.Path:
    path.write_bytes(b"someone's bytes")
    os.utime(path, (age, age))
    return path


@pytest.mark.looptime
@pytest.mark.parametrize("call", ["download_cohorts", "download_cohort"])
async def test_a_run_removes_only_dead_runs_temp_files(tmp_path: pathlib.Path, call: str
                                                       ) -> None:
    make(tmp_path / OURS)
    make(tmp_path / ".large.csv.amp-aaaaaaaaaaaa.part")
    for name in LOOK_ALIKES:
        make(tmp_path / name)
    (tmp_path / ".dir.csv.amp-bbbbbbbbbbbb.part").mkdir()  # not a file
    outside = make(tmp_path.parent / f"{tmp_path.name}-outside.csv")
    (tmp_path / ".link.csv.amp-cccccccccccc.part").symlink_to(outside)  # not followed
    make(tmp_path / ".young.csv.amp-dddddddddddd.part", age=time.time() + 60)  # after the run
    alive = make(tmp_path / ".alive.csv.amp-eeeeeeeeeeee.part")
    with open(alive, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a run still writing it holds it
        with FakeAmplitude(job_duration=1.0) as fake:
            fake.add_cohort("small", size=5)
            async with amp.CohortsClient(fake.api_key, fake.secret_key,
                                         transport=fake.transport(), poll=FAST_POLL) as client:
                if call == "download_cohorts":
                    await client.download_cohorts(["small"], tmp_path)
                else:
                    await client.download_cohort("small", tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert OURS not in left
    assert ".large.csv.amp-aaaaaaaaaaaa.part" not in left
    assert set(LOOK_ALIKES) <= set(left)
    for kept in (".dir.csv.amp-bbbbbbbbbbbb.part", ".link.csv.amp-cccccccccccc.part",
                 ".young.csv.amp-dddddddddddd.part", ".alive.csv.amp-eeeeeeeeeeee.part"):
        assert kept in left
    assert outside.read_bytes() == b"someone's bytes"
    assert "small.csv" in left


@pytest.mark.looptime
async def test_a_download_to_a_file_path_sweeps_nothing(tmp_path: pathlib.Path) -> None:
    """Only a run *in a directory* (download_cohort(s) into it) sweeps it."""
    make(tmp_path / OURS)
    with FakeAmplitude(job_duration=1.0) as fake:
        fake.add_cohort("small", size=5)
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     poll=FAST_POLL) as client:
            await client.download_cohort("small", tmp_path / "chosen.csv")
    assert (tmp_path / OURS).exists()


async def test_the_temp_file_of_a_killed_run_is_removed_by_the_next(tmp_path: pathlib.Path
                                                                     ) -> None:
    with FakeAmplitude(job_duration=0.1, inline_threshold=1024) as fake:
        fake.add_cohort("large", size=40_000)
        fake.add_cohort("small", size=5)
        fake.inject("s3", "slow", delay=0.5, times=1)
        async with fake.serve() as base_url:
            env = {**os.environ, "AMPLITUDE_API_KEY": fake.api_key,
                   "AMPLITUDE_SECRET_KEY": fake.secret_key, "NO_COLOR": "1"}
            async with await anyio.open_process(
                [sys.executable, "-m", "amp_cohorts_async", "download", "large", "-o",
                 str(tmp_path), "--poll-interval", "0.05", "--base-url", base_url], env=env,
            ) as process:
                with anyio.fail_after(30):
                    while not list(tmp_path.glob(".large.csv.*.part")):
                        await anyio.sleep(0.02)
                process.send_signal(signal.SIGKILL)
                await process.wait()
            [left] = tmp_path.glob(".large.csv.*.part")  # SIGKILL: no cleanup ran
            async with amp.CohortsClient(fake.api_key, fake.secret_key, base_url=base_url,
                                         poll=amp.PollPolicy(initial_interval=0.05)) as client:
                [outcome] = await client.download_cohorts(["small"], tmp_path)
    assert outcome.ok
    assert not left.exists()
