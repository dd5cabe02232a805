"""diff_members where its other tests left a one-line break unnoticed: the key column a
header names twice, an export that is not UTF-8, and the two files it publishes: durable,
and not published once the caller is cancelled."""

from __future__ import annotations

import errno
import os
import pathlib
import time

import anyio
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async import _diff as diff_module
from amp_cohorts_async._partition import Partitioner, Side


def write(path: pathlib.Path, *lines: str) -> pathlib.Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("quoted", [True, False])  # read line by line / by csv.reader
async def test_a_key_column_named_twice_is_read_from_the_last_as_iter_members_does(
    tmp_path: pathlib.Path, quoted: bool,
) -> None:
    def line(*values: str) -> str:
        return ",".join(f'"{v}"' if quoted else v for v in values)

    header = line("amplitude_id", "city", "amplitude_id")
    old = write(tmp_path / "old.csv", header, line("9", "Paris", "1"), line("9", "Rome", "2"))
    new = write(tmp_path / "new.csv", header, line("9", "Paris", "1"), line("8", "Oslo", "3"))
    assert [row["amplitude_id"] async for row in amp.iter_members(new)] == ["1", "3"]

    diff = await amp.diff_members(old, new, tmp_path / "out")

    assert (diff.entering, diff.exiting, diff.unchanged) == (1, 1, 1)
    assert [row["city"] async for row in amp.iter_members(diff.entering_path)] == ["Oslo"]
    assert [row["city"] async for row in amp.iter_members(diff.exiting_path)] == ["Rome"]


async def test_a_disk_that_reports_full_at_the_fsync_of_an_output_fails_the_diff(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A network file system may say ENOSPC only at fsync: the diff must sync each file
    before it publishes it, or a truncated entering.csv would pass for a whole one."""
    real_fsync = os.fsync
    synced: list[str] = []

    def fsync(descriptor: int) -> None:
        name = os.readlink(f"/proc/self/fd/{descriptor}")
        synced.append(os.path.basename(name))
        if name.endswith("exiting.csv"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(descriptor)

    monkeypatch.setattr(diff_module.os, "fsync", fsync)
    old = write(tmp_path / "old.csv", '"amplitude_id"', '"1"', '"2"')
    new = write(tmp_path / "new.csv", '"amplitude_id"', '"2"', '"3"')
    out = tmp_path / "out"

    with pytest.raises(amp.DiskError) as caught:
        await amp.diff_members(old, new, out)

    assert caught.value.errno == errno.ENOSPC
    assert "entering.csv" in synced  # the other output was synced before it
    assert sorted(p.name for p in out.iterdir()) == []  # neither published, no work dir left


async def test_the_published_files_and_their_directory_are_synced(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_fsync = os.fsync
    synced: list[str] = []

    def fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(diff_module.os, "fsync", fsync)
    old = write(tmp_path / "old.csv", '"amplitude_id"', '"1"')
    new = write(tmp_path / "new.csv", '"amplitude_id"', '"2"')
    out = tmp_path / "out"
    out.mkdir()

    await amp.diff_members(old, new, out)

    names = [os.path.basename(path) for path in synced]
    assert names.count("entering.csv") == names.count("exiting.csv") == 1
    # The renames into out_dir are made durable after both files are.
    assert synced[-1] == str(out)


@pytest.mark.parametrize("side", ["old", "new"])
async def test_an_export_that_is_not_utf8_fails_the_diff_as_iter_members_fails(
    tmp_path: pathlib.Path, side: str,
) -> None:
    """Latin-1 where UTF-8 belongs (a corrupt or foreign file), in a later row that is
    otherwise plain: refused, as iter_members refuses it, rather than diffed byte for byte."""
    good = b'"amplitude_id","user_id"\n"2","b"\n'
    bad = b'"amplitude_id","user_id"\n"2","b"\n"1","caf\xe9"\n'
    (tmp_path / "old.csv").write_bytes(bad if side == "old" else good)
    (tmp_path / "new.csv").write_bytes(bad if side == "new" else good)
    with pytest.raises(amp.ResponseValidationError, match="not a readable cohort export"):
        [row async for row in amp.iter_members(tmp_path / f"{side}.csv")]
    out = tmp_path / "out"

    with pytest.raises(amp.ResponseValidationError, match=f"{side}.csv is not a readable"):
        await amp.diff_members(tmp_path / "old.csv", tmp_path / "new.csv", out)

    assert sorted(p.name for p in out.iterdir()) == []


async def test_a_diff_cancelled_once_compared_publishes_nothing(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled after the last run is compared but before the two files are moved into
    out_dir: the caller sees the cancellation, and out_dir holds neither file."""
    compare_into = diff_module._compare_into
    scope = anyio.CancelScope()

    def compared_then_cancelled(work: pathlib.Path, partitioner: Partitioner, *sides: Side
                                ) -> object:
        comparison = compare_into(work, partitioner, *sides)
        anyio.from_thread.run_sync(scope.cancel)
        while True:  # until the caller's cancellation reaches this thread
            try:
                partitioner.check_cancelled()
            except BaseException:
                return comparison
            time.sleep(0.005)

    monkeypatch.setattr(diff_module, "_compare_into", compared_then_cancelled)
    old = write(tmp_path / "old.csv", '"amplitude_id"', '"1"')
    new = write(tmp_path / "new.csv", '"amplitude_id"', '"2"')
    out = tmp_path / "out"
    out.mkdir()

    with scope:
        await amp.diff_members(old, new, out)
    assert scope.cancelled_caught

    assert sorted(p.name for p in out.iterdir()) == []
