"""A disk that fills or fails: a named DiskError, one outcome per cohort, nothing left behind.

Two ways to fill a disk: a fault-injecting file layer that makes a random write call (or the
fsync) fail with ENOSPC, on every machine, through both HTTP stacks; and a real 2 MiB tmpfs
where this machine lets us mount one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pathlib
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

import amp_cohorts_async as amp
import amp_cohorts_async._files as files_module
from amp_cohorts_async._download import Downloader
from amp_cohorts_async.testing import FakeAmplitude

from .conftest import FAST_POLL, finished_export

REAL_POLL = amp.PollPolicy(initial_interval=0.02, max_interval=0.1)


def temp_files(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".part"))


class FillingDisk:
    """Temp files on a disk that fills up: from write call number ``full_at`` on (counted
    over every temp file opened), every write fails with ENOSPC; with ``at_fsync``, every
    fsync does (a network filesystem reports a full disk there)."""

    def __init__(self, full_at: int, *, at_fsync: bool = False) -> None:
        self.full_at = full_at
        self.at_fsync = at_fsync
        self.writes = 0

    @property
    def full(self) -> bool:
        return self.writes >= self.full_at

    def open(self, path: pathlib.Path) -> Any:
        return _FillingFile(self, path)


class _FillingFile:
    def __init__(self, disk: FillingDisk, path: pathlib.Path) -> None:
        self.disk = disk
        self.file = open(path, "xb")  # noqa: SIM115 - closed through close()

    def write(self, data: bytes) -> int:
        self.disk.writes += 1
        if self.disk.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        if self.disk.at_fsync:
            # os.fsync(fileno()) is how the commit syncs; a descriptor that fails it does too.
            return _FSYNC_FAILS
        return self.file.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


_FSYNC_FAILS = -1  # os.fsync(-1) raises OSError(EBADF); the test below swaps in ENOSPC


@pytest.fixture
def filling_disk(monkeypatch: pytest.MonkeyPatch) -> FillingDisk:
    disk = FillingDisk(full_at=10**9)
    monkeypatch.setattr(files_module, "_open_temp", disk.open)
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if descriptor == _FSYNC_FAILS:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(descriptor)

    monkeypatch.setattr(files_module.os, "fsync", fsync)
    return disk


def add_cohorts(fake: FakeAmplitude) -> list[str]:
    fake.add_cohort("inline", size=30)
    fake.add_cohort("big", size=20_000)  # through S3
    fake.add_cohort("other", size=3_000)
    return ["inline", "big", "other"]


def check_outcomes(outcomes: list[amp.CohortOutcome], directory: pathlib.Path) -> int:
    """Every failure a DiskError naming ENOSPC, every file there whole; returns failures."""
    failed = 0
    for outcome in outcomes:
        if outcome.error is not None:
            assert isinstance(outcome.error, amp.DiskError), repr(outcome.error)
            assert outcome.error.errno == errno.ENOSPC
            assert "No space left" in str(outcome.error)
            failed += 1
        else:
            assert outcome.result is not None
            data = outcome.result.path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == outcome.result.sha256
    assert temp_files(directory) == []
    return failed


@pytest.mark.looptime
@pytest.mark.parametrize("gzip", [False, True])
@pytest.mark.parametrize("seed", range(6))
async def test_a_disk_filling_at_a_random_write_fails_only_those_cohorts_by_name(
    tmp_path: pathlib.Path, filling_disk: FillingDisk, gzip: bool, seed: int
) -> None:
    """The async (httpx) stack, inline and redirected bodies, plain and gzip."""
    filling_disk.full_at = random.Random(seed).randint(1, 12)
    filling_disk.at_fsync = seed % 2 == 1
    with FakeAmplitude(job_duration=1.0, inline_threshold=16 * 1024, gzip=gzip) as fake:
        ids = add_cohorts(fake)
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     poll=FAST_POLL, seed=seed) as client:
            outcomes = await client.download_cohorts(ids, tmp_path)
            assert check_outcomes(outcomes, tmp_path) >= 1
            with pytest.raises(amp.DiskError, match="No space left"):
                await client.download_cohort("big", tmp_path / "again.csv")
    assert temp_files(tmp_path) == []
    assert not (tmp_path / "again.csv").exists()


@pytest.mark.parametrize("seed", range(4))
async def test_the_threaded_leg_on_a_disk_that_fills_leaves_nothing(
    tmp_path: pathlib.Path, filling_disk: FillingDisk, seed: int
) -> None:
    """The threaded S3 leg over real sockets: the disk fills at a random write of the body
    (64 KiB calls), its last one included, or at the fsync."""
    with FakeAmplitude(job_duration=0.05, inline_threshold=1024) as fake:
        fake.add_cohort("big", size=20_000)
        async with fake.serve() as base_url, amp.CohortsClient(
            fake.api_key, fake.secret_key, base_url=base_url, poll=REAL_POLL,
        ) as client:
            request = await finished_export(client, "big")
            await client.download_file(request.request_id, tmp_path / "whole.csv")
            calls = filling_disk.writes
            (tmp_path / "whole.csv").unlink()
            rng = random.Random(seed)
            filling_disk.writes = 0
            filling_disk.full_at = calls if seed == 0 else rng.randint(1, calls)  # 0: the last
            if seed == 3:  # every write lands; the fsync fails
                filling_disk.full_at, filling_disk.at_fsync = calls + 1, True
            with pytest.raises(amp.DiskError) as caught:
                await client.download_file(request.request_id, tmp_path / "big.csv")
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


# -- a real full disk --------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 2 MiB tmpfs, where this machine lets us mount one."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                              str(mount_point)], capture_output=True, text=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'}); "
                    "the fault-injecting tests above fill a disk on every machine")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("stack", ["threaded", "httpx"])
@pytest.mark.parametrize("gzip", [False, True])
async def test_a_real_full_disk(small_disk: pathlib.Path, stack: str, gzip: bool) -> None:
    with FakeAmplitude(job_duration=0.05, inline_threshold=16 * 1024, gzip=gzip) as fake:
        fake.add_cohort("big", size=120_000)  # ~5 MB decoded: cannot fit
        fake.add_cohort("small", size=30)
        fake.add_cohort("medium", size=5_000)
        async with fake.serve() as base_url:
            options: dict[str, Any] = {"base_url": base_url}
            if stack == "httpx":  # a borrowed client keeps the async stack
                options["http_client"] = httpx.AsyncClient()
            async with amp.CohortsClient(fake.api_key, fake.secret_key, poll=REAL_POLL,
                                         **options) as client:
                outcomes = await client.download_cohorts(["big", "small", "medium"],
                                                         small_disk)
            if "http_client" in options:
                await options["http_client"].aclose()
    by_id = {o.cohort_id: o for o in outcomes}
    assert isinstance(by_id["big"].error, amp.DiskError)
    assert by_id["big"].error.errno == errno.ENOSPC
    assert by_id["small"].ok
    check_outcomes(outcomes, small_disk)


async def test_the_command_line_names_a_full_disk_and_exits_2(small_disk: pathlib.Path) -> None:
    with FakeAmplitude(job_duration=0.05, inline_threshold=16 * 1024) as fake:
        fake.add_cohort("big", size=120_000)
        async with fake.serve() as base_url:
            env = {**os.environ, "AMPLITUDE_API_KEY": fake.api_key,
                   "AMPLITUDE_SECRET_KEY": fake.secret_key, "NO_COLOR": "1"}
            done = await anyio.run_process(
                [sys.executable, "-m", "amp_cohorts_async", "download", "big", "-o",
                 str(small_disk), "--poll-interval", "0.05", "--base-url", base_url],
                env=env, check=False)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 2, err
    assert "No space left" in out + err
    assert "Traceback" not in err
    assert "ExceptionGroup" not in out + err
    assert temp_files(small_disk) == []


def fill_to_the_last_byte(path: pathlib.Path) -> None:
    with open(path, "wb", buffering=0) as filler:
        for piece in (b"\0" * 65536, b"\0" * 4096, b"\0"):
            with contextlib.suppress(OSError):
                while True:
                    filler.write(piece)


async def test_a_disk_full_before_the_batch_is_a_named_error_not_a_group(
    small_disk: pathlib.Path,
) -> None:
    """Full to the last byte: even the journal cannot be written. Whatever the batch decides
    (a failure per cohort, or refusing up front), it is a named error, never an OSError or
    an exception group."""
    fill_to_the_last_byte(small_disk / "filler")
    with FakeAmplitude(job_duration=0.05) as fake:
        fake.add_cohort("small", size=30)
        fake.add_cohort("other", size=30)
        async with fake.serve() as base_url, amp.CohortsClient(
            fake.api_key, fake.secret_key, base_url=base_url, poll=REAL_POLL,
        ) as client:
            refused: amp.AmplitudeError | None = None
            try:
                outcomes = await client.download_cohorts(["small", "other"], small_disk)
            except amp.AmplitudeError as error:
                refused = error
    if refused is not None:
        assert isinstance(refused, amp.DiskError | amp.InvalidRequestError), repr(refused)
    else:
        assert [type(o.error) for o in outcomes] == [amp.DiskError, amp.DiskError]
    assert temp_files(small_disk) == []


@pytest.mark.looptime
async def test_a_batch_reports_a_raw_disk_failure_per_cohort_and_unwraps_a_bug(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever fails below the batch: an OSError is that cohort's DiskError and the others go
    on; anything else (a bug) is raised as itself, never as an exception group."""
    real = Downloader.download_cohort

    async def failing(self: Downloader, cohort_id: str, *args: Any, **kwargs: Any) -> Any:
        if cohort_id == "full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))
        if cohort_id == "bug":
            raise KeyError("a bug")
        return await real(self, cohort_id, *args, **kwargs)

    monkeypatch.setattr(Downloader, "download_cohort", failing)
    with FakeAmplitude(job_duration=1.0) as fake:
        for cohort_id in ("full", "fine", "bug"):
            fake.add_cohort(cohort_id, size=5)
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     poll=FAST_POLL) as client:
            full, fine = await client.download_cohorts(["full", "fine"], tmp_path)
            with pytest.raises(KeyError, match="a bug"):
                await client.download_cohorts(["fine", "bug"], tmp_path)
    assert isinstance(full.error, amp.DiskError)
    assert full.error.errno == errno.ENOSPC
    assert fine.ok
