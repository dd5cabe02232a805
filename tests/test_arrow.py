"""iter_arrow_batches: the export as typed Arrow batches, cleaned as iter_members cleans it."""

from __future__ import annotations

import csv
import gzip
import io
import os
import pathlib
import re
import subprocess
import sys

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude, run_in_virtual_time

from .conftest import FAST_POLL


def write_csv(path: pathlib.Path, header: list[str], rows: list[list[str]], *,
              crlf: bool = False, compressed: bool = False) -> pathlib.Path:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\r\n" if crlf else "\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode()
    path.write_bytes(gzip.compress(data) if compressed else data)
    return path


async def batches_of(path: pathlib.Path | str, **options: int) -> list[pa.RecordBatch]:
    return [batch async for batch in amp.iter_arrow_batches(path, **options)]


def typed(row: dict[str, str]) -> dict[str, object]:
    """What iter_arrow_batches promises for one of iter_members' rows."""
    return {name: None if value == "" else int(value) if name == "amplitude_id" else value
            for name, value in row.items()}


async def test_types_nulls_and_file_order(tmp_path: pathlib.Path) -> None:
    path = write_csv(tmp_path / "c.csv", ["amplitude_id", "user_id", "plan", "city"], [
        ["100000000001", "alice@example.com", "pro", "Paris, TX"],
        ["100000000002", "", "", 'The "Big"\nApple'],
        ["", "NA", "null", "NaN"],  # only the empty value is null
    ])
    [batch] = await batches_of(path)
    assert batch.schema == pa.schema([("amplitude_id", pa.int64()), ("user_id", pa.string()),
                                      ("plan", pa.string()), ("city", pa.string())])
    assert batch.to_pylist() == [
        {"amplitude_id": 100000000001, "user_id": "alice@example.com", "plan": "pro",
         "city": "Paris, TX"},
        {"amplitude_id": 100000000002, "user_id": None, "plan": None,
         "city": 'The "Big"\nApple'},
        {"amplitude_id": None, "user_id": "NA", "plan": "null", "city": "NaN"},
    ]


async def test_group_cohort_tabs_are_stripped_and_a_bare_tab_is_null(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "g.csv"
    path.write_text('"group_id","group_name"\n"\t17","\tacme"\n"\t18","\t"\n"\t19","\t\tx"\n')
    [batch] = await batches_of(path)
    assert batch.schema == pa.schema([("group_id", pa.string()), ("group_name", pa.string())])
    assert batch.to_pylist() == [{"group_id": "17", "group_name": "acme"},
                                 {"group_id": "18", "group_name": None},
                                 {"group_id": "19", "group_name": "\tx"}]  # one tab, as ever


async def test_gzip_bom_empty_and_header_only(tmp_path: pathlib.Path) -> None:
    gz = write_csv(tmp_path / "c.csv.gz", ["amplitude_id", "user_id"], [["1", "a"], ["2", ""]],
                   compressed=True)
    assert (await batches_of(gz))[0].to_pylist() == [{"amplitude_id": 1, "user_id": "a"},
                                                    {"amplitude_id": 2, "user_id": None}]
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b'\xef\xbb\xbf"amplitude_id","user_id"\n"3","c"\n')
    assert (await batches_of(bom))[0].schema.names == ["amplitude_id", "user_id"]
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "header.csv").write_text('"amplitude_id","user_id"\n')
    assert await batches_of(tmp_path / "empty.csv") == []
    assert await batches_of(tmp_path / "header.csv") == []


async def test_batches_hold_exactly_batch_rows_but_the_last(tmp_path: pathlib.Path) -> None:
    rows = [[str(i), f"u{i}"] for i in range(100_003)]
    path = write_csv(tmp_path / "c.csv", ["amplitude_id", "user_id"], rows)
    batches = await batches_of(path, batch_rows=7_000)
    assert [b.num_rows for b in batches] == [7_000] * 14 + [2_003]
    assert pa.Table.from_batches(batches).column("amplitude_id").to_pylist() == list(
        range(100_003))
    # one 1 MiB block holds ~80,000 of these rows: batches cross blocks and take them apart
    assert [b.num_rows for b in await batches_of(path, batch_rows=90_000)] == [90_000, 10_003]


@pytest.mark.looptime
async def test_props_columns_in_file_order_through_the_fake(tmp_path: pathlib.Path) -> None:
    with FakeAmplitude(job_duration=1.0) as fake:
        cohort = fake.add_cohort("p", size=300, properties=("city", "plan"))
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     poll=FAST_POLL) as client:
            result = await client.download_cohort("p", tmp_path, props=True,
                                                  prop_keys=["plan", "city"])
        table = pa.Table.from_batches(await batches_of(result.path, batch_rows=128))
    assert table.schema.names == ["amplitude_id", "user_id", "plan", "city"]
    members = list(cohort.iter_members())
    assert table.column("amplitude_id").to_pylist() == [int(m.amplitude_id) for m in members]
    assert table.column("user_id").to_pylist() == [m.user_id or None for m in members]
    assert table.column("city").to_pylist() == [m.properties["city"] for m in members]


