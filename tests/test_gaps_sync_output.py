"""The sync table and its JSON where the other tests left a one-line break unnoticed: a diff
left to the run that replaced the copy, and no "held:" line for a run that nothing held."""

from __future__ import annotations

import io
import json
import pathlib

import pytest

import amp_cohorts_async as amp
from amp_cohorts_async._models import ExportOptions
from amp_cohorts_async.cli._output import sync_summary
from amp_cohorts_async.cli._sync_diff import diff_downloads
from amp_cohorts_async.testing import FakeAmplitude


@pytest.mark.looptime
async def test_a_copy_replaced_before_its_diff_says_so_in_the_table_and_the_json(
    fake: FakeAmplitude, client: amp.CohortsClient, tmp_path: pathlib.Path
) -> None:
    await client.sync_cohorts(["small"], tmp_path)
    fake.touch("small")
    replaced = await client.sync_cohorts(["small"], tmp_path)
    fake.touch("small")
    await client.sync_cohorts(["small"], tmp_path)  # another run, done before the diff
    diffs = await diff_downloads(replaced, tmp_path, ExportOptions(props=False, prop_keys=()))
    assert not any(entry.retries for entry in replaced.entries)

    table = io.StringIO()
    sync_summary(replaced, 1.0, table, as_json=False, diffs=diffs)

    lines = table.getvalue().splitlines()
    (row,) = [line.split("\t") for line in lines if line.startswith("small\t")]
    assert row[1] == "downloaded"
    assert row[5:] == ["replaced since", "-"]
    assert "small: another sync replaced this copy before its diff" in table.getvalue()
    # Nothing held the run worth telling (no retry, waits of virtual milliseconds).
    assert not [line for line in lines if line.startswith("held:")]

    as_json = io.StringIO()
    sync_summary(replaced, 1.0, as_json, as_json=True, diffs=diffs)
    (entry,) = json.loads(as_json.getvalue())["entries"]
    assert entry["diff"] == {"replaced": True}
