"""diff_members against a plain set computation, and what it leaves behind when it fails."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import pathlib
import sys
import tempfile
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amp_cohorts_async as amp

HEADER = ["amplitude_id", "user_id", "city"]
GROUP_HEADER = ["group_id", "group_name"]

# Values as exports hold them: quotes, commas, line breaks, non-ASCII; no leading tab (a tab
# in front of every value is what marks a group cohort) and no NUL (csv refuses it).
VALUES = st.text(alphabet=st.sampled_from('ab1 ,"\nzß'), max_size=5)
KEYS = st.sampled_from(["", "1", "2", "3", "4", "5", '"6"', "7,8", "9\n"])  # few: overlaps


def export_bytes(header: list[str], rows: list[list[str]], *, group: bool, compress: bool,
                 quoting: Any, line_end: str = "\n", last_line_end: bool = True) -> bytes:
    text = io.StringIO(newline="")
    writer = csv.writer(text, quoting=quoting, lineterminator=line_end)
    writer.writerow(header)
    for row in rows:
        writer.writerow([f"\t{value}" for value in row] if group else row)
    data = text.getvalue()
    if not last_line_end:
        data = data.removesuffix(line_end)
    encoded = data.encode()
    return gzip.compress(encoded) if compress else encoded


@st.composite
def exports(draw: st.DrawFn) -> tuple[bool, str, bytes, bytes]:
    group = draw(st.booleans())
    key = draw(st.sampled_from(["group_id", "group_name"] if group else HEADER[:2]))
    width = len(GROUP_HEADER if group else HEADER)

    def rows() -> list[list[str]]:
        keyed = st.tuples(KEYS, st.lists(VALUES, min_size=width - 1, max_size=width - 1))
        drawn = draw(st.lists(keyed, max_size=25))
        position = (GROUP_HEADER if group else HEADER).index(key)
        return [[*values[:position], value, *values[position:]] for value, values in drawn]

    old_rows, new_rows = rows(), rows()
    header = GROUP_HEADER if group else HEADER
    quoting = draw(st.sampled_from([csv.QUOTE_ALL, csv.QUOTE_MINIMAL]))
    line_end = draw(st.sampled_from(["\n", "\r\n"]))
    old = export_bytes(header, old_rows, group=group, compress=draw(st.booleans()),
                       quoting=quoting, line_end=line_end, last_line_end=draw(st.booleans()))
    new = export_bytes(header, new_rows, group=group, compress=draw(st.booleans()),
                       quoting=quoting, line_end=line_end, last_line_end=draw(st.booleans()))
    return group, key, old, new


async def rows_of(path: pathlib.Path) -> list[dict[str, str]]:
    return [row async for row in amp.iter_members(path)]


def members(rows: list[dict[str, str]], key: str) -> dict[str, dict[str, str]]:
    """Each key's first row, as the diff promises to write it."""
    first: dict[str, dict[str, str]] = {}
    for row in rows:
        if row.get(key, ""):
            first.setdefault(row[key], row)
    return first


