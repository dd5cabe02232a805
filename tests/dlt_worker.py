"""Run the dlt source into DuckDB in a process of its own, killed at a chosen point.

    python -m tests.dlt_worker BASE_URL DATABASE PIPELINES_DIR LIMITS_FILE KILL_AT

KILL_AT: ``never``; ``extract`` (SIGKILL after the first member batch left the source);
``before_load`` (after extract and normalize, before anything is loaded); ``mid_merge`` (at
the first DELETE of the members' merge, inside its transaction). The keys come from
AMPLITUDE_API_KEY / AMPLITUDE_SECRET_KEY.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import dlt

from amp_cohorts_async.dlt import amplitude_cohorts

from .test_dlt import QUICK_POLL, SCALED

PIPELINE = "killed"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_first_merge_delete() -> None:
    from dlt.destinations.impl.duckdb.sql_client import DuckDbSqlClient

    execute = DuckDbSqlClient.execute_sql

    def dying(self: Any, sql: Any, *args: Any, **kwargs: Any) -> Any:
        if "DELETE FROM" in str(sql) and "cohort_members" in str(sql):
            die()
        return execute(self, sql, *args, **kwargs)

    DuckDbSqlClient.execute_sql = dying  # type: ignore[method-assign]


def main(base_url: str, database: str, pipelines_dir: str, limits_file: str,
         kill_at: str) -> None:
    source = amplitude_cohorts(base_url=base_url, poll=QUICK_POLL, limits=SCALED,
                               limits_url=f"file:{limits_file}")
    if kill_at == "extract":
        source.cohort_members.add_map(lambda batch: (die(), batch)[1])
    pipeline = dlt.pipeline(pipeline_name=PIPELINE, pipelines_dir=pipelines_dir,
                            destination=dlt.destinations.duckdb(database),
                            dataset_name="amplitude")
    if kill_at == "before_load":
        pipeline.extract(source)
        pipeline.normalize()
        die()
    if kill_at == "mid_merge":
        kill_at_first_merge_delete()
    pipeline.run(source)


if __name__ == "__main__":
    main(*sys.argv[1:6])
