"""request -> poll -> download: every path, in-process and over sockets; nothing half-done."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import pathlib
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

import amp_cohorts_async as amp
import amp_cohorts_async._files as files_module
from amp_cohorts_async.testing import FakeAmplitude

from .conftest import FAST_POLL


def leftovers(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


def client_for(fake: FakeAmplitude, **kwargs: Any) -> amp.CohortsClient:
    kwargs.setdefault("poll", FAST_POLL)
    return amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(), seed=5,
                             **kwargs)


async def expected_bytes(fake: FakeAmplitude, result: amp.DownloadResult) -> bytes:
    return fake.export_bytes(result.request_id)


@pytest.mark.looptime
@pytest.mark.parametrize("cohort", ["small", "large"])  # inline 200 / 302 to S3
async def test_download_cohort(
    client: amp.CohortsClient, fake: FakeAmplitude, tmp_path: pathlib.Path, cohort: str
) -> None:
    result = await client.download_cohort(cohort, tmp_path)
    data = result.path.read_bytes()
    assert result.path == tmp_path / f"{cohort}.csv"
    assert data == await expected_bytes(fake, result)
    assert result.size_bytes == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.cohort_id == cohort
    assert leftovers(tmp_path) == []
    s3 = fake.requests_to("s3")
    assert bool(s3) is (cohort == "large")
    assert all("authorization" not in e.headers for e in s3)


@pytest.mark.looptime
async def test_download_file_knows_the_cohort_of_its_own_requests(
    client: amp.CohortsClient, fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    request = await client.request_cohort("small")
    await anyio.sleep(10)
    result = await client.download_file(request.request_id, tmp_path / "x.csv")
    assert result.cohort_id == "small"
    async with client_for(fake) as other:
        assert (await other.download_file(request.request_id, tmp_path / "y.csv")).cohort_id is None


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("endpoint", "kind", "after"),
    [("s3", "cut", 70_000), ("s3", "truncate", 70_000), ("file", "cut", 300),
     ("file", "truncate", 300), ("s3", "status", 0), ("file", "expired_link", 0)],
)
async def test_broken_transfers_resume_or_restart(
    client: amp.CohortsClient, fake: FakeAmplitude, tmp_path: pathlib.Path,
    endpoint: str, kind: Any, after: int,
) -> None:
    cohort = "small" if endpoint == "file" and kind != "expired_link" else "large"
    fake.inject(endpoint, kind, after_bytes=after, status=503)
    result = await client.download_cohort(cohort, tmp_path)
    assert result.path.read_bytes() == await expected_bytes(fake, result)
    assert leftovers(tmp_path) == []
    assert fake.cohort_requests == 1  # re-requesting /file costs no quota
    if endpoint == "s3" and kind in ("cut", "truncate"):
        ranged = [e for e in fake.requests_to("s3") if "range" in e.headers]
        assert ranged
        assert ranged[0].headers["range"] == f"bytes={after}-"
        assert ranged[0].status == 206


@pytest.mark.looptime
async def test_expired_link_gets_a_fresh_one(
    client: amp.CohortsClient, fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    fake.inject("file", "expired_link", times=2)
    await client.download_cohort("large", tmp_path)
    assert [e.status for e in fake.requests_to("s3")] == [403, 403, 200]
    assert len(fake.requests_to("file")) == 3


@pytest.mark.looptime
async def test_gives_up_after_bounded_attempts(fake: FakeAmplitude, tmp_path: pathlib.Path) -> None:
    fake.inject("s3", "cut", after_bytes=10, times=50)
    async with client_for(fake, retry=amp.RetryPolicy(max_attempts=3)) as client:
        with pytest.raises(amp.DownloadError, match="after 3 attempts"):
            await client.download_cohort("large", tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.looptime
@pytest.mark.parametrize("size", [40, 30_000])
async def test_gzip_bodies_are_stored_decoded(tmp_path: pathlib.Path, size: int) -> None:
    with FakeAmplitude(gzip=True, job_duration=1.0) as fake:
        fake.add_cohort("g", size=size)
        fake.inject("s3", "cut", after_bytes=20_000)  # resume mid-gzip on the large one
        async with client_for(fake) as client:
            result = await client.download_cohort("g", tmp_path)
        import gzip

        assert result.path.read_bytes() == gzip.decompress(fake.export_bytes(result.request_id))
        assert result.path.read_bytes().startswith(b'"amplitude_id"')


@pytest.mark.looptime
async def test_progress_events(client: amp.CohortsClient, tmp_path: pathlib.Path) -> None:
    events: list[amp.ProgressEvent] = []
    await client.download_cohort("large", tmp_path, on_progress=events.append)
    phases = [e.phase for e in events]
    assert phases[0] == "requested"
    assert phases[-1] == "done"
    assert "polling" in phases
    assert "downloading" in phases
    downloading = [e for e in events if e.phase == "downloading"]
    assert downloading[-1].bytes_done == downloading[-1].bytes_total == events[-1].bytes_done
    assert {e.cohort_id for e in events} == {"large"}


@pytest.mark.looptime
async def test_waiting_events_say_how_long(fake: FakeAmplitude, tmp_path: pathlib.Path) -> None:
    ids = [fake.add_cohort(size=2).id for _ in range(5)]
    events: list[amp.ProgressEvent] = []
    async with client_for(fake) as client:
        await client.download_cohorts(ids, tmp_path, on_progress=events.append)
    waits = [e for e in events if e.phase == "waiting"]
    assert waits
    assert waits[0].cohort_id == ids[4]
    assert waits[0].wait_seconds is not None
    assert 55 < waits[0].wait_seconds <= 60.01
    assert [e.phase for e in events[:5]] == ["queued"] * 5


@pytest.mark.looptime
async def test_a_failing_progress_callback_does_not_break_the_download(
    client: amp.CohortsClient, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(event: amp.ProgressEvent) -> None:
        raise RuntimeError("callback bug")

    result = await client.download_cohort("small", tmp_path, on_progress=explode)
    assert result.path.exists()
    assert "on_progress callback raised" in caplog.text


@pytest.mark.looptime
async def test_job_deadline(fake: FakeAmplitude, tmp_path: pathlib.Path) -> None:
    fake.never_finish.add("small")
    async with client_for(fake, poll=amp.PollPolicy(deadline=300)) as client:
        started = anyio.current_time()
        with pytest.raises(amp.CohortJobError, match="not finished after 300s"):
            await client.download_cohort("small", tmp_path)
        assert 300 <= anyio.current_time() - started <= 301
    polls = fake.requests_to("status")
    gaps = [b.time - a.time for a, b in itertools.pairwise(polls)]
    assert max(gaps) <= 30 * 1.2 + 0.01  # the interval grows to max_interval, with jitter
    assert gaps[1] > gaps[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.looptime
async def test_failed_job(fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
                          ) -> None:
    fake.failing_jobs.add("small")
    with pytest.raises(amp.CohortJobError, match="JOB FAILED"):
        await client.download_cohort("small", tmp_path)


@pytest.mark.looptime
async def test_unsafe_cohort_ids_stay_inside_the_directory(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    names = []
    for cohort_id in ("../../x", "/etc/passwd", "a b", "x"):
        fake.add_cohort(cohort_id, size=2)
        result = await client.download_cohort(cohort_id, target)
        assert result.path.parent == target
        names.append(result.path.name)
    assert len(set(names)) == 4
    assert names[3] == "x.csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.looptime
async def test_an_existing_file_is_replaced_only_when_complete(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    target = tmp_path / "large.csv"
    target.write_bytes(b"previous contents")
    fake.inject("s3", "cut", after_bytes=100, times=10)
    with pytest.raises(amp.DownloadError):
        async with client_for(fake, retry=amp.RetryPolicy(max_attempts=2)) as limited:
            await limited.download_cohort("large", target)
    assert target.read_bytes() == b"previous contents"
    assert leftovers(tmp_path) == []


@pytest.mark.looptime
async def test_disk_full_leaves_nothing(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class FullDisk:
        def __init__(self, path: pathlib.Path) -> None:
            self.file = open(path, "xb")  # noqa: SIM115
            self.closed = False

        def write(self, data: bytes) -> int:
            if self.file.tell() + len(data) > 50_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.file, name)

        def close(self) -> None:
            self.closed = True
            self.file.close()

    monkeypatch.setattr(files_module, "_open_temp", FullDisk)
    with pytest.raises(amp.DownloadError, match="No space left"):
        await client.download_cohort("large", tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.looptime
@pytest.mark.parametrize("seed", range(8))
async def test_cancellation_at_random_points_leaves_nothing(
    tmp_path: pathlib.Path, seed: int
) -> None:
    with FakeAmplitude(job_duration=5.0, latency=0.2) as fake:
        fake.add_cohort("large", size=20_000)
        fake.inject("s3", "slow", delay=2.0)  # the transfer itself takes ~8 s
        async with client_for(fake) as client:
            with anyio.move_on_after(random.Random(seed).uniform(0.0, 12.0)) as scope:
                await client.download_cohort("large", tmp_path)
            assert scope.cancelled_caught
            assert list(tmp_path.iterdir()) == []
            assert client.scheduler.gate.in_use == 0
            # the client is still usable after a cancelled download
            result = await client.download_cohort("large", tmp_path)
    assert result.path.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.looptime
async def test_batch_outcomes_in_order_and_isolated(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    fake.failing_jobs.add("large")
    outcomes = await client.download_cohorts(["small", "missing", "large", "small"], tmp_path)
    assert [o.cohort_id for o in outcomes] == ["small", "missing", "large", "small"]
    assert outcomes[0].ok
    assert outcomes[3].result == outcomes[0].result
    assert isinstance(outcomes[1].error, amp.NotFoundError)
    assert isinstance(outcomes[2].error, amp.CohortJobError)
    assert fake.cohort_requests == 2  # small once (deduplicated), large once


@pytest.mark.looptime
async def test_resume_after_a_crash_spends_no_quota(fake: FakeAmplitude, tmp_path: pathlib.Path
                                                    ) -> None:
    fake.job_duration = 20.0
    ids = [fake.add_cohort(size=50).id for _ in range(10)]
    async with client_for(fake) as client:
        # Crash (cancel) mid-batch: 4 files done (requested at 0), 4 requested at 60 but not
        # downloaded, 2 never requested (their window opens at 120).
        with anyio.move_on_after(75):
            await client.download_cohorts(ids, tmp_path)
    journal = json.loads((tmp_path / ".amp-cohorts-journal.json").read_text())
    done_before = [e for e in journal["entries"].values() if e["sha256"]]
    assert len(done_before) == 4
    assert fake.cohort_requests == 8
    async with client_for(fake) as client:
        outcomes = await client.download_cohorts(ids, tmp_path, resume=True)
    assert all(o.ok for o in outcomes)
    assert fake.cohort_requests == 10  # only the two never requested before
    for outcome in outcomes:
        assert outcome.result is not None
        data = outcome.result.path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == outcome.result.sha256
    assert leftovers(tmp_path) == []


@pytest.mark.looptime
async def test_resume_redownloads_a_tampered_file_without_new_request(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    [first] = await client.download_cohorts(["small"], tmp_path)
    assert first.result is not None
    first.result.path.write_text("tampered")
    [second] = await client.download_cohorts(["small"], tmp_path, resume=True)
    assert second.result is not None
    assert second.result.sha256 == first.result.sha256
    # The file itself, not only the journal's record of it, is the export again.
    assert hashlib.sha256(second.result.path.read_bytes()).hexdigest() == first.result.sha256
    assert fake.cohort_requests == 1


@pytest.mark.looptime
async def test_fresh_exports_by_default(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    await client.download_cohorts(["small"], tmp_path)
    await client.download_cohorts(["small"], tmp_path)  # a daily job: fresh data again
    assert fake.cohort_requests == 2
    await client.download_cohorts(["small"], tmp_path, resume=True)
    assert fake.cohort_requests == 2  # continuing: the verified file is kept


@pytest.mark.looptime
async def test_resume_retries_only_what_failed(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    ids = [fake.add_cohort(f"r{i}", size=10).id for i in range(8)]
    for failing in ids[:3]:
        fake.failing_jobs.add(failing)
    first = await client.download_cohorts(ids, tmp_path)
    assert sum(not o.ok for o in first) == 3
    fake.failing_jobs.clear()
    spent = fake.cohort_requests
    second = await client.download_cohorts(ids, tmp_path, resume=True)
    assert all(o.ok for o in second)
    assert fake.cohort_requests - spent == 3  # 3 units to complete the batch, not 8


class MovableClock:
    """A wall clock a test moves forward (journal ages, calendar months)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.mark.looptime
