"""iter_members over the real file format."""

from __future__ import annotations

import gzip
import pathlib

import anyio
import pytest

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
