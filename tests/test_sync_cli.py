"""amp-cohorts sync: the summary table, the quota line, dry runs and their projection."""

from __future__ import annotations

import json
import pathlib
from collections.abc import AsyncIterator

import pytest

from amp_cohorts_async.testing import FakeAmplitude

from .test_cli import cli


@pytest.fixture
async def emulator(fake: FakeAmplitude) -> AsyncIterator[tuple[FakeAmplitude, str]]:
    fake.job_duration = 0.2
    async with fake.serve() as base_url:
        yield fake, base_url


def table(out: str) -> list[str]:
    """The summary table's lines: from its header on (progress lines come before)."""
    lines = out.splitlines()
    start = lines.index("cohort\taction\tlast computed\tmembers\tsize")
    end = next(i for i, line in enumerate(lines) if " cohort requests spent" in line
               or " cohort request spent" in line)
    return lines[start:end + 1]


async def test_sync_exports_what_changed_and_ends_with_the_quota(
    emulator: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    fake, _ = emulator
    code, out, err = await cli(emulator, "sync", str(tmp_path), "small", "large",
                               "--poll-interval", "0.1")
    assert code == 0, err
    lines = table(out)
    assert lines[0] == "cohort\taction\tlast computed\tmembers\tsize"
    small = lines[1].split("\t")
    assert small[:2] == ["small", "downloaded"]
    assert small[3] == "25"  # members, counted as the file was written
    assert lines[-1].endswith("2 cohort requests spent, 498 left this month")
    assert (tmp_path / "small.csv").exists()

    fake.touch("large")
    code, out, err = await cli(emulator, "sync", str(tmp_path), "small", "large",
                               "--poll-interval", "0.1")
    assert code == 0, err
    actions = dict(line.split("\t")[:2] for line in table(out)[1:-1])
    assert actions == {"small": "unchanged", "large": "downloaded"}
    assert table(out)[-1].endswith("1 cohort request spent, 497 left this month")
    assert fake.cohort_requests == 3


async def test_sync_dry_run_projects_the_month_at_its_cadence(
    emulator: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    fake, _ = emulator
    for index in range(2):  # 4 cohorts in all: the first minute's 4 requests
        fake.add_cohort(f"d{index}", size=5)
    code, _, err = await cli(emulator, "sync", str(tmp_path), "--all", "--poll-interval", "0.1")
    assert code == 0, err
    fake.touch("d0")
    fake.touch("d1")
    code, out, err = await cli(emulator, "sync", str(tmp_path), "--all", "--dry-run",
                               "--every", "1d", "--max-requests", "1")
    assert code == 0, err
    actions = [line.split("\t")[1] for line in table(out)[1:5]]
    assert sorted(actions) == ["over_budget", "planned", "unchanged", "unchanged"]
    assert "dry run: 1 cohort request would be spent; 495 would be left this month" in out
    assert ("every 1d: about 60 cohort requests a month if 2 of 4 cohorts change each time"
            in out)
    assert fake.cohort_requests == 4


async def test_sync_json_and_argument_errors(
    emulator: tuple[FakeAmplitude, str], tmp_path: pathlib.Path
) -> None:
    code, out, err = await cli(emulator, "sync", str(tmp_path), "small", "missing", "--json",
                               "--poll-interval", "0.1")
    assert code == 4, err  # a cohort the list does not show
    data = json.loads(out)
    assert [e["action"] for e in data["entries"]] == ["downloaded", "missing"]
    assert data["requests_spent"] == 1
    code, _, err = await cli(emulator, "sync", str(tmp_path), "small", "--every", "1h")
    assert code == 2
    assert "--every projects a dry run" in err
    code, _, err = await cli(emulator, "sync", str(tmp_path), "small", "--keep-versions", "0")
    assert code == 2
    assert "keep_versions" in err
