"""iter_members over the real file format."""

from __future__ import annotations

import csv
import gc
import gzip
import io
import pathlib

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude, run_in_virtual_time

from .conftest import FAST_POLL

FILE = (
    '"amplitude_id","user_id","city","bio"\n'
    '"1","alice@example.com","Paris, TX","likes ""quotes"""\n'
    '"2","","Berlin","two\nlines"\n'
    '"3","bob","",""\n'
)


async def rows_of(path: pathlib.Path) -> list[dict[str, str]]:
    return [row async for row in amp.iter_members(path)]


async def test_quoted_fields_commas_quotes_newlines_and_empty_user_id(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "c.csv"
    path.write_text(FILE, encoding="utf-8")
    rows = await rows_of(path)
    assert rows == [
        {"amplitude_id": "1", "user_id": "alice@example.com", "city": "Paris, TX",
         "bio": 'likes "quotes"'},
        {"amplitude_id": "2", "user_id": "", "city": "Berlin", "bio": "two\nlines"},
        {"amplitude_id": "3", "user_id": "bob", "city": "", "bio": ""},
    ]


async def test_gzip_is_detected(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.csv.gz"
    path.write_bytes(gzip.compress(FILE.encode()))
    assert len(await rows_of(path)) == 3


async def test_group_cohort_tabs_are_stripped(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "g.csv"
    path.write_text('"group_id","group_name"\n"\t17","\tacme"\n"\t18","\tglobex"\n')
    assert await rows_of(path) == [
        {"group_id": "17", "group_name": "acme"}, {"group_id": "18", "group_name": "globex"}
    ]


async def test_header_only_and_empty_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "h.csv").write_text('"amplitude_id","user_id"\n')
    (tmp_path / "e.csv").write_text("")
    assert await rows_of(tmp_path / "h.csv") == []
    assert await rows_of(tmp_path / "e.csv") == []


async def test_missing_file_and_bad_path(tmp_path: pathlib.Path) -> None:
    with pytest.raises(amp.InvalidRequestError, match="no such file"):
        await rows_of(tmp_path / "nope.csv")
    with pytest.raises(amp.InvalidRequestError):
        await rows_of("")  # type: ignore[arg-type]


async def test_many_rows_stream_in_batches(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "big.csv"
    with open(path, "w") as handle:
        handle.write('"amplitude_id","user_id"\n')
        for i in range(50_001):
            handle.write(f'"{i}","u{i}"\n')
    count = 0
    last = None
    async for row in amp.iter_members(path):
        count += 1
        last = row
    assert count == 50_001
    assert last == {"amplitude_id": "50000", "user_id": "u50000"}


async def test_breaking_out_early_closes_the_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text(FILE)
    iterator = amp.iter_members(path)
    first = await iterator.__anext__()
    await iterator.aclose()  # type: ignore[attr-defined]
    assert first["amplitude_id"] == "1"


@pytest.mark.looptime
async def test_round_trip_through_the_fake_with_props(tmp_path: pathlib.Path) -> None:
    with FakeAmplitude(job_duration=1.0) as fake:
        cohort = fake.add_cohort("p", size=300, properties=("city", "plan"))
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     poll=FAST_POLL) as client:
            result = await client.download_cohort("p", tmp_path, props=True,
                                                  prop_keys=["plan"])
        rows = await rows_of(result.path)
    expected = [m for m in cohort.iter_members()]
    assert [r["amplitude_id"] for r in rows] == [m.amplitude_id for m in expected]
    assert [r["user_id"] for r in rows] == [m.user_id for m in expected]
    assert set(rows[0]) == {"amplitude_id", "user_id", "plan"}
    assert [r["plan"] for r in rows] == [m.properties["plan"] for m in expected]
    await anyio.sleep(0)


field = st.text(alphabet=st.sampled_from(list('ab ,"\n\r\t\u00e9')), max_size=6)


def _csv_file(rows: list[list[str]], crlf: bool, directory: pathlib.Path) -> tuple[
        pathlib.Path, str]:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\r\n" if crlf else "\n")
    writer.writerow(["amplitude_id", "user_id", "city"])
    writer.writerows(rows)
    path = directory / "c.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    return path, buffer.getvalue()


def _looks_grouped(rows: list[list[str]]) -> bool:
    first = [v for v in rows[0] if v] if rows else []
    return bool(first) and all(v[:1] == "\t" for v in first)


@settings(max_examples=120, deadline=None)
@given(rows=st.lists(st.lists(field, min_size=3, max_size=3), max_size=30), crlf=st.booleans())
def test_matches_the_csv_module_on_any_content(
    rows: list[list[str]], crlf: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path, text = _csv_file(rows, crlf, tmp_path_factory.mktemp("m"))
    if _looks_grouped(rows):
        return  # a first row that looks like a group cohort's is stripped on purpose
    expected = list(csv.DictReader(io.StringIO(text, newline="")))
    got = run_in_virtual_time(lambda: rows_of(path))
    assert got == [dict(r) for r in expected]


@settings(max_examples=120, deadline=None)
@given(rows=st.lists(st.lists(field, min_size=3, max_size=3), max_size=30),
       batch_rows=st.integers(1, 40), crlf=st.booleans(), compressed=st.booleans())
def test_batches_equal_csv_reader_on_any_content(
    rows: list[list[str]], batch_rows: int, crlf: bool, compressed: bool,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    path, text = _csv_file(rows, crlf, tmp_path_factory.mktemp("b"))
    if compressed:
        path.write_bytes(gzip.compress(text.encode()))
    reference = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
    if _looks_grouped(reference[1:]):
        reference = [reference[0]] + [[v[1:] if v[:1] == "\t" else v for v in row]
                                      for row in reference[1:]]

    async def batches() -> list[amp.MemberBatch]:
        return [b async for b in amp.iter_member_batches(path, batch_rows=batch_rows)]

    got = run_in_virtual_time(batches)
    assert all(batch.columns == tuple(reference[0]) for batch in got)
    assert all(1 <= len(batch.rows) <= batch_rows for batch in got)
    assert [row for batch in got for row in batch.rows] == reference[1:]


async def test_group_batches_are_cleaned(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "g.csv"
    path.write_text('"group_id","group_name"\n"\t17","\tacme"\n"\t18","\tglobex"\n')
    batches = [b async for b in amp.iter_member_batches(path, batch_rows=1)]
    assert batches == [amp.MemberBatch(("group_id", "group_name"), [["17", "acme"]]),
                       amp.MemberBatch(("group_id", "group_name"), [["18", "globex"]])]


async def test_default_batches_never_wake_the_cyclic_garbage_collector(
    tmp_path: pathlib.Path,
) -> None:
    """512-row batches keep the tracked-object balance under CPython's 700 threshold, so the
    collector (whose full passes over a big heap stall the loop) stays asleep; 1024-row ones
    wake it at every batch."""
    path = tmp_path / "big.csv"
    path.write_text('"amplitude_id","user_id"\n'
                    + "".join(f'"{i}","user-{i}"\n' for i in range(30_000)))
    collections = 0

    def count(phase: str, _info: dict[str, int]) -> None:
        nonlocal collections
        collections += phase == "start"

    sizes = []
    gc.callbacks.append(count)
    try:
        async for batch in amp.iter_member_batches(path):
            sizes.append(len(batch.rows))
    finally:
        gc.callbacks.remove(count)
    assert sizes[0] == 512
    assert sum(sizes) == 30_000
    assert collections <= 2  # at most once while the balance settles; ~59 batches


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "10", 10**7])
async def test_bad_batch_sizes(tmp_path: pathlib.Path, bad: object) -> None:
    path = tmp_path / "c.csv"
    path.write_text(FILE)
    with pytest.raises(amp.InvalidRequestError):
        async for _ in amp.iter_member_batches(path, batch_rows=bad):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize("cut", [
    b'"amplitude_id","user_id"\n"1","a"\n"2","b',
    b'"amplitude_id","user_id"\n"1","a"\n"2',
    b'"amplitude_id","user_id"\n"1","a\n',
], ids=["in the last field", "in the first field", "before the closing quote"])
async def test_a_file_cut_inside_a_quoted_field_is_an_error(
    tmp_path: pathlib.Path, cut: bytes
) -> None:
    """A truncated copy ends inside a quote (every field of an export is quoted); read as
    is, its last member would carry a cut id or one that ends in a line break."""
    path = tmp_path / "cut.csv"
    path.write_bytes(cut)
    with pytest.raises(amp.ResponseValidationError, match="not a readable cohort export"):
        await rows_of(path)
