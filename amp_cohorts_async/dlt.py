"""A dlt source of Amplitude cohorts and their members (the ``dlt`` extra).

    source = amplitude_cohorts(["abc123"], props=True)
    dlt.pipeline(pipeline_name="amplitude", destination="duckdb").run(source)

Two resources: ``cohorts`` (the list, merged on ``id``) and ``cohort_members`` (one row per
member, typed as ``iter_arrow_batches`` types them, with a ``cohort_id`` column).

Only what changed is exported. The ``cohort_members`` resource keeps, in dlt's resource
state, the ``last_computed`` (and the ``props`` setting) of the export it last loaded for each
cohort. dlt writes that state into the destination in the same load package as the rows and
reads back only the state of completed loads, so a fresh pipelines directory (a new Airflow
worker, a CI runner) still knows what is loaded, and a run that died before its load completed
counts as not having happened. A run asks the list (no quota) and exports only the cohorts whose
``last_computed`` differs from the loaded one, through ``CohortsClient.sync_cohorts``: a
cohort whose verified copy is already in the exports directory (a run killed after its download
but before its load) is loaded from that copy without spending quota again.

Per-cohort replace, not scd2. The table is written with dlt's ``delete-insert`` merge on
``merge_key="cohort_id"``: a load deletes every row of the cohorts it carries and inserts their
new export in one transaction, and leaves every other cohort's rows alone. So the table is, at
any time, exactly each cohort's latest loaded export, with no filter to remember; the cost of
a changed cohort is one delete and one insert, and an unchanged one costs nothing. A cohort
whose new export is empty sends one marker row with ``_cohort_emptied`` true, dlt's hard delete:
its rows are deleted and the marker is not loaded (the column stays null in the table). dlt's
``scd2`` would keep join/leave history, but a plain query of the table would then return
members who left long ago (the current ones are those with ``_dlt_valid_to IS NULL``), and
every load would hash every row and compare the whole cohort against its history in the
destination. Who joined or left between two exports is what ``amp.diff_members`` answers from
the files, and what a query against a snapshot taken before the run shows (see the example).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from typing import Any

import attrs
import dlt
import pyarrow as pa
from dlt.extract.source import DltSource

from ._arrow import iter_arrow_batches
from ._client import CohortsClient
from ._config import Limits, PollPolicy
from ._exceptions import InvalidRequestError
from ._file_limits import FileLimits
from ._limits import LimitsBackend
from ._models import Cohort
from ._validate import require_bool, require_text

try:  # a redis:// limits_url needs the optional redis extra
    from .redis import RedisLimits
except ImportError:  # pragma: no cover - the dev extra installs it
    RedisLimits = None  # type: ignore[assignment, misc]

__all__ = ("amplitude_cohorts",)

logger = logging.getLogger("amp_cohorts_async")

MEMBERS = "cohort_members"
COHORTS = "cohorts"
# dlt's hard-delete column: set only on the marker row of a cohort whose export is empty.
EMPTIED = "_cohort_emptied"
# Exports land here, under the pipeline's working directory, unless exports_dir is given.
_EXPORTS_SUBDIR = "amplitude_exports"


@attrs.frozen(kw_only=True)
class _Settings:
    """What both resources need to build a client. The keys never show in a repr."""

    cohort_ids: tuple[str, ...] | None
    api_key: str | None = attrs.field(repr=False)
    secret_key: str | None = attrs.field(repr=False)
    region: str
    base_url: str | None
    props: bool
    limits_url: str | None = attrs.field(repr=False)  # may carry a Redis password
    limits: Limits | None
    exports_dir: str | None
    poll: PollPolicy | None

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[CohortsClient]:
        """A client on the account's shared limits, both closed on the way out."""
        backend = _limits_backend(self.limits_url)
        async with backend, self.unopened_client(backend) as client:
            yield client

    def unopened_client(self, backend: LimitsBackend | None = None) -> CohortsClient:
        return CohortsClient(self.api_key, self.secret_key, region=self.region,
                             base_url=self.base_url, limits=self.limits, poll=self.poll,
                             limits_backend=backend)


def _limits_backend(url: str | None) -> FileLimits | RedisLimits:
    """``None``: this app's file in the user's cache; ``file:PATH``: that file; otherwise a
    Redis URL."""
    if url is None:
        return FileLimits()
    if url.startswith("file:"):
        return FileLimits(url.removeprefix("file:"))
    if RedisLimits is None:
        raise InvalidRequestError("a redis:// limits_url needs redis-py: "
                                  "pip install 'amp-cohorts-async[redis]'")
    return RedisLimits.from_url(url)


def _selected(listed: Sequence[Cohort], cohort_ids: tuple[str, ...] | None) -> list[Cohort]:
    """The cohorts asked for, in the order asked; every cohort not archived for None."""
    if cohort_ids is None:
        return [cohort for cohort in listed if not cohort.archived]
    by_id = {cohort.id: cohort for cohort in listed}
    missing = [cohort_id for cohort_id in cohort_ids if cohort_id not in by_id]
    if missing:
        logger.warning("cohorts not in Amplitude's list, not loaded: %s", ", ".join(missing))
    return [by_id[cohort_id] for cohort_id in cohort_ids if cohort_id in by_id]


def _version(last_computed: datetime | None, props: bool) -> str | None:
    """What the state records of a loaded export; None: never counts as loaded."""
    if last_computed is None:
        return None
    return f"{last_computed.isoformat()} props={int(props)}"