async def test_content_that_is_not_an_export(tmp_path: pathlib.Path) -> None:
    cases = {
        "not_an_id.csv": b'"amplitude_id","user_id"\n"1","a"\n"x2","b"\n',
        "ragged.csv": b'"amplitude_id","user_id"\n"1"\n',
        "latin1.csv": b'"amplitude_id","user_id"\n"1","\xe9"\n',
        "truncated.csv.gz": gzip.compress(b'"amplitude_id","user_id"\n' * 2000)[:-12],
        # a copy cut inside a quoted field, which pyarrow's reader alone would take whole
        "cut_in_a_field.csv": b'"amplitude_id","user_id"\n"1","a"\n"2","b\n',
        "cut_in_a_field.csv.gz": gzip.compress(b'"amplitude_id","user_id"\n"1","a ""q"""\n"2","b'),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(amp.ResponseValidationError, match="not a readable cohort export"):
            await batches_of(tmp_path / name)
        if name.startswith("cut_in_a_field"):  # iter_members refuses it too
            with pytest.raises(amp.ResponseValidationError):
                [row async for row in amp.iter_members(tmp_path / name)]


async def test_bad_paths_and_batch_sizes(tmp_path: pathlib.Path) -> None:
    with pytest.raises(amp.InvalidRequestError, match="no such file"):
        await batches_of(tmp_path / "nope.csv")
    with pytest.raises(amp.InvalidRequestError, match="is a directory"):
        await batches_of(tmp_path)
    path = write_csv(tmp_path / "c.csv", ["amplitude_id"], [["1"]])
    for bad in (0, -1, True, 1.5, "10", 1 << 30):
        with pytest.raises(amp.InvalidRequestError, match="batch_rows"):
            await batches_of(path, batch_rows=bad)  # type: ignore[arg-type]


def open_descriptors_to(path: pathlib.Path) -> int:
    fds = pathlib.Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path.resolve()))


async def test_closing_early_closes_the_file(tmp_path: pathlib.Path) -> None:
    path = write_csv(tmp_path / "c.csv", ["amplitude_id"], [[str(i)] for i in range(5_000)])
    batches = amp.iter_arrow_batches(path, batch_rows=10)
    first = await batches.__anext__()
    assert open_descriptors_to(path) == 1
    await batches.aclose()  # type: ignore[attr-defined]
    assert first.num_rows == 10
    assert open_descriptors_to(path) == 0


def test_the_core_install_imports_without_pyarrow(tmp_path: pathlib.Path) -> None:
    path = write_csv(tmp_path / "c.csv", ["amplitude_id"], [["1"]])
    script = (
        "import sys; sys.modules['pyarrow'] = None\n"  # as if it were not installed
        "import anyio, amp_cohorts_async as amp\n"
        "async def main():\n"
        f"    async for _ in amp.iter_arrow_batches({str(path)!r}): pass\n"
        "try:\n"
        "    anyio.run(main)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    assert "pip install 'amp-cohorts-async[arrow]'" in done.stdout


# -- any content: the same members as iter_members, typed --------------------------------

text_value = st.text(alphabet=st.sampled_from(list('ab ,"\n\r\t\u00e9N')), max_size=6)
id_value = st.one_of(st.just(""), st.integers(-(2**63), 2**63 - 1).map(str))
row = st.lists(st.tuples(id_value, text_value, text_value).map(list), max_size=40)


@st.composite
def export_rows(draw: st.DrawFn) -> list[list[str]]:
    """A user cohort's rows, or a group cohort's: a tab before every non-empty value."""
    rows = draw(row)
    if draw(st.booleans()):
        rows = [["\t" + value if value else value for value in r] for r in rows]
    return rows


@settings(max_examples=150, deadline=None)
@given(rows=export_rows(), batch_rows=st.integers(1, 50), crlf=st.booleans(),
       compressed=st.booleans())
def test_equals_iter_members_on_any_content(
    rows: list[list[str]], batch_rows: int, crlf: bool, compressed: bool,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    path = write_csv(tmp_path_factory.mktemp("a") / "c.csv", ["amplitude_id", "user_id", "city"],
                     rows, crlf=crlf, compressed=compressed)

    async def both() -> tuple[list[dict[str, str]], list[pa.RecordBatch] | Exception]:
        members = [member async for member in amp.iter_members(path)]
        try:
            return members, await batches_of(path, batch_rows=batch_rows)
        except amp.ResponseValidationError as exc:
            return members, exc

    members, batches = run_in_virtual_time(both)
    if any(not re.fullmatch(r"-?[0-9]*", m["amplitude_id"]) for m in members):
        # a group cohort whose first row is empty keeps its tabs, as iter_members does, and
        # "\t5" is then not an integer
        assert isinstance(batches, amp.ResponseValidationError)
        return
    assert isinstance(batches, list)
    assert [b.num_rows for b in batches[:-1]] == [batch_rows] * (len(batches) - 1)
    assert all(b.schema.field("amplitude_id").type == pa.int64() for b in batches)
    got = [r for batch in batches for r in batch.to_pylist()]
    assert got == [typed(member) for member in members]


async def test_a_group_cohort_is_told_by_its_first_row(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "g.csv"
    path.write_text('"amplitude_id","user_id"\n"",""\n"\t5","\tx"\n')
    assert [m async for m in amp.iter_members(path)][1] == {"amplitude_id": "\t5",
                                                             "user_id": "\tx"}
    with pytest.raises(amp.ResponseValidationError, match="'\t5'"):
        await batches_of(path)


async def test_a_failure_part_way_closes_the_file_while_the_error_is_held(
    tmp_path: pathlib.Path,
) -> None:
    path = write_csv(tmp_path / "c.csv", ["amplitude_id"], [[str(i)] for i in range(50_000)]
                     + [["not a number"]])
    seen: list[int] = []

    async def consume() -> None:
        async for batch in amp.iter_arrow_batches(path, batch_rows=1_000):
            seen.append(batch.num_rows)

    with pytest.raises(amp.ResponseValidationError) as caught:
        await consume()
    assert caught.value.__traceback__ is not None  # the generator's frame is still referenced
    assert open_descriptors_to(path) == 0
    assert sum(seen) < 50_000  # an amplitude_id that is not an integer fails its whole block