def header_of(path: pathlib.Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as file:
        return next(csv.reader(file))


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(exports())
def test_diff_equals_a_plain_set_computation(case: tuple[bool, str, bytes, bytes]) -> None:
    group, key, old_bytes, new_bytes = case

    async def check(directory: pathlib.Path) -> None:
        old, new = directory / "old.csv", directory / "new.csv"
        old.write_bytes(old_bytes)
        new.write_bytes(new_bytes)
        diff = await amp.diff_members(old, new, directory / "out", key=key)

        old_rows, new_rows = await rows_of(old), await rows_of(new)
        before, after = members(old_rows, key), members(new_rows, key)
        entering = {k: row for k, row in after.items() if k not in before}
        exiting = {k: row for k, row in before.items() if k not in after}
        assert diff.entering == len(entering)
        assert diff.exiting == len(exiting)
        assert diff.unchanged == len(before.keys() & after.keys())
        assert diff.no_key == sum(not row.get(key, "") for row in old_rows + new_rows)
        assert diff.key == key
        written_entering = await rows_of(diff.entering_path)
        written_exiting = await rows_of(diff.exiting_path)
        assert sorted(map(sorted, map(dict.items, written_entering))) == sorted(
            map(sorted, map(dict.items, entering.values())))
        assert sorted(map(sorted, map(dict.items, written_exiting))) == sorted(
            map(sorted, map(dict.items, exiting.values())))
        expected_header = GROUP_HEADER if group else HEADER
        assert header_of(diff.entering_path) == expected_header
        assert header_of(diff.exiting_path) == expected_header
        assert sorted(p.name for p in (directory / "out").iterdir()) == [
            "entering.csv", "exiting.csv"]

    with tempfile.TemporaryDirectory() as name:
        anyio.run(check, pathlib.Path(name))


def write(path: pathlib.Path, *lines: str) -> pathlib.Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


async def test_rows_are_written_as_the_export_had_them(tmp_path: pathlib.Path) -> None:
    old = write(tmp_path / "old.csv", '"amplitude_id","user_id","city"',
                '"1","a","Paris, TX"', '"2","","Berlin"', '"3","c","x"')
    new = write(tmp_path / "new.csv", '"amplitude_id","user_id","city","plan"',
                '"3","c","y","pro"', '"4","d","The ""Big"" Apple","free"', '"5","","","x"')
    diff = await amp.diff_members(old, new, tmp_path / "out")
    assert (diff.entering, diff.exiting, diff.unchanged, diff.no_key) == (2, 2, 1, 0)
    assert diff.entering_path.read_text().splitlines() == [
        '"amplitude_id","user_id","city","plan"',
        '"4","d","The ""Big"" Apple","free"', '"5","","","x"']
    assert sorted(diff.exiting_path.read_text().splitlines()[1:]) == [
        '"1","a","Paris, TX"', '"2","","Berlin"']

    by_user = await amp.diff_members(old, new, tmp_path / "by-user", key="user_id")
    # members without a user id are counted, not compared
    assert (by_user.entering, by_user.exiting, by_user.unchanged, by_user.no_key) == (1, 1, 1, 2)


async def test_group_cohort_keeps_its_tabs(tmp_path: pathlib.Path) -> None:
    old = write(tmp_path / "old.csv", '"group_id","group_name"', '"\t1","\tacme"')
    new = write(tmp_path / "new.csv", '"group_id","group_name"', '"\t2","\tglobex"',
                '"\t1","\tacme"')
    diff = await amp.diff_members(old, new, tmp_path, key="group_id")
    assert (diff.entering, diff.exiting, diff.unchanged) == (1, 0, 1)
    assert diff.entering_path.read_text().splitlines()[1] == '"\t2","\tglobex"'
    assert diff.exiting_path.read_text().splitlines() == ['"group_id","group_name"']


async def test_an_empty_file_has_no_members(tmp_path: pathlib.Path) -> None:
    old = tmp_path / "old.csv"
    old.write_bytes(b"")
    new = write(tmp_path / "new.csv", '"amplitude_id","user_id"', '"1","a"')
    diff = await amp.diff_members(old, new, tmp_path / "out")
    assert (diff.entering, diff.exiting, diff.unchanged) == (1, 0, 0)
    assert diff.exiting_path.read_text() == '"amplitude_id","user_id"\n'


def leftovers(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(
    ("old_lines", "key", "error", "message"),
    [
        (['"amplitude_id"', '"1"'], "user_id", amp.InvalidRequestError, "no 'user_id' column"),
        (None, "amplitude_id", amp.ResponseValidationError, "not a readable cohort export"),
    ],
)
async def test_a_failed_diff_leaves_nothing(
    tmp_path: pathlib.Path, old_lines: list[str] | None, key: str,
    error: type[Exception], message: str,
) -> None:
    old = tmp_path / "old.csv"
    if old_lines is None:  # a truncated gzip: fails part way through reading
        data = gzip.compress(b'"amplitude_id"\n' + b'"1"\n' * 50_000)
        old.write_bytes(data[: len(data) // 2])
    else:
        write(old, *old_lines)
    new = write(tmp_path / "new.csv", '"amplitude_id","user_id"', '"1","a"')
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        await amp.diff_members(old, new, out, key=key)
    assert leftovers(out) == []


async def test_a_missing_file_is_bad_input(tmp_path: pathlib.Path) -> None:
    new = write(tmp_path / "new.csv", '"amplitude_id"', '"1"')
    with pytest.raises(amp.InvalidRequestError, match="no such file"):
        await amp.diff_members(tmp_path / "nope.csv", new, tmp_path / "out")
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"old": 3}, "old must be a path"),
        ({"new": ""}, "new must be a non-empty"),
        ({"out_dir": None}, "out_dir must be a path"),
        ({"key": ""}, "key must not be empty"),
        ({"key": 5}, "key must be a string"),
    ],
)
async def test_bad_arguments(tmp_path: pathlib.Path, kwargs: dict[str, object],
                             message: str) -> None:
    arguments: dict[str, object] = {"old": tmp_path / "a", "new": tmp_path / "b",
                                    "out_dir": tmp_path / "out", **kwargs}
    with pytest.raises(amp.InvalidRequestError, match=message):
        await amp.diff_members(**arguments)  # type: ignore[arg-type]