# Fields the list often sends empty: typed here, so that the table has them from the start.
_COHORT_HINTS: dict[str, Any] = {
    "chart_id": {"data_type": "text"}, "edit_id": {"data_type": "text"},
    "location_id": {"data_type": "text"}, "last_viewed": {"data_type": "timestamp"},
    "metadata": {"data_type": "json"}, "popularity": {"data_type": "double"},
    "view_count": {"data_type": "bigint"},
}


def _cohort_row(cohort: Cohort) -> dict[str, Any]:
    return attrs.asdict(cohort)


async def _cohort_rows(settings: _Settings) -> AsyncIterator[list[dict[str, Any]]]:
    async with settings.client() as client:
        listed = await client.list_cohorts(include_sync_info=True)
    yield [_cohort_row(cohort) for cohort in _selected(listed, settings.cohort_ids)]


_COHORT_ID: pa.Field[Any] = pa.field("cohort_id", pa.string(), nullable=False)


def _with_cohort_id(batch: pa.RecordBatch, cohort_id: str) -> pa.RecordBatch:
    column = pa.repeat(pa.scalar(cohort_id, pa.string()), batch.num_rows)
    fields: list[pa.Field[Any]] = [_COHORT_ID, *batch.schema]
    schema = pa.schema(fields)
    return pa.RecordBatch.from_arrays([column, *batch.columns], schema=schema)


def _emptied(cohort_id: str) -> pa.RecordBatch:
    """A row that deletes every row of the cohort and is not itself loaded (a hard delete)."""
    return pa.RecordBatch.from_arrays(
        [pa.array([cohort_id], pa.string()), pa.array([True])],
        schema=pa.schema([_COHORT_ID, pa.field(EMPTIED, pa.bool_(), nullable=True)]))


async def _member_batches(settings: _Settings) -> AsyncIterator[pa.RecordBatch]:
    # The name is passed: dlt cannot tell which resource asks from an async generator.
    loaded: dict[str, str] = dlt.current.resource_state(MEMBERS).setdefault("loaded", {})
    exports_dir = settings.exports_dir or os.path.join(dlt.current.pipeline().working_dir,
                                                       _EXPORTS_SUBDIR)
    async with settings.client() as client:
        listed = await client.list_cohorts()
        changed = [cohort for cohort in _selected(listed, settings.cohort_ids)
                   if (version := _version(cohort.last_computed, settings.props)) is None
                   or loaded.get(cohort.id) != version]
        if not changed:
            return
        report = await client.sync_cohorts(changed, exports_dir, props=settings.props,
                                           keep_versions=1)
        for entry in report.entries:
            if entry.action not in ("downloaded", "unchanged") or entry.path is None:
                logger.warning("cohort %s not loaded this run: %s%s", entry.cohort_id,
                               entry.action, f" ({entry.error})" if entry.error else "")
                continue
            rows = 0
            async for batch in iter_arrow_batches(entry.path):
                rows += batch.num_rows
                yield _with_cohort_id(batch, entry.cohort_id)
            if not rows:  # nothing carries the cohort's id, so a marker clears its old rows
                yield _emptied(entry.cohort_id)
            # Recorded after the cohort's last batch; dlt keeps it only with a completed load.
            version = _version(entry.last_computed, settings.props)
            if version is not None:
                loaded[entry.cohort_id] = version


def amplitude_cohorts(
    cohort_ids: Sequence[str] | None = None,
    *,
    api_key: str | None = None,
    secret_key: str | None = None,
    region: str = "us",
    base_url: str | None = None,
    props: bool = False,
    limits_url: str | None = None,
    limits: Limits | None = None,
    exports_dir: str | os.PathLike[str] | None = None,
    poll: PollPolicy | None = None,
) -> DltSource:
    """A dlt source with the resources ``cohorts`` and ``cohort_members``.

    ``cohort_ids=None`` selects every cohort the list shows that is not archived. Keys default
    to AMPLITUDE_API_KEY / AMPLITUDE_SECRET_KEY, as for ``CohortsClient``. The limits are
    shared with every other client of the account: ``limits_url=None`` uses ``FileLimits()``
    (this host), ``"file:PATH"`` that file, ``"redis://..."`` a ``RedisLimits``. ``limits``
    and ``poll`` are the client's ``Limits`` and ``PollPolicy``. ``exports_dir`` keeps the
    export files (default: ``amplitude_exports`` in the pipeline's working directory).
    """
    ids = None if cohort_ids is None else tuple(
        require_text(cohort_id, "cohort_ids item") for cohort_id in _sequence(cohort_ids))
    settings = _Settings(
        cohort_ids=ids, api_key=api_key, secret_key=secret_key, region=region,
        base_url=base_url, props=require_bool(props, "props"), limits_url=limits_url,
        limits=limits, exports_dir=None if exports_dir is None else os.fspath(exports_dir),
        poll=poll,
    )

    @dlt.source(name="amplitude", max_table_nesting=0)
    def amplitude() -> Iterator[Any]:
        yield dlt.resource(_cohort_rows, name=COHORTS, write_disposition="merge",
                           primary_key="id", columns=_COHORT_HINTS)(settings)
        yield dlt.resource(
            _member_batches, name=MEMBERS,
            write_disposition={"disposition": "merge", "strategy": "delete-insert"},
            merge_key="cohort_id",
            columns={EMPTIED: {"data_type": "bool", "hard_delete": True}},
        )(settings)

    return amplitude()


def _sequence(value: Any) -> Sequence[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidRequestError("cohort_ids must be a sequence of cohort ids or None")
    return value
