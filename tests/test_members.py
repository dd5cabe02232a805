"""iter_members over the real file format."""

from __future__ import annotations

import gzip
import pathlib

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude

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


@settings(max_examples=120, deadline=None)
@given(rows=st.lists(st.lists(field, min_size=3, max_size=3), max_size=30),
       batch=st.integers(1, 200), crlf=st.booleans())
def test_matches_the_csv_module_on_any_content(
    rows: list[list[str]], batch: int, crlf: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import csv
    import io

    from amp_cohorts_async import _members
    from amp_cohorts_async.testing import run_in_virtual_time

    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\r\n" if crlf else "\n")
    writer.writerow(["amplitude_id", "user_id", "city"])
    writer.writerows(rows)
    path = tmp_path_factory.mktemp("m") / "c.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    expected = list(csv.DictReader(io.StringIO(buffer.getvalue(), newline="")))
    first = [v for v in rows[0] if v] if rows else []
    if first and all(v[:1] == "\t" for v in first):
        return  # a first row that looks like a group cohort's is stripped on purpose
    previous = _members._BATCH_BYTES
    _members._BATCH_BYTES = batch
    try:
        got = run_in_virtual_time(lambda: rows_of(path))
    finally:
        _members._BATCH_BYTES = previous
    assert got == [dict(r) for r in expected]