async def test_out_dir_that_is_a_file(tmp_path: pathlib.Path) -> None:
    old = write(tmp_path / "old.csv", '"amplitude_id"', '"1"')
    with pytest.raises(amp.InvalidRequestError, match="out_dir is not a directory"):
        await amp.diff_members(old, old, old)


def runs_being_written(out: pathlib.Path) -> bool:
    """The diff is part way through: some run file in its work directory holds data."""
    try:
        return any(run.stat().st_size for work in out.glob(".amp-diff-*")
                   for run in work.iterdir())
    except FileNotFoundError:  # the diff finished or failed while we looked
        return False


async def test_a_cancelled_diff_leaves_nothing(tmp_path: pathlib.Path) -> None:
    rows = [[str(n), f"user-{n}"] for n in range(300_000)]
    old = tmp_path / "old.csv"
    old.write_bytes(export_bytes(["amplitude_id", "user_id"], rows, group=False,
                                 compress=False, quoting=csv.QUOTE_ALL))
    out = tmp_path / "out"
    out.mkdir()
    seen_at_work = False
    async with anyio.create_task_group() as group:
        group.start_soon(amp.diff_members, old, old, out)
        while not seen_at_work:
            await anyio.sleep(0.005)
            seen_at_work = runs_being_written(out)
            assert not (out / "entering.csv").exists()
        group.cancel_scope.cancel()
    assert leftovers(out) == []


