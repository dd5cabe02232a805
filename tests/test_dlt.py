"""The dlt source into DuckDB, against the emulator served on loopback.

Each pipeline run happens in a worker thread (dlt's run is blocking and runs the async
resources on a loop of its own) while the emulator serves on the test's loop.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import dlt
import duckdb
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.dlt import amplitude_cohorts
from amp_cohorts_async.testing import FakeAmplitude

QUICK_POLL = amp.PollPolicy(initial_interval=0.05, max_interval=0.2, jitter=0.0,
                            idle_interval=0.05)
# Amplitude's limits scaled down in time, so a test's few runs never wait a minute.
SCALED = amp.Limits(cohort_requests=(amp.RateWindow(20, 2.0),), monthly_quota=None)


@pytest.fixture(autouse=True)
def _no_dlt_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")


class Warehouse:
    """One emulator, one DuckDB file, and pipelines that load the first into the second."""

    def __init__(self, fake: FakeAmplitude, base_url: str, directory: pathlib.Path) -> None:
        self.fake = fake
        self.base_url = base_url
        self.directory = directory
        self.database = directory / "warehouse.duckdb"
        self.name = f"amp_{uuid.uuid4().hex[:8]}"

    def source(self, cohort_ids: list[str] | None = None, **options: Any) -> Any:
        return amplitude_cohorts(cohort_ids, api_key=self.fake.api_key,
                                 secret_key=self.fake.secret_key, base_url=self.base_url,
                                 poll=QUICK_POLL, limits=SCALED,
                                 limits_url=f"file:{self.directory / 'limits.sqlite3'}",
                                 **options)

    def pipeline(self, pipelines_dir: str = "pipelines") -> dlt.Pipeline:
        return dlt.pipeline(pipeline_name=self.name, pipelines_dir=str(
            self.directory / pipelines_dir), destination=dlt.destinations.duckdb(
            str(self.database)), dataset_name="amplitude")

    async def run(self, source: Any, pipelines_dir: str = "pipelines") -> Any:
        pipeline = self.pipeline(pipelines_dir)
        return await anyio.to_thread.run_sync(pipeline.run, source)

    def rows(self, table: str = "cohort_members") -> list[tuple[Any, ...]]:
        with duckdb.connect(str(self.database), read_only=True) as connection:
            columns = [c for (c,) in connection.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = "
                "'amplitude' AND table_name = ? AND column_name NOT LIKE '\\_dlt%' ESCAPE '\\' "
                "ORDER BY column_name", [table]).fetchall()]
            return connection.execute(
                f"SELECT {', '.join(columns)} FROM amplitude.{table} ORDER BY ALL").fetchall()

    def members(self, cohort_id: str) -> list[tuple[Any, ...]]:
        with duckdb.connect(str(self.database), read_only=True) as connection:
            return connection.execute(
                "SELECT amplitude_id, user_id FROM amplitude.cohort_members WHERE cohort_id = ? "
                "ORDER BY amplitude_id", [cohort_id]).fetchall()

    def expected(self, cohort_id: str) -> list[tuple[Any, ...]]:
        members = self.fake.cohorts[cohort_id].iter_members()
        return sorted((int(m.amplitude_id), m.user_id or None) for m in members)


@pytest.fixture
async def warehouse(tmp_path: pathlib.Path) -> AsyncIterator[Warehouse]:
    with FakeAmplitude(job_duration=0.05, seed=3, limits=SCALED) as fake:
        fake.add_cohort("alpha", size=300, properties=("city", "plan"))
        fake.add_cohort("beta", size=120)
        fake.add_cohort("gamma", size=40)
        fake.add_cohort("old", size=10).archived = True
        async with fake.serve() as base_url:
            yield Warehouse(fake, base_url, tmp_path)


async def test_first_run_loads_every_member_and_the_list(warehouse: Warehouse) -> None:
    await warehouse.run(warehouse.source())
    for cohort_id in ("alpha", "beta", "gamma"):
        assert warehouse.members(cohort_id) == warehouse.expected(cohort_id)
    assert warehouse.members("old") == []  # archived: not selected
    with duckdb.connect(str(warehouse.database), read_only=True) as connection:
        ids = connection.execute("SELECT id FROM amplitude.cohorts ORDER BY id").fetchall()
        types = dict(connection.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = "
            "'cohort_members'").fetchall())
    assert ids == [("alpha",), ("beta",), ("gamma",)]
    assert types["amplitude_id"] == "BIGINT"
    assert types["user_id"] == "VARCHAR"
    assert warehouse.fake.cohort_requests == 3
    assert warehouse.fake.violations == []


async def test_nothing_changed_spends_no_quota_and_changes_no_row(warehouse: Warehouse) -> None:
    await warehouse.run(warehouse.source())
    before = warehouse.rows(), warehouse.rows("cohorts")
    requests = warehouse.fake.cohort_requests
    await warehouse.run(warehouse.source())
    # a fresh pipelines directory (a new worker) reads the state back from the destination
    await warehouse.run(warehouse.source(), pipelines_dir="elsewhere")
    assert warehouse.fake.cohort_requests == requests
    assert (warehouse.rows(), warehouse.rows("cohorts")) == before


async def test_a_touched_cohort_is_replaced_by_its_new_export(warehouse: Warehouse) -> None:
    await warehouse.run(warehouse.source())
    others = warehouse.members("alpha"), warehouse.members("gamma")
    old_beta = warehouse.members("beta")
    warehouse.fake.touch("beta", churn=0.2)
    requests = warehouse.fake.cohort_requests
    await warehouse.run(warehouse.source())
    assert warehouse.fake.cohort_requests == requests + 1  # beta only
    assert warehouse.members("beta") == warehouse.expected("beta") != old_beta
    assert (warehouse.members("alpha"), warehouse.members("gamma")) == others


def duplicates(warehouse: Warehouse) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(warehouse.database), read_only=True) as connection:
        return connection.execute(
            "SELECT cohort_id, amplitude_id, count(*) FROM amplitude.cohort_members "
            "GROUP BY ALL HAVING count(*) > 1").fetchall()


async def run_worker(warehouse: Warehouse, kill_at: str) -> int:
    """The source into the same DuckDB file from a process of its own; its exit status."""
    env = {**os.environ, "AMPLITUDE_API_KEY": warehouse.fake.api_key,
           "AMPLITUDE_SECRET_KEY": warehouse.fake.secret_key,
           "RUNTIME__DLTHUB_TELEMETRY": "false"}
    command = [sys.executable, "-m", "tests.dlt_worker", warehouse.base_url,
               str(warehouse.database), str(warehouse.directory / "worker-pipelines"),
               str(warehouse.directory / "limits.sqlite3"), kill_at]
    done = await anyio.run_process(command, env=env, check=False,
                                   cwd=pathlib.Path(__file__).parent.parent)
    if done.returncode not in (0, -signal.SIGKILL):  # say why, not only that it failed
        pytest.fail(f"the worker exited {done.returncode}:\n{done.stderr.decode()[-4000:]}")
    return done.returncode


@pytest.mark.parametrize("kill_at", ["extract", "before_load", "mid_merge"])
async def test_a_run_killed_in_the_middle_then_rerun_leaves_no_duplicate_or_missing_member(
    warehouse: Warehouse, kill_at: str,
) -> None:
    assert await run_worker(warehouse, "never") == 0
    warehouse.fake.touch("beta", churn=0.3)
    requests = warehouse.fake.cohort_requests
    assert await run_worker(warehouse, kill_at) == -signal.SIGKILL
    assert await run_worker(warehouse, "never") == 0
    for cohort_id in ("alpha", "beta", "gamma"):
        assert warehouse.members(cohort_id) == warehouse.expected(cohort_id)
    assert duplicates(warehouse) == []
    # the killed run had exported beta: the rerun loads that copy and spends nothing
    assert warehouse.fake.cohort_requests == requests + 1


async def test_a_cohort_that_became_empty_loses_its_rows(warehouse: Warehouse) -> None:
    await warehouse.run(warehouse.source())
    gamma = warehouse.fake.cohorts["gamma"]
    gamma.replace([])
    gamma.last_computed += 60
    await warehouse.run(warehouse.source())
    assert warehouse.members("gamma") == []
    assert warehouse.members("beta") == warehouse.expected("beta")
    with duckdb.connect(str(warehouse.database), read_only=True) as connection:
        markers = connection.execute("SELECT count(*) FROM amplitude.cohort_members "
                                     "WHERE _cohort_emptied IS NOT NULL").fetchone()
    assert markers == (0,)


async def test_no_key_reaches_a_log_record_or_the_trace(
    warehouse: Warehouse, caplog: pytest.LogCaptureFixture,
) -> None:
    import base64
    import logging

    secrets = (warehouse.fake.api_key, warehouse.fake.secret_key, base64.b64encode(
        f"{warehouse.fake.api_key}:{warehouse.fake.secret_key}".encode()).decode())
    source = warehouse.source(["alpha", "nope"])  # a missing cohort is logged
    caplog.set_level(logging.DEBUG)
    pipeline = warehouse.pipeline()
    await anyio.to_thread.run_sync(pipeline.run, source)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "nope" in text
    shown = text + repr(source) + str(pipeline.last_trace) + repr(source.resources)
    for secret in secrets:
        assert secret not in shown


def test_the_duckdb_example_loads_then_loads_only_the_change(tmp_path: pathlib.Path) -> None:
    import subprocess

    example = pathlib.Path(__file__).parent.parent / "examples" / "dlt_duckdb.py"
    done = subprocess.run(
        [sys.executable, str(example), "--demo", "--database", str(tmp_path / "a.duckdb"),
         "--pipelines-dir", str(tmp_path / "pipelines")],
        capture_output=True, text=True, check=True, timeout=300,
        env={**os.environ, "RUNTIME__DLTHUB_TELEMETRY": "false"},
    )
    first, second = done.stdout.split("-- run 2")
    assert "cohort requests this run: 2" in first
    assert "power_users Cohort power_users              5,000" in first
    assert "cohort requests this run: 1" in second  # churn_risk only
    assert "joined since the last run: churn_risk +120\n" in second  # 10 % churn of 1,200
    assert "power_users Cohort power_users              5,000" in second


@pytest.mark.parametrize("bad", [{"cohort_ids": "abc"}, {"cohort_ids": ["ok", ""]},
                                 {"cohort_ids": [3]}, {"props": "yes"}])
def test_bad_arguments_are_refused_before_anything_runs(bad: dict[str, Any]) -> None:
    with pytest.raises(amp.InvalidRequestError):
        amplitude_cohorts(**{"api_key": "k", "secret_key": "s", **bad})
