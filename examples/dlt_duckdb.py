"""Load Amplitude cohorts and their members into a local DuckDB file with dlt.

    pip install 'amp-cohorts-async[dlt]' duckdb
    python examples/dlt_duckdb.py --demo          # the built-in emulator: two runs, one change
    python examples/dlt_duckdb.py                 # Amplitude (AMPLITUDE_API_KEY / _SECRET_KEY)

Each run exports only the cohorts whose last_computed changed since they were loaded (dlt keeps
that in the DuckDB file itself), replaces those cohorts' members, and prints the members per
cohort and who joined since the previous run.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

import anyio
import dlt
import duckdb

import amp_cohorts_async as amp
from amp_cohorts_async.dlt import amplitude_cohorts
from amp_cohorts_async.testing import FakeAmplitude

DATASET = "amplitude"
# Who was a member before this run, kept beside the dataset to answer "who joined".
SNAPSHOT = "amplitude_before_run"

MEMBERS_PER_COHORT = f"""
SELECT c.id, c.name, count(m.cohort_id) AS members
FROM {DATASET}.cohorts AS c LEFT JOIN {DATASET}.cohort_members AS m ON m.cohort_id = c.id
GROUP BY ALL ORDER BY c.id
"""
# User cohorts' members are keyed by amplitude_id (a group cohort's by group_id).
JOINED_SINCE_LAST_RUN = f"""
SELECT cohort_id, count(*) AS joined FROM (
    SELECT cohort_id, amplitude_id FROM {DATASET}.cohort_members
    EXCEPT SELECT cohort_id, amplitude_id FROM {SNAPSHOT}.members
) GROUP BY cohort_id ORDER BY cohort_id
"""


def snapshot(database: pathlib.Path) -> None:
    """Keep who is a member now, before the run replaces the changed cohorts."""
    with duckdb.connect(str(database)) as connection:
        connection.execute(f"CREATE SCHEMA IF NOT EXISTS {SNAPSHOT}")
        exists = connection.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? "
            "AND table_name = 'cohort_members'", [DATASET]).fetchone()
        source = (f"SELECT cohort_id, amplitude_id FROM {DATASET}.cohort_members"
                  if exists and exists[0] else
                  "SELECT ''::VARCHAR AS cohort_id, 0::BIGINT AS amplitude_id WHERE false")
        connection.execute(f"CREATE OR REPLACE TABLE {SNAPSHOT}.members AS {source}")


def report(database: pathlib.Path) -> None:
    with duckdb.connect(str(database), read_only=True) as connection:
        print("members per cohort:")
        for cohort_id, name, members in connection.execute(MEMBERS_PER_COHORT).fetchall():
            print(f"  {cohort_id:<10} {name or '':<28} {members:>8,}")
        joined = connection.execute(JOINED_SINCE_LAST_RUN).fetchall()
        print("joined since the last run:", ", ".join(
            f"{cohort_id} +{count:,}" for cohort_id, count in joined) or "nobody")


def load(database: pathlib.Path, pipelines_dir: pathlib.Path, **source: Any) -> None:
    snapshot(database)
    pipeline = dlt.pipeline(pipeline_name="amplitude", pipelines_dir=str(pipelines_dir),
                            destination=dlt.destinations.duckdb(str(database)),
                            dataset_name=DATASET)
    info = pipeline.run(amplitude_cohorts(**source))
    print(f"loaded {len(info.loads_ids)} package(s) into {database}")
    report(database)


async def demo(database: pathlib.Path, pipelines_dir: pathlib.Path) -> None:
    """Two runs against the emulator on loopback, a cohort recomputed in between."""
    with FakeAmplitude(job_duration=0.2, seed=1) as fake:
        fake.add_cohort("power_users", size=5_000, properties=("city", "plan"))
        fake.add_cohort("churn_risk", size=1_200)
        async with fake.serve() as base_url:
            source = {"api_key": fake.api_key, "secret_key": fake.secret_key,
                      "base_url": base_url, "props": True,
                      "poll": amp.PollPolicy(initial_interval=0.2, jitter=0.0),
                      # the emulator's limits stay apart from those of your real app
                      "limits_url": f"file:{pipelines_dir / 'emulator-limits.sqlite3'}"}
            for run in (1, 2):
                if run == 2:
                    fake.touch("churn_risk")  # recomputed: some left, as many joined
                print(f"-- run {run}")
                requests = fake.cohort_requests
                await anyio.to_thread.run_sync(lambda: load(database, pipelines_dir, **source))
                print(f"cohort requests this run: {fake.cohort_requests - requests}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="load from the built-in emulator")
    parser.add_argument("--database", default="amplitude.duckdb", type=pathlib.Path)
    parser.add_argument("--pipelines-dir", default=".dlt-pipelines", type=pathlib.Path)
    args = parser.parse_args()
    if args.demo:
        anyio.run(demo, args.database, args.pipelines_dir)
    else:
        load(args.database, args.pipelines_dir)


if __name__ == "__main__":
    main()