async def test_command_line_diff_needs_no_credentials(tmp_path: pathlib.Path) -> None:
    old = write(tmp_path / "old.csv", '"amplitude_id","user_id"', '"1","a"', '"2",""')
    new = write(tmp_path / "new.csv", '"amplitude_id","user_id"', '"2",""', '"3","c"')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMPLITUDE_")}
    command = [sys.executable, "-m", "amp_cohorts_async", "diff", str(old), str(new),
               str(tmp_path / "out")]
    result = await anyio.run_process([*command, "--key", "user_id"], env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(
        "1 entering, 1 exiting, 0 unchanged by user_id, 2 rows without a user_id (not compared)"
        f" -> {tmp_path / 'out' / 'entering.csv'}")
    result = await anyio.run_process([*command, "--json"], env=env, check=False)
    summary = json.loads(result.stdout)
    assert (summary["entering"], summary["exiting"], summary["unchanged"]) == (1, 1, 1)
    assert summary["exiting_path"] == str(tmp_path / "out" / "exiting.csv")
    result = await anyio.run_process([*command, "--key", "city"], env=env, check=False)
    assert result.returncode == 2
    assert b"has no 'city' column" in result.stderr


def big_export(seed: int, *, group: bool, special_at: tuple[int, ...],
               special: str = 'The "Big"\nApple') -> list[list[str]]:
    """40k members, more than a block of the line-by-line reading; at ``special_at`` a row
    only csv.reader can read (by default a quote and a line break in a value), the rest
    plain."""
    import random

    rng = random.Random(seed)
    ids = rng.sample(range(60_000), 40_000)
    rows = [[str(i), f"user-{i}" if i % 9 else "", "Paris"] for i in ids]
    for position in special_at:
        rows[position][2] = special
    rows[7][0] = rows[3][0]  # a repeated key: one member, its first row written
    return [[f"\t{v}" for v in row[:2]] for row in rows] if group else rows


@pytest.mark.parametrize(
    ("special_at", "compress", "line_end", "group", "special"),
    [
        ((), False, b"\n", False, ""),  # every line read as it is
        ((30_000,), False, b"\n", False, 'a "b"'),  # csv.reader from row 30,000's block on
        ((0,), True, b"\r\n", False, "a\nb"),  # from the first row on; gzip; CRLF
        ((30_000,), False, b"\r\n", False, "a\rb"),  # a CR that is not a line end
        ((39_999,), False, b"\r\n", True, "a\nb"),  # the very last row; a group cohort
        ((), True, b"\r\n", True, ""),
    ],
)
async def test_big_exports_read_line_by_line_then_by_csv_reader(
    tmp_path: pathlib.Path, special_at: tuple[int, ...], compress: bool, line_end: bytes,
    group: bool, special: str,
) -> None:
    header = GROUP_HEADER if group else HEADER
    paths = []
    for seed, name in ((1, "old.csv"), (2, "new.csv")):
        rows = big_export(seed, group=group, special_at=special_at, special=special)
        data = export_bytes(header, rows, group=False, compress=False, quoting=csv.QUOTE_ALL)
        data = b"\xef\xbb\xbf" + data.replace(b"\n", line_end).rstrip(b"\r\n")  # no last EOL
        path = tmp_path / name
        path.write_bytes(gzip.compress(data) if compress else data)
        paths.append(path)
    for key in ("group_id", "group_name") if group else ("amplitude_id", "user_id"):
        diff = await amp.diff_members(*paths, tmp_path / key, key=key)
        before = members(await rows_of(paths[0]), key)
        after = members(await rows_of(paths[1]), key)
        assert (diff.entering, diff.exiting, diff.unchanged) == (
            len(after.keys() - before.keys()), len(before.keys() - after.keys()),
            len(before.keys() & after.keys()))
        assert diff.entering > 10_000
        written = await rows_of(diff.entering_path)
        assert sorted(map(sorted, map(dict.items, written))) == sorted(
            map(sorted, map(dict.items, (after[k] for k in after.keys() - before.keys()))))
        exiting = await rows_of(diff.exiting_path)
        assert {row[key] for row in exiting} == before.keys() - after.keys()
        if not special_at:  # plain rows are copied as they are, their line ends too
            raw = paths[1].read_bytes()
            new_lines = (gzip.decompress(raw) if compress else raw).splitlines(keepends=True)
            rows = diff.entering_path.read_bytes().splitlines(keepends=True)[1:]
            assert set(rows) <= set(new_lines)
            assert {row[-len(line_end):] for row in rows} == {line_end}


async def test_a_nul_in_a_value_is_read_as_iter_members_reads_it(tmp_path: pathlib.Path) -> None:
    old = tmp_path / "old.csv"
    old.write_bytes(b'"amplitude_id","user_id"\n"2","c"\n"1","a\x00b"\n')
    new = write(tmp_path / "new.csv", '"amplitude_id","user_id"', '"2","c"')
    diff = await amp.diff_members(old, new, tmp_path / "out")
    assert await rows_of(diff.exiting_path) == [{"amplitude_id": "1", "user_id": "a\x00b"}]
