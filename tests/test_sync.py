"""sync_cohorts on the emulator: every action, the budget order, dry runs, versions, and
overlapping runs that spend one request per change in all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import signal
import sys
import tempfile

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude, run_in_virtual_time
from amp_cohorts_async.testing._data import render_export

from .conftest import FAST_POLL
from .test_store import FAST, RELAXED, WORKER, journal_entries, run_workers


def export_of(fake: FakeAmplitude, cohort_id: str) -> bytes:
    """The bytes an export of the cohort as it is now would hold (no props)."""
    rendered = render_export(fake.cohorts[cohort_id].snapshot(), props=False, prop_keys=(),
                             gzip_level=None)
    return rendered.read()


def actions(report: amp.SyncReport) -> dict[str, str]:
    return {entry.cohort_id: entry.action for entry in report.entries}


def calls(fake: FakeAmplitude, endpoint: str) -> int:
    return len(fake.requests_to(endpoint))


@pytest.fixture
def ids(fake: FakeAmplitude) -> list[str]:
    return [fake.add_cohort(f"c{i}", size=20 + i).id for i in range(4)]


@pytest.mark.looptime
async def test_a_second_run_with_nothing_changed_sends_no_cohort_request(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path, ids: list[str]
) -> None:
    first = await client.sync_cohorts(ids, tmp_path)
    assert set(actions(first).values()) == {"downloaded"}
    assert first.requests_spent == fake.cohort_requests == 4
    assert first.quota_remaining == 496
    for entry in first.entries:
        assert entry.path == tmp_path / f"{entry.cohort_id}.csv"
        assert entry.path.read_bytes() == export_of(fake, entry.cohort_id)
        assert entry.previous_path is None
        assert entry.last_computed is not None

    lists, usages, logged = calls(fake, "list"), calls(fake, "usage"), len(fake.log)
    second = await client.sync_cohorts(ids, tmp_path)
    assert set(actions(second).values()) == {"unchanged"}
    assert second.requests_spent == 0
    assert fake.cohort_requests == 4
    # A night where nothing changed costs one list call and one usage call, nothing else.
    assert (calls(fake, "list") - lists, calls(fake, "usage") - usages) == (1, 1)
    assert len(fake.log) == logged + 2
    assert [e.path for e in second.entries] == [e.path for e in first.entries]


@pytest.mark.looptime
async def test_one_touched_cohort_costs_exactly_one_request_and_keeps_a_version(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path, ids: list[str]
) -> None:
    await client.sync_cohorts(ids, tmp_path)
    before = (tmp_path / "c2.csv").read_bytes()
    fake.touch("c2")
    report = await client.sync_cohorts(ids, tmp_path)
    assert actions(report) == {"c0": "unchanged", "c1": "unchanged", "c2": "downloaded",
                               "c3": "unchanged"}
    assert report.requests_spent == 1
    assert fake.cohort_requests == 5
    entry = report.entries[2]
    assert entry.path is not None
    assert entry.path.read_bytes() == export_of(fake, "c2") != before
    assert entry.last_computed is not None
    assert int(entry.last_computed.timestamp()) == fake.cohorts["c2"].last_computed
    # The version before this run is kept beside, as a second name of the old file.
    assert entry.previous_path is not None
    assert entry.previous_path.read_bytes() == before
    assert entry.previous_path.parent == tmp_path / "versions" / "c2"
    assert entry.result is not None
    assert entry.result.sha256 == hashlib.sha256(export_of(fake, "c2")).hexdigest()
    # And the next run finds the new copy unchanged.
    assert set(actions(await client.sync_cohorts(ids, tmp_path)).values()) == {"unchanged"}
    assert fake.cohort_requests == 5


@pytest.mark.looptime
async def test_versions_are_hard_links_and_only_keep_versions_are_kept(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    fake.add_cohort("v", size=30)
    await client.sync_cohorts(["v"], tmp_path, keep_versions=3)
    exports = [export_of(fake, "v")]
    inode = os.stat(tmp_path / "v.csv").st_ino
    for _ in range(3):
        fake.touch("v")
        report = await client.sync_cohorts(["v"], tmp_path, keep_versions=3)
        exports.append(export_of(fake, "v"))
        assert report.entries[0].action == "downloaded"
    previous = report.entries[0].previous_path
    assert previous is not None
    kept = sorted((tmp_path / "versions" / "v").iterdir())
    # The current copy plus two versions: the two exports before it, oldest pruned.
    assert sorted(p.read_bytes() for p in kept) == sorted(exports[1:3])
    assert previous.read_bytes() == exports[2]
    assert os.stat(previous).st_nlink == 1  # its own file now: the current one was replaced
    assert inode not in {os.stat(p).st_ino for p in kept}  # the first export was pruned
    fake.touch("v")
    await client.sync_cohorts(["v"], tmp_path, keep_versions=1)
    assert list((tmp_path / "versions" / "v").iterdir()) == []


@pytest.mark.looptime
async def test_a_version_is_a_link_not_a_copy(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    fake.add_cohort("v", size=30)
    await client.sync_cohorts(["v"], tmp_path)
    old_inode = os.stat(tmp_path / "v.csv").st_ino
    fake.touch("v")
    (entry,) = (await client.sync_cohorts(["v"], tmp_path)).entries
    assert entry.previous_path is not None
    assert os.stat(entry.previous_path).st_ino == old_inode


@pytest.mark.looptime
async def test_too_large_and_missing_cohorts_cost_nothing(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    fake.add_cohort("huge", size=2_000_001)
    report = await client.sync_cohorts(["huge", "nowhere", "small"], tmp_path)
    assert actions(report) == {"huge": "too_large", "nowhere": "missing",
                               "small": "downloaded"}
    assert fake.cohort_requests == 1
    assert fake.violations == []
    assert report.entries[0].path is None
    assert report.entries[1].last_computed is None


@pytest.mark.looptime
async def test_the_budget_takes_never_synced_first_then_the_oldest_copy(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    for cohort_id, computed in (("old", 1_000_000_000), ("new", 1_500_000_000)):
        fake.add_cohort(cohort_id, size=10, last_computed=computed)
    await client.sync_cohorts(["old", "new"], tmp_path)
    fake.touch("old")
    fake.touch("new")
    fake.add_cohort("fresh1", size=10)
    fake.add_cohort("fresh2", size=10)
    order = ["new", "old", "fresh1", "fresh2"]
    spent = fake.cohort_requests

    report = await client.sync_cohorts(order, tmp_path, max_requests=3)
    assert actions(report) == {"fresh1": "downloaded", "fresh2": "downloaded",
                               "old": "downloaded", "new": "over_budget"}
    assert fake.cohort_requests - spent == 3
    # An over-budget cohort still names the copy it has.
    assert report.entries[0].path == tmp_path / "new.csv"
    assert report.entries[0].path.exists()


@pytest.mark.looptime
async def test_the_quota_left_bounds_the_run(tmp_path: pathlib.Path) -> None:
    with FakeAmplitude(usage=498) as fake:
        for i in range(4):
            fake.add_cohort(f"q{i}", size=5)
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     poll=FAST_POLL) as client:
            report = await client.sync_cohorts([f"q{i}" for i in range(4)], tmp_path)
    assert [e.action for e in report.entries] == ["downloaded", "downloaded", "over_budget",
                                                  "over_budget"]
    assert report.requests_spent == 2
    assert report.quota_remaining == 0
    assert fake.violations == []


@pytest.mark.looptime
async def test_a_dry_run_requests_nothing_and_says_what_a_run_would_spend(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path, ids: list[str]
) -> None:
    await client.sync_cohorts(ids[:2], tmp_path)
    fake.touch("c0")
    spent = fake.cohort_requests
    report = await client.sync_cohorts(ids, tmp_path, dry_run=True, max_requests=2)
    assert actions(report) == {"c0": "over_budget", "c1": "unchanged", "c2": "planned",
                               "c3": "planned"}
    assert fake.cohort_requests == spent
    assert report.requests_spent == 0
    assert report.quota_remaining == 500 - spent - 2  # what would be left
    assert not (tmp_path / "c2.csv").exists()
    # A dry run into a directory that does not exist yet creates nothing.
    nowhere = tmp_path / "not-yet"
    report = await client.sync_cohorts(ids, nowhere, dry_run=True)
    assert set(actions(report).values()) == {"planned"}
    assert not nowhere.exists()


@pytest.mark.looptime
async def test_a_failed_export_keeps_the_old_copy_and_no_stray_version(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    await client.sync_cohorts(["small"], tmp_path)
    before = (tmp_path / "small.csv").read_bytes()
    fake.touch("small")
    fake.failing_jobs.add("small")
    (entry,) = (await client.sync_cohorts(["small"], tmp_path)).entries
    assert entry.action == "failed"
    assert isinstance(entry.error, amp.CohortJobError)
    assert entry.path == tmp_path / "small.csv"
    assert entry.path.read_bytes() == before
    assert entry.previous_path is None
    assert list((tmp_path / "versions" / "small").iterdir()) == []
    fake.failing_jobs.clear()
    (entry,) = (await client.sync_cohorts(["small"], tmp_path)).entries
    assert entry.action == "downloaded"
    assert entry.previous_path is not None
    assert entry.previous_path.read_bytes() == before


@pytest.mark.looptime
async def test_two_concurrent_runs_spend_one_request_per_change(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path, ids: list[str]
) -> None:
    await client.sync_cohorts(ids, tmp_path)
    fake.touch("c1")
    fake.touch("c3")
    spent = fake.cohort_requests
    reports: list[amp.SyncReport] = []

    async def run() -> None:
        async with amp.CohortsClient(fake.api_key, fake.secret_key,
                                     transport=fake.transport(), poll=FAST_POLL) as other:
            reports.append(await other.sync_cohorts(ids, tmp_path))

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        group.start_soon(run)
    assert fake.cohort_requests - spent == 2
    assert sum(r.requests_spent for r in reports) == 2
    for cohort_id in ("c1", "c3"):
        # One run exported it; the other waited for that copy and found it unchanged.
        assert sorted(actions(r)[cohort_id] for r in reports) == ["downloaded", "unchanged"]
        assert (tmp_path / f"{cohort_id}.csv").read_bytes() == export_of(fake, cohort_id)


@pytest.mark.looptime
async def test_a_cohort_without_last_computed_is_never_unchanged(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    fake.add_cohort("undated", size=5, lastComputed=None)
    await client.sync_cohorts(["undated"], tmp_path)
    report = await client.sync_cohorts(["undated"], tmp_path)
    assert report.entries[0].action == "downloaded"
    assert fake.cohort_requests == 2


@pytest.mark.looptime
async def test_props_and_prop_keys_are_part_of_what_is_unchanged(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    await client.sync_cohorts(["small"], tmp_path)
    report = await client.sync_cohorts(["small"], tmp_path, props=True, prop_keys=["city"])
    assert report.entries[0].action == "downloaded"
    assert fake.cohort_requests == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_requests": -1}, "max_requests"),
        ({"max_requests": True}, "max_requests"),
        ({"keep_versions": 0}, "keep_versions"),
        ({"dry_run": "yes"}, "dry_run"),
        ({"prop_keys": ["city"]}, "prop_keys needs props"),
    ],
)
async def test_bad_arguments_are_refused_before_any_request(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path,
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(amp.InvalidRequestError, match=message):
        await client.sync_cohorts(["small"], tmp_path, **kwargs)  # type: ignore[arg-type]
    assert fake.log == []


# -- several processes, and a killed run -------------------------------------------------------

async def test_two_processes_syncing_one_directory_spend_one_request_per_change(
    tmp_path: pathlib.Path
) -> None:
    with FakeAmplitude(limits=RELAXED, job_duration=0.3) as fake:
        ids = [fake.add_cohort(f"p{i}", size=20).id for i in range(6)]
        async with fake.serve() as base_url:
            first = await run_workers("sync", base_url, tmp_path, [ids, ids[::-1]])
            assert fake.cohort_requests == 6  # never synced: one request each, in all
            assert sum(r["spent"] for r in first) == 6
            for cohort_id in ids:
                assert sorted(r["actions"][cohort_id] for r in first) == ["downloaded",
                                                                          "unchanged"]
            for cohort_id in ids[:4]:
                fake.touch(cohort_id)
            second = await run_workers("sync", base_url, tmp_path, [ids, ids[::-1]])
    assert fake.cohort_requests == 10  # one per change, whoever ran
    assert sum(r["spent"] for r in second) == 4
    assert all(r["errors"] == [] for r in first + second)
    for cohort_id in ids:
        assert (tmp_path / f"{cohort_id}.csv").read_bytes() == export_of(fake, cohort_id)


async def test_a_sync_killed_midway_then_a_new_sync_spends_only_for_what_was_not_requested(
    tmp_path: pathlib.Path
) -> None:
    with FakeAmplitude(limits=RELAXED, job_duration=0.2) as fake:
        ids = [fake.add_cohort(f"k{i}", size=20).id for i in range(8)]
        async with fake.serve() as base_url:
            process = await anyio.open_process(
                [sys.executable, str(WORKER), "sync", base_url, str(tmp_path), *ids],
                env={**os.environ, "AMP_TEST_RATE": "2"})
            try:
                assert process.stdin is not None
                assert process.stdout is not None
                assert (await process.stdout.receive()).startswith(b"ready")
                await process.stdin.send(b"go\n")
                with anyio.fail_after(30):
                    while fake.cohort_requests < 4:
                        await anyio.sleep(0.02)
                process.send_signal(signal.SIGKILL)
                await process.wait()
            finally:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.aclose()
            journaled = {c for c, e in journal_entries(tmp_path).items() if e["request_id"]}
            before = fake.cohort_requests
            # Killed between an answer and its journal entry, a request is lost to the next
            # run (Amplitude has no idempotency key): at most the two the rate lets through.
            assert 0 < len(journaled) <= before <= len(journaled) + 2
            async with amp.CohortsClient(fake.api_key, fake.secret_key, base_url=base_url,
                                         limits=RELAXED, poll=FAST) as client:
                report = await client.sync_cohorts(ids, tmp_path)
    # Requests made before the kill are fetched again at no quota; only the rest is paid.
    assert report.requests_spent == len(ids) - len(journaled)
    assert fake.cohort_requests == before + report.requests_spent
    assert {e.action for e in report.entries} <= {"downloaded", "unchanged"}
    for cohort_id in ids:
        assert (tmp_path / f"{cohort_id}.csv").read_bytes() == export_of(fake, cohort_id)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".part", ".tmp"))]


# -- the property: never more requests than changes ---------------------------------------------

step = st.one_of(
    st.tuples(st.just("touch"), st.integers(0, 3)),
    st.tuples(st.just("sync"), st.one_of(st.none(), st.integers(0, 3)), st.booleans()),
    st.tuples(st.just("crash"), st.floats(0.0, 40.0)),
    st.tuples(st.just("concurrent"), st.one_of(st.none(), st.integers(0, 3))),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=8))
def test_random_touches_syncs_crashes_and_overlaps_never_spend_more_than_the_changes(
    steps: list[tuple[object, ...]]
) -> None:
    """Random sequences of touches, syncs (some with budgets, some dry), crashes (a sync
    cancelled at a random moment) and two overlapping syncs: the requests spent never exceed
    the changes (each cohort's first copy and each touch) plus the requests whose answer was
    lost to a crash; every unchanged or downloaded file is the export of its last_computed."""
    ids = [f"h{i}" for i in range(4)]

    async def main() -> None:
        with tempfile.TemporaryDirectory() as scratch, FakeAmplitude(job_duration=5.0,
                                                                        seed=3) as fake:
            directory = pathlib.Path(scratch)
            exports: dict[tuple[str, int], bytes] = {}

            def remember(cohort_id: str) -> None:
                exports[(cohort_id, fake.cohorts[cohort_id].last_computed)] = export_of(
                    fake, cohort_id)

            for index, cohort_id in enumerate(ids):
                fake.add_cohort(cohort_id, size=5 + index, last_computed=1_700_000_000 + index)
                remember(cohort_id)
            lost = 0

            # One client, so every run obeys one set of limits (the overlapping runs too).
            client = amp.CohortsClient(fake.api_key, fake.secret_key,
                                       transport=fake.transport(), poll=FAST_POLL)

            async def sync(max_requests: int | None = None, dry_run: bool = False
                           ) -> amp.SyncReport:
                return await client.sync_cohorts(ids, directory, max_requests=max_requests,
                                                 dry_run=dry_run)

            def check(report: amp.SyncReport) -> None:
                for entry in report.entries:
                    if entry.action in ("unchanged", "downloaded"):
                        assert entry.path is not None
                        assert entry.last_computed is not None
                        key = (entry.cohort_id, int(entry.last_computed.timestamp()))
                        assert entry.path.read_bytes() == exports[key], entry

            async with client:
                for kind, *args in steps:
                    before = fake.cohort_requests
                    if kind == "touch":
                        cohort_id = ids[int(args[0])]  # type: ignore[call-overload]
                        fake.touch(cohort_id)
                        remember(cohort_id)
                    elif kind == "sync":
                        report = await sync(args[0], bool(args[1]))  # type: ignore[arg-type]
                        check(report)
                        if args[1]:
                            assert fake.cohort_requests == before
                    elif kind == "crash":
                        known = set(fake.jobs)
                        with anyio.move_on_after(float(args[0])):  # type: ignore[arg-type]
                            await sync()
                        journal = (journal_entries(directory)
                                   if (directory / ".amp-cohorts-journal.json").exists() else {})
                        recorded = {e.get(k) for e in journal.values()
                                    for k in ("request_id", "copy_request_id")}
                        lost += len(set(fake.jobs) - known - recorded)
                    else:
                        reports: list[amp.SyncReport] = []

                        async def run(into: list[amp.SyncReport], max_requests: object) -> None:
                            into.append(await sync(max_requests))  # type: ignore[arg-type]

                        async with anyio.create_task_group() as group:
                            group.start_soon(run, reports, args[0])
                            group.start_soon(run, reports, args[0])
                        for report in reports:
                            check(report)
                    changes = len(exports)
                    assert fake.cohort_requests <= changes + lost, (steps, lost)
            assert fake.violations == []

    run_in_virtual_time(main)
