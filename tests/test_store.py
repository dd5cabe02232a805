"""The directory's store: concurrent writers keep every entry, bad journal paths, full disks,
and a destination checked before any quota is spent."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import amp_cohorts_async as amp
from amp_cohorts_async._journal import JOURNAL_NAME
from amp_cohorts_async._store import DirectoryStore, JournalWriteError
from amp_cohorts_async.testing import FakeAmplitude

WORKER = pathlib.Path(__file__).with_name("store_worker.py")
RELAXED = amp.Limits(max_concurrent_requests=5, cohort_requests=(amp.RateWindow(1000, 1.0),),
                     monthly_quota=None)
FAST = amp.PollPolicy(initial_interval=0.05, max_interval=0.2)


def journal_entries(directory: pathlib.Path) -> dict[str, Any]:
    return dict(json.loads((directory / JOURNAL_NAME).read_text())["entries"])


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, options: str) -> Iterator[pathlib.Path]:
    """A tmpfs mounted at ``path`` (root only; skips elsewhere, saying why)."""
    path.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def run_workers(mode: str, base_url: str, out: pathlib.Path,
                      groups: list[list[str]]) -> list[dict[str, Any]]:
    """Start one worker per group, release them together, collect their JSON lines."""
    processes = [await anyio.open_process([sys.executable, str(WORKER), mode, base_url,
                                           str(out), *ids]) for ids in groups]
    readers = [BufferedByteReceiveStream(p.stdout) for p in processes if p.stdout]
    try:
        with anyio.fail_after(60):
            for reader in readers:
                assert await reader.receive_until(b"\n", 1 << 16) == b"ready"
            for process in processes:
                assert process.stdin is not None
                await process.stdin.send(b"go\n")
            return [json.loads(await reader.receive_until(b"\n", 1 << 20))
                    for reader in readers]
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.aclose()


async def test_two_processes_downloading_into_one_directory_keep_every_entry(
    tmp_path: pathlib.Path
) -> None:
    with FakeAmplitude(limits=RELAXED, job_duration=0.05) as fake:
        ids = [fake.add_cohort(f"c{i:02d}", size=20).id for i in range(12)]
        async with fake.serve() as base_url:
            results = await run_workers("download", base_url, tmp_path, [ids[0::2], ids[1::2]])
            assert [r["ok"] for r in results] == [6, 6]
            entries = journal_entries(tmp_path)
            assert sorted(entries) == ids
            assert all(e["sha256"] for e in entries.values())
            # Every entry is there, so a resume keeps every file and spends nothing.
            async with amp.CohortsClient(fake.api_key, fake.secret_key, base_url=base_url,
                                         limits=RELAXED, poll=FAST) as client:
                outcomes = await client.download_cohorts(ids, tmp_path, resume=True)
    assert all(o.ok for o in outcomes)
    assert fake.cohort_requests == 12


@pytest.mark.looptime
async def test_two_concurrent_batches_of_one_client_keep_every_entry(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    ids = [fake.add_cohort(f"c{i}", size=10).id for i in range(6)]
    async with anyio.create_task_group() as group:
        group.start_soon(client.download_cohorts, ids[:3], tmp_path)
        group.start_soon(client.download_cohorts, ids[3:], tmp_path)
    assert sorted(journal_entries(tmp_path)) == ids
    outcomes = await client.download_cohorts(ids, tmp_path, resume=True)
    assert all(o.ok for o in outcomes)
    assert fake.cohort_requests == 6


@pytest.mark.looptime
async def test_a_journal_path_that_is_a_directory_is_set_aside_even_on_a_fresh_run(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / JOURNAL_NAME).mkdir()
    (outcome,) = await client.download_cohorts(["small"], tmp_path)
    assert outcome.ok
    assert "small" in journal_entries(tmp_path)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(JOURNAL_NAME + ".invalid-")]
    assert len(aside) == 1
    assert aside[0].is_dir()
    assert "not a regular file" in caplog.text


@pytest.mark.looptime
async def test_a_journal_path_that_cannot_be_set_aside_is_named_before_spending(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    # A mount point cannot be renamed (EBUSY): the journal cannot be kept at all.
    with tmpfs(tmp_path / JOURNAL_NAME, "size=1m"):
        with pytest.raises(amp.AmplitudeError, match=r"journal path .* is not a regular file"):
            await client.download_cohorts(["small", "large"], tmp_path)
    assert fake.log == []  # not even the free calls: nothing was asked


@pytest.mark.looptime
async def test_a_read_only_destination_is_refused_before_any_request(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    with tmpfs(tmp_path / "ro", "size=1m,ro") as read_only:
        with pytest.raises(amp.InvalidRequestError, match=r"cannot write files in .*ro"):
            await client.download_cohorts(["small", "large"], read_only)
    assert fake.log == []
    assert fake.cohort_requests == 0


async def test_the_cli_exits_2_on_a_read_only_destination(tmp_path: pathlib.Path) -> None:
    with FakeAmplitude() as fake, tmpfs(tmp_path / "ro", "size=1m,ro") as read_only:
        fake.add_cohort("c1", size=5)
        async with fake.serve() as base_url:
            env = {**os.environ, "AMPLITUDE_API_KEY": fake.api_key,
                   "AMPLITUDE_SECRET_KEY": fake.secret_key}
            done = await anyio.run_process(
                [sys.executable, "-m", "amp_cohorts_async", "download", "c1", "-o",
                 str(read_only), "--base-url", base_url], env=env, check=False)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "cannot write files in" in lines[0]
    assert fake.cohort_requests == 0


async def test_a_full_disk_while_writing_the_journal_is_named_and_leaves_no_temp(
    tmp_path: pathlib.Path
) -> None:
    with tmpfs(tmp_path / "full", "size=256k") as full:
        store = DirectoryStore(full)
        await store.update("c1", cohort_id="c1", request_id="r1")
        with open(full / "filler", "wb", buffering=0) as filler:
            with contextlib.suppress(OSError):
                while True:  # until the disk is full
                    filler.write(b"\0" * 4096)
        with pytest.raises(JournalWriteError, match=r"cannot write the journal .*No space"):
            await store.update("c2", cohort_id="c2", request_id="r" * 100_000)
        left = sorted(p.name for p in full.iterdir())
        # The journal is the last complete one; no temp file is left beside it.
        assert left == sorted([JOURNAL_NAME, ".amp-cohorts-journal.lock", "filler"])
        assert "c1" in journal_entries(full)


@pytest.mark.looptime
async def test_journal_temps_of_a_killed_writer_are_removed_and_no_one_elses(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    ours = tmp_path / f"{JOURNAL_NAME}.0123456789abcdef.tmp"  # a writer killed mid-write
    look_alikes = [tmp_path / f"{JOURNAL_NAME}.my-notes.tmp", tmp_path / "0123456789abcdef.tmp",
                   tmp_path / f"{JOURNAL_NAME}.0123456789abcdef.tmp.keep"]
    for path in [ours, *look_alikes]:
        path.write_text("{")
    (outcome,) = await client.download_cohorts(["small"], tmp_path)
    assert outcome.ok
    assert not ours.exists()
    assert all(path.exists() for path in look_alikes)


async def test_a_lock_wait_cancelled_mid_try_does_not_keep_the_lock(tmp_path: pathlib.Path
                                                                    ) -> None:
    store = DirectoryStore(tmp_path)

    async def hold() -> None:
        async with store.cohort_lock("c1"):
            await anyio.sleep_forever()

    for _ in range(3):
        async with anyio.create_task_group() as group:
            group.start_soon(hold)
            await anyio.sleep(0)  # hold() is now waiting for its try in a worker thread
            group.cancel_scope.cancel()
    with anyio.fail_after(5):
        async with store.cohort_lock("c1") as waited:
            assert not waited
