"""Type-checked (mypy --strict), never run: the public API as a user writes it."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import amp_cohorts_async as amp


async def typed_usage() -> None:
    async with amp.CohortsClient(
        "key", "secret", region="eu", limits=amp.Limits(max_jobs_in_flight=10),
        retry=amp.RetryPolicy(max_attempts=3), poll=amp.PollPolicy(deadline=None),
    ) as client:
        cohorts: list[amp.Cohort] = await client.list_cohorts(include_sync_info=True)
        request: amp.CohortRequest = await client.request_cohort(cohorts[0].id, props=True)
        status: amp.RequestStatus = await client.get_request_status(request.request_id)
        done: bool = status.done
        result: amp.DownloadResult = await client.download_file(request.request_id, "x.csv")
        path: pathlib.Path = result.path
        tries: int = result.attempts + result.retries
        held: Mapping[str, float] = result.waited
        usage: amp.Usage = await client.get_usage()
        remaining: int = usage.remaining

        def show(event: amp.ProgressEvent) -> None:
            print(event.phase, event.bytes_done, event.bytes_total, event.wait_seconds)

        outcomes: list[amp.CohortOutcome] = await client.download_cohorts(
            ["a", "b"], "out", on_progress=show
        )
        errors: list[amp.AmplitudeError | None] = [o.error for o in outcomes]
        retried: list[int] = [o.retries for o in outcomes]
        report = await client.sync_cohorts(["a"], "out")
        waits: list[Mapping[str, float]] = [entry.waited for entry in report.entries]
        upload: amp.UploadResult = await client.upload_cohort(
            name="n", app_id=1, id_type=amp.IdType.BY_USER_ID, ids=["u1"], owner="o",
            published=False,
        )
        membership: amp.MembershipResult = await client.update_membership(
            upload.cohort_id,
            [amp.MembershipChange(ids=["u2"], id_type=amp.MembershipIdType.BY_NAME,
                                  operation=amp.Operation.ADD)],
        )
        skipped: list[str] = membership.memberships_result[0].skipped_ids
        async for row in amp.iter_members(path):
            user_id: str = row["user_id"]
            print(user_id, done, remaining, errors, skipped, tries, held, retried, waits)


async def typed_arrow_usage(path: pathlib.Path) -> None:
    import pyarrow as pa

    async for batch in amp.iter_arrow_batches(path, batch_rows=10_000):
        record_batch: pa.RecordBatch = batch
        ids: pa.Array[pa.Int64Scalar] = record_batch.column("amplitude_id")
        print(ids)


def typed_blocking_usage() -> None:
    from amp_cohorts_async import blocking

    with blocking.CohortsClient("key", "secret", region="eu") as client:
        cohorts: list[amp.Cohort] = client.list_cohorts(include_sync_info=True)
        outcomes: list[amp.CohortOutcome] = client.download_cohorts([cohorts[0]], "out")
        user_ids: list[str] = [row["user_id"] for row in blocking.iter_members("x.csv")]
        columns: list[tuple[str, ...]] = [
            batch.columns for batch in blocking.iter_member_batches("x.csv", batch_rows=100)]
        print(outcomes, user_ids, columns)


def typed_telemetry_usage() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from amp_cohorts_async import blocking

    providers = {"tracer_provider": TracerProvider(), "meter_provider": MeterProvider()}
    async_client = amp.CohortsClient("key", "secret", tracer_provider=TracerProvider(),
                                     meter_provider=MeterProvider())
    with blocking.CohortsClient("key", "secret", tracer_provider=TracerProvider(),
                                meter_provider=MeterProvider()) as client:
        print(async_client, client, providers)
