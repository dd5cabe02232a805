"""amp-cohorts sync --diff: who entered and who left, beside each copy the run downloaded."""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import AsyncIterator

import anyio
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async._models import ExportOptions
from amp_cohorts_async._store import DirectoryStore
from amp_cohorts_async.cli._sync_diff import SyncDiff, diff_downloads
from amp_cohorts_async.testing import FakeAmplitude

from .test_cli import cli
from .test_sync import export_of

# Amplitude's limits 100 times faster, in the emulator and the client alike: a third sync's
# requests need not wait for the minute's window.
SCALE = "0.01"
HEADER = "cohort\taction\tlast computed\tmembers\tsize\tentering\texiting"


@pytest.fixture
async def emulator(fake: FakeAmplitude) -> AsyncIterator[tuple[FakeAmplitude, str]]:
    fake.job_duration = 0.2
    fake.limits = amp.Limits().time_scaled(float(SCALE))
    fake.add_cohort("teams", size=12, group_type="org")
    async with fake.serve() as base_url:
        yield fake, base_url


def keys_of(path: pathlib.Path, key: str) -> set[str]:
    with path.open(encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    return {row[key].lstrip("\t") for row in rows}


def version_of(directory: pathlib.Path, cohort_id: str) -> pathlib.Path:
    (version,) = (directory / "versions" / cohort_id).iterdir()
    return version


def rows_by_cohort(out: str, header: str = HEADER) -> dict[str, list[str]]:
    """The summary table's rows by cohort (progress lines come before the header; the quota
    line ends the table)."""
    lines = out.splitlines()
    start = lines.index(header)
    end = next(i for i, line in enumerate(lines) if " spent" in line)
    return {line.split("\t")[0]: line.split("\t") for line in lines[start + 1:end]}


async def sync(emulator: tuple[FakeAmplitude, str], directory: pathlib.Path, *args: str
               ) -> tuple[int, str, str]:
    return await cli(emulator, "sync", str(directory), "small", "teams", *args,
                     "--poll-interval", "0.1", "--time-scale", SCALE)


async def test_a_second_sync_writes_exactly_what_changed_and_nothing_for_the_unchanged(
    emulator: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    fake, _ = emulator
    fake.add_cohort("still", size=5)
    code, _, err = await sync(emulator, tmp_path, "still")  # no --diff: copies only
    assert code == 0, err
    fake.touch("small", churn=0.2)
    fake.touch("teams", churn=0.3)
    code, out, err = await sync(emulator, tmp_path, "still", "--diff")
    assert code == 0, err
    rows = rows_by_cohort(out)
    assert rows["still"][1:2] + rows["still"][5:] == ["unchanged", "-", "-"]
    assert not (tmp_path / "still.diff").exists()
    for cohort_id, key in (("small", "amplitude_id"), ("teams", "group_id")):
        before = keys_of(version_of(tmp_path, cohort_id), key)
        after = keys_of(tmp_path / f"{cohort_id}.csv", key)
        entering = keys_of(tmp_path / f"{cohort_id}.diff" / "entering.csv", key)
        exiting = keys_of(tmp_path / f"{cohort_id}.diff" / "exiting.csv", key)
        assert entering == after - before
        assert exiting == before - after
        assert entering
        assert exiting
        assert rows[cohort_id][1] == "downloaded"
        assert rows[cohort_id][5:] == [str(len(entering)), str(len(exiting))]
    assert "no earlier version" not in out

    fake.touch("teams")
    code, out, err = await cli(emulator, "sync", str(tmp_path), "small", "teams", "large",
                               "--diff", "--poll-interval", "0.1", "--time-scale", SCALE)
    assert code == 0, err
    rows = rows_by_cohort(out)
    assert rows["small"][1:2] + rows["small"][5:] == ["unchanged", "-", "-"]
    assert rows["large"][1:2] + rows["large"][5:] == ["downloaded", "20,000", "0"]
    assert "large: no earlier version to compare with; every member counts as entering" in out
    # The unchanged cohort's files are still those of its last change; the others are new.
    assert keys_of(tmp_path / "small.diff" / "entering.csv", "amplitude_id") == entering_small(
        tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".diff") == [
        "large.diff", "small.diff", "teams.diff"]


def entering_small(directory: pathlib.Path) -> set[str]:
    return (keys_of(directory / "small.csv", "amplitude_id")
            - keys_of(version_of(directory, "small"), "amplitude_id"))


async def test_the_first_copy_enters_whole_and_json_carries_each_diff(
    emulator: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    code, out, err = await sync(emulator, tmp_path, "--diff", "--json")
    assert code == 0, err
    entries = {e["cohort_id"]: e for e in json.loads(out)["entries"]}
    small = entries["small"]["diff"]
    assert (small["entering"], small["exiting"], small["unchanged"]) == (25, 0, 0)
    assert small["key"] == "amplitude_id"
    assert entries["teams"]["diff"]["key"] == "group_id"
    assert keys_of(pathlib.Path(small["entering_path"]), "amplitude_id") == keys_of(
        tmp_path / "small.csv", "amplitude_id")
    assert pathlib.Path(small["exiting_path"]).read_text().count("\n") == 1  # header only

    code, out, err = await sync(emulator, tmp_path, "--diff", "--json")
    assert code == 0, err
    assert [e["diff"] for e in json.loads(out)["entries"]] == [None, None]


async def test_a_failed_diff_keeps_the_new_copy_synced_and_removes_the_stale_diff(
    emulator: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    fake, _ = emulator
    code, _, err = await sync(emulator, tmp_path, "--diff")
    assert code == 0, err
    stale = tmp_path / "small.diff"
    (stale / "entering.csv").unlink()
    (stale / "entering.csv").mkdir()  # in the way of the new entering.csv
    fake.touch("small")
    fake.touch("teams")
    code, out, err = await sync(emulator, tmp_path, "--diff")
    assert code == 1, err
    rows = rows_by_cohort(out)
    assert rows["small"][1] == "downloaded"
    assert rows["small"][5].startswith("diff failed: ")
    assert rows["teams"][5:] != ["-", "-"]
    assert not (stale / "exiting.csv").exists()  # the previous change's: no longer true
    assert (tmp_path / "small.csv").read_bytes() == export_of(fake, "small")  # the new one

    code, out, err = await sync(emulator, tmp_path)
    assert code == 0, err
    rows = rows_by_cohort(out, HEADER.rsplit("\tentering", 1)[0])
    assert [row[1] for row in rows.values()] == ["unchanged", "unchanged"]
    assert fake.cohort_requests == 4


async def test_diff_needs_a_kept_version(
    emulator: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    fake, _ = emulator
    code, _, err = await sync(emulator, tmp_path, "--diff", "--keep-versions", "1")
    assert code == 2
    assert "--keep-versions 2 or more" in err
    assert fake.cohort_requests == 0


@pytest.mark.looptime
async def test_overlapping_runs_diff_one_copy_at_a_time_and_only_the_copy_in_place(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    export = ExportOptions(props=False, prop_keys=())
    await client.sync_cohorts(["small"], tmp_path)
    fake.touch("small")
    replaced = await client.sync_cohorts(["small"], tmp_path)
    fake.touch("small")
    current = await client.sync_cohorts(["small"], tmp_path)
    assert [e.action for e in replaced.entries + current.entries] == ["downloaded"] * 2

    # The first of the two runs diffs late: the copy it downloaded is gone, its version pruned.
    assert await diff_downloads(replaced, tmp_path, export) == {
        "small": SyncDiff(None, replaced=True)}
    assert not (tmp_path / "small.diff").exists()

    # While another run holds the cohort (exporting it, or diffing it), the diff waits.
    taken, release = anyio.Event(), anyio.Event()

    async def hold() -> None:
        async with DirectoryStore(tmp_path).cohort_lock("small"):
            taken.set()
            await release.wait()

    async with anyio.create_task_group() as group:
        group.start_soon(hold)
        await taken.wait()
        done: dict[str, SyncDiff] = {}

        async def diff() -> None:
            done.update(await diff_downloads(current, tmp_path, export))

        group.start_soon(diff)
        await anyio.sleep(0.5)
        assert not done
        assert not (tmp_path / "small.diff").exists()
        release.set()
    diff_of_small = done["small"].diff
    assert diff_of_small is not None
    (previous,) = (tmp_path / "versions" / "small").iterdir()
    assert keys_of(diff_of_small.entering_path, "amplitude_id") == (
        keys_of(tmp_path / "small.csv", "amplitude_id") - keys_of(previous, "amplitude_id"))