async def test_stale_request_ids_are_not_reused(
    fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    clock = MovableClock()
    async with client_for(fake, wall_clock=clock) as client:
        with anyio.move_on_after(5):  # requested, not yet downloaded
            await client.download_cohorts(["small"], tmp_path)
        clock.now += timedelta(days=6, minutes=1)
        await client.download_cohorts(["small"], tmp_path, resume=True)
    assert fake.cohort_requests == 2


async def test_download_over_real_sockets(fake: FakeAmplitude, tmp_path: pathlib.Path) -> None:
    fake.job_duration = 0.0
    fake.inject("s3", "cut", after_bytes=100_000)
    async with fake.serve() as base_url:
        async with amp.CohortsClient(fake.api_key, fake.secret_key, base_url=base_url,
                                     poll=amp.PollPolicy(initial_interval=0.01)) as client:
            request = await client.request_cohort("large")
            status = await client.get_request_status(request.request_id)
            assert status.done
            result = await client.download_file(request.request_id, tmp_path / "l.csv")
    assert result.path.read_bytes() == fake.export_bytes(request.request_id)
    s3 = fake.requests_to("s3")
    assert [e.status for e in s3] == [200, 206]
    assert all("authorization" not in e.headers for e in s3)


@pytest.mark.parametrize("bad", ["", 3, None, "/proc/no-such-dir/"])
async def test_bad_destinations(client: amp.CohortsClient, fake: FakeAmplitude, bad: Any) -> None:
    with pytest.raises(amp.InvalidRequestError):
        await client.download_cohort("small", bad)
    assert fake.log == []


async def test_bad_batch_arguments(client: amp.CohortsClient, fake: FakeAmplitude,
                                   tmp_path: pathlib.Path) -> None:
    for call in (
        lambda: client.download_cohorts("small", tmp_path),
        lambda: client.download_cohorts(["ok", None], tmp_path),  # type: ignore[list-item]
        lambda: client.download_cohorts(["small"], "/proc/no-such-dir"),
        lambda: client.download_cohorts(["small"], tmp_path, prop_keys=["x"]),
    ):
        with pytest.raises(amp.InvalidRequestError):
            await call()
    assert fake.log == []


@pytest.mark.looptime
async def test_known_sizes_start_the_largest_first(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    add_sized(fake, [5, 50, 20, 40, 10, 30])
    cohorts = [c for c in await client.list_cohorts() if c.id[1:].isdigit()]
    outcomes = await client.download_cohorts(cohorts, tmp_path)
    assert [o.cohort_id for o in outcomes] == [c.id for c in cohorts]  # input order kept
    assert requested_order(fake) == ["s1", "s3", "s5", "s2", "s4", "s0"]


def add_sized(fake: FakeAmplitude, sizes: list[int]) -> list[str]:
    return [fake.add_cohort(f"s{i}", size=size).id for i, size in enumerate(sizes)]


def requested_order(fake: FakeAmplitude) -> list[str]:
    """The cohorts in the order their export was requested."""
    return [e.path.rsplit("/", 1)[1] for e in fake.requests_to("request")]


@pytest.mark.looptime
async def test_given_ids_one_list_call_orders_the_batch_by_size(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    ids = add_sized(fake, [5, 50, 20, 40, 10, 30])
    outcomes = await client.download_cohorts(ids, tmp_path)
    assert [o.cohort_id for o in outcomes] == ids
    assert len(fake.requests_to("list")) == 1  # costs no quota
    assert requested_order(fake) == ["s1", "s3", "s5", "s2", "s4", "s0"]


@pytest.mark.looptime
async def test_a_batch_still_runs_when_the_list_fails(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    ids = add_sized(fake, [5, 50])
    fake.inject("list", "status", status=403, times=1)  # e.g. a key that may not list
    outcomes = await client.download_cohorts(ids, tmp_path)
    assert all(o.ok for o in outcomes)
    assert requested_order(fake) == ["s0", "s1"]  # input order


@pytest.mark.parametrize(
    ("kind", "gzip"), [("truncate", False), ("cut", True), ("expired_link", False)]
)
async def test_faults_over_real_sockets(tmp_path: pathlib.Path, kind: Any, gzip: bool) -> None:
    """A short body over a real connection is a protocol error, not a silent short file."""
    with FakeAmplitude(gzip=gzip) as fake:
        fake.add_cohort("large", size=20_000)
        endpoint = "file" if kind == "expired_link" else "s3"
        fake.inject(endpoint, kind, after_bytes=50_000)
        async with fake.serve() as base_url:
            async with amp.CohortsClient(fake.api_key, fake.secret_key, base_url=base_url,
                                         poll=amp.PollPolicy(initial_interval=0.01),
                                         download=amp.DownloadPolicy(count_members=True)
                                         ) as client:
                result = await client.download_cohort("large", tmp_path)
        stored = fake.export_bytes(result.request_id)
    import gzip as gzip_module

    expected = gzip_module.decompress(stored) if gzip else stored
    assert result.path.read_bytes() == expected
    assert result.members == 20_000  # counted once across the resumed pieces
    assert [e.status for e in fake.requests_to("s3")][-1] in (200, 206)
    assert leftovers(tmp_path) == []


@pytest.mark.looptime
async def test_finished_files_older_than_the_ttl_are_exported_again(
    fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    clock = MovableClock()
    async with client_for(fake, wall_clock=clock) as client:
        await client.download_cohorts(["small"], tmp_path)
        clock.now += timedelta(days=5)
        await client.download_cohorts(["small"], tmp_path, resume=True)
        assert fake.cohort_requests == 1  # fresh enough: skipped
        clock.now += timedelta(days=2)
        await client.download_cohorts(["small"], tmp_path, resume=True)
    assert fake.cohort_requests == 2


@pytest.mark.looptime
async def test_missing_destination_directories_are_created(
    client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    (outcome,) = await client.download_cohorts(["small"], tmp_path / "a" / "b")
    assert outcome.result is not None
    assert outcome.result.path == tmp_path / "a" / "b" / "small.csv"
    result = await client.download_cohort("small", f"{tmp_path}/c/d/")
    assert result.path == tmp_path / "c" / "d" / "small.csv"


@pytest.mark.looptime
@pytest.mark.parametrize("gzip", [False, True])
async def test_members_are_counted_as_the_file_is_written(
    tmp_path: pathlib.Path, gzip: bool
) -> None:
    with FakeAmplitude(gzip=gzip, inline_threshold=2048) as fake:
        fake.add_cohort("inline", size=7)
        fake.add_cohort("big", size=30_000, properties=("city",))  # through S3, many reads
        counting = amp.DownloadPolicy(count_members=True)
        async with client_for(fake, download=counting) as client:
            small = await client.download_cohort("inline", tmp_path)
            big = await client.download_cohort("big", tmp_path, props=True)
        async with client_for(fake) as client:  # by default, not counted
            plain = await client.download_cohort("big", tmp_path / "plain/", props=True)
    assert small.members == 7
    assert big.members == 30_000
    assert plain.members is None
    assert plain.sha256 == big.sha256


@pytest.mark.looptime
async def test_a_long_wait_is_announced_again_as_it_runs_down(
    fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    ids = [fake.add_cohort(size=2).id for _ in range(5)]  # the fifth waits ~60 s for the window
    events: list[amp.ProgressEvent] = []
    async with client_for(fake) as client:
        await client.download_cohorts(ids, tmp_path, on_progress=events.append)
    waits = [e for e in events if e.cohort_id == ids[4] and e.phase == "waiting"]
    assert len(waits) >= 10  # every few seconds, not once
    left = [e.wait_seconds for e in waits if e.wait_seconds is not None]
    assert left == sorted(left, reverse=True)  # time left, running down
    assert left[0] > 50
    assert left[-1] < 6
    assert {e.wait_reason for e in waits} == {"limits"}
