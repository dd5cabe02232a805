"""What the core promises under faults and cancellations, on the emulator in virtual time.

A batch at 0 %, 10 % and 30 % of answers faulted loses nothing, corrupts nothing, leaves no
temp file, breaks no limit, and spends extra quota exactly where the server acted and its
answer was lost. Cancelled at random points, a batch leaves no partial file, leaks no permit,
and its local quota count equals what the emulator charged.
"""

from __future__ import annotations

import gzip
import hashlib
import pathlib
import random

import anyio
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude

POLL = amp.PollPolicy(initial_interval=2.0, max_interval=10.0)


def temp_files(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*")
                  if p.name.endswith((".part", ".tmp")))


def served_sha256s(fake: FakeAmplitude, cohort_id: str) -> set[str]:
    """sha256 of every export of ``cohort_id`` the emulator rendered (decoded, as stored)."""
    digests = set()
    for request_id, job in fake.jobs.items():
        if job.cohort.id == cohort_id and job.export is not None:
            data = fake.export_bytes(request_id)
            digests.add(hashlib.sha256(gzip.decompress(data) if job.gzip else data).hexdigest())
    return digests


@pytest.mark.looptime
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_faulted_batch_loses_and_corrupts_nothing(
    tmp_path: pathlib.Path, rate: float, seed: int
) -> None:
    rng = random.Random(seed)
    with FakeAmplitude(job_duration=(5.0, 60.0), latency=(0.01, 0.2), seed=seed,
                       inline_threshold=16 * 1024, gzip=seed == 2) as fake:
        ids = [fake.add_cohort(f"c{i:02d}", size=rng.choice((20, 400, 3000))).id
               for i in range(30)]
        fake.random_faults(rate, seed=seed)
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     poll=POLL, retry=amp.RetryPolicy(max_attempts=10),
                                     seed=seed) as client:
            outcomes = await client.download_cohorts(ids, tmp_path)
            local_quota = await client.scheduler.quota_used()
        if rate:
            assert sum(fake.random_faults_injected.values()) > 0
        for outcome in outcomes:
            assert outcome.ok, outcome.error
            assert outcome.result is not None
            on_disk = hashlib.sha256(outcome.result.path.read_bytes()).hexdigest()
            assert on_disk == outcome.result.sha256
            assert on_disk in served_sha256s(fake, outcome.cohort_id)
        assert temp_files(tmp_path) == []
        assert fake.violations == []
        assert fake.cohort_requests - len(ids) == fake.acted_answers_lost
        # A 5xx may have been acted on: counted locally, so the count never under-states.
        assert local_quota >= fake.cohort_requests


@pytest.mark.looptime
async def test_random_cancellations_leave_nothing_and_count_quota_exactly(
    tmp_path: pathlib.Path
) -> None:
    rng = random.Random(11)
    with FakeAmplitude(job_duration=(2.0, 20.0), seed=11, inline_threshold=16 * 1024) as fake:
        ids = [fake.add_cohort(f"c{i}", size=size).id for i, size in enumerate((20, 900, 3000))]
        fake.inject("s3", "slow", delay=0.5, times=1000)  # transfers take a while too
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     poll=POLL, seed=11) as client:
            cancelled = 0
            for attempt in range(60):
                directory = tmp_path / f"run{attempt}"
                directory.mkdir()
                with anyio.move_on_after(rng.uniform(0.0, 30.0)) as scope:
                    await client.download_cohorts(ids, directory)
                cancelled += scope.cancelled_caught
                assert temp_files(directory) == []
                for path in directory.glob("*.csv"):  # whatever is there is whole
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    assert digest in served_sha256s(fake, path.stem)
            scheduler = client.scheduler
            assert scheduler.gate.in_use == 0
            assert all(log.in_flight == 0 for log in scheduler.backend.logs)  # type: ignore[attr-defined]
            assert await scheduler.quota_used() == fake.cohort_requests
        assert cancelled >= 50
        assert fake.violations == []
