"""upload_cohort and update_membership at any size; nothing applied by halves in silence."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amp_cohorts_async as amp
from amp_cohorts_async._upload import pack
from amp_cohorts_async.testing import FakeAmplitude

BASE = {"name": "Warehouse", "app_id": 123, "owner": "data@example.com", "published": True}


def user_ids(n: int, prefix: str = "u") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


async def test_upload_250001_ids_in_three_requests(
    client: amp.CohortsClient, fake: FakeAmplitude
) -> None:
    ids = user_ids(250_001)
    fake.add_users(ids)  # Amplitude matches only users the project knows
    result = await client.upload_cohort(**BASE, id_type="BY_USER_ID", ids=iter(ids))
    assert all(entry.status == 200 for entry in fake.log)
    uploads = fake.requests_to("upload")
    memberships = fake.requests_to("membership")
    assert len(uploads) == 1
    assert len(memberships) == 2
    assert fake.member_ids(result.cohort_id) == set(ids)
    assert (result.matched, result.totals, result.requests_sent) == (250_001, 250_001, 3)
    assert not fake.violations  # no request carried more than 100,000 ids


async def test_upload_chunks_use_the_matching_membership_id_type(
    client: amp.CohortsClient, fake: FakeAmplitude
) -> None:
    bodies: list[dict[str, Any]] = []
    original = fake.handle

    async def spy(request: Any) -> Any:
        if request.body:
            bodies.append(json.loads(request.body))
        return await original(request)

    fake.handle = spy  # type: ignore[method-assign]
    limits = amp.Limits(max_ids_per_request=3)
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 limits=limits) as small_chunks:
        await small_chunks.upload_cohort(**BASE, id_type=amp.IdType.BY_AMP_ID,
                                         ids=[str(i) for i in range(7)], cg="org")
    assert [len(b.get("ids") or b["memberships"][0]["ids"]) for b in bodies] == [3, 3, 1]
    assert bodies[0]["cg"] == "org"
    assert bodies[1]["memberships"][0]["id_type"] == "BY_ID"
    assert bodies[1]["memberships"][0]["operation"] == "ADD"
    assert bodies[1]["count_group"] == "org"


async def test_upload_accepts_async_iterables_and_removes_duplicates(
    client: amp.CohortsClient, fake: FakeAmplitude
) -> None:
    async def gen() -> AsyncIterator[str]:
        for value in ["a", "b", "a", "c", "b"]:
            yield value

    fake.add_users(["a", "b", "c"])
    result = await client.upload_cohort(**BASE, id_type="BY_USER_ID", ids=gen())
    assert result.duplicates_removed == 2
    assert result.totals == 3
    assert fake.member_ids(result.cohort_id) == {"a", "b", "c"}


async def test_replace_an_existing_cohort(client: amp.CohortsClient, fake: FakeAmplitude) -> None:
    fake.add_cohort("existing", size=0, members=[])
    fake.add_users(["x", "y", "z"])
    first = await client.upload_cohort(**BASE, id_type="BY_USER_ID", ids=["x", "y"],
                                       existing_cohort_id="existing")
    assert first.cohort_id == "existing"
    await client.upload_cohort(**BASE, id_type="BY_USER_ID", ids=["z"],
                               existing_cohort_id="existing")
    assert fake.member_ids("existing") == {"z"}


async def test_skip_save_validates_every_chunk_and_saves_nothing(fake: FakeAmplitude) -> None:
    known = sorted(fake.member_ids("large", by="amplitude_id"))[:4]
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 limits=amp.Limits(max_ids_per_request=2)) as client:
        result = await client.upload_cohort(**BASE, id_type="BY_AMP_ID",
                                            ids=[*known[:2], "x", *known[2:]], skip_save=True)
    assert len(fake.requests_to("upload")) == 3
    assert not fake.requests_to("membership")
    assert (result.matched, result.totals, result.invalid_ids_sample) == (4, 5, ["x"])
    assert set(fake.cohorts) == {"small", "large"}


@pytest.mark.looptime
async def test_failure_on_chunk_2_of_3_is_reported_precisely(fake: FakeAmplitude) -> None:
    fake.inject("membership", "status", status=500, times=10)
    ids = user_ids(25)
    fake.add_users(ids)
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 limits=amp.Limits(max_ids_per_request=10),
                                 retry=amp.RetryPolicy(max_attempts=2)) as client:
        with pytest.raises(amp.PartialWriteError) as caught:
            await client.upload_cohort(**BASE, id_type="BY_USER_ID", ids=ids)
    error = caught.value
    assert (error.applied_chunks, error.total_chunks, error.applied_ids) == (1, 3, 10)
    assert error.pending_ids == [ids[10:]]
    assert isinstance(error.__cause__, amp.ServerError)
    assert "1 of 3 requests" in str(error)
    assert "10 of 25 ids" in str(error)
    assert error.cohort_id is not None
    assert fake.member_ids(error.cohort_id) == set(ids[:10])


async def test_failure_on_the_first_chunk_raises_the_error_itself(
    client: amp.CohortsClient, fake: FakeAmplitude
) -> None:
    with pytest.raises(amp.NotFoundError):
        await client.upload_cohort(**BASE, id_type="BY_USER_ID", ids=["a"],
                                   existing_cohort_id="nope")


async def test_membership_add_and_remove_150000_ids(
    client: amp.CohortsClient, fake: FakeAmplitude
) -> None:
    fake.add_cohort("target", size=0, members=[])
    adds = user_ids(150_000, "a")
    fake.add_users([*adds, "new"])
    result = await client.update_membership("target", [
        amp.MembershipChange(ids=adds, id_type="BY_NAME", operation="ADD")])
    assert fake.member_ids("target") == set(adds)
    assert result.requests_sent == 2
    removes = adds[:150_000:2]
    result = await client.update_membership("target", [
        amp.MembershipChange(ids=[*removes, "never-there"], id_type="BY_NAME",
                             operation="REMOVE"),
        amp.MembershipChange(ids=["new"], id_type="BY_NAME", operation="ADD")])
    assert fake.member_ids("target") == set(adds[1::2]) | {"new"}
    assert [o.skipped_ids for o in result.memberships_result] == [["never-there"], []]
    assert [o.operation for o in result.memberships_result] == [amp.Operation.REMOVE,
                                                                 amp.Operation.ADD]
    assert not fake.violations


@pytest.mark.looptime
async def test_membership_failure_part_way(fake: FakeAmplitude) -> None:
    fake.add_cohort("target", size=0, members=[])
    ok = fake.handle
    calls = 0

    async def fail_second(request: Any) -> Any:
        nonlocal calls
        if not request.to_s3 and request.path.endswith("/membership"):
            calls += 1
            if calls >= 2:
                fake.inject("membership", "status", status=404)
        return await ok(request)

    fake.handle = fail_second  # type: ignore[method-assign]
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 limits=amp.Limits(max_ids_per_request=4)) as client:
        with pytest.raises(amp.PartialWriteError) as caught:
            await client.update_membership("target", [
                amp.MembershipChange(ids=user_ids(3, "x"), id_type="BY_NAME", operation="ADD"),
                amp.MembershipChange(ids=user_ids(3, "y"), id_type="BY_NAME", operation="ADD"),
            ])
    error = caught.value
    assert (error.applied_chunks, error.total_chunks, error.applied_ids) == (1, 2, 4)
    assert error.pending_ids == [[], ["y1", "y2"]]


async def test_writes_to_one_cohort_are_serialised(
    client: amp.CohortsClient, fake: FakeAmplitude
) -> None:
    import anyio

    fake.add_cohort("target", size=0, members=[])
    fake.add_users(id_ for prefix in "abcd" for id_ in user_ids(5, prefix))

    async def add(prefix: str) -> None:
        await client.update_membership("target", [
            amp.MembershipChange(ids=user_ids(5, prefix), id_type="BY_NAME", operation="ADD")])

    async with anyio.create_task_group() as group:
        for prefix in "abcd":
            group.start_soon(add, prefix)
    assert not fake.violations
    assert len(fake.member_ids("target")) == 20


def _upload(**overrides: Any) -> dict[str, Any]:
    return {**BASE, "id_type": "BY_USER_ID", "ids": ["a"], **overrides}


def _too_many() -> Iterator[str]:
    return (str(i) for i in range(11))


BAD_UPLOADS: list[tuple[dict[str, Any], str]] = [
    (_upload(name=""), "name must not be empty"),
    (_upload(name="   "), "name must not be empty"),
    (_upload(name=None), "name must be a string"),
    (_upload(owner=""), "owner must not be empty"),
    (_upload(owner=5), "owner must be a string"),
    (_upload(app_id=0), "app_id must be a positive int"),
    (_upload(app_id=-3), "app_id must be a positive int"),
    (_upload(app_id="123"), "app_id must be a positive int"),
    (_upload(app_id=True), "app_id must be a positive int"),
    (_upload(id_type="BY_EMAIL"), "id_type must be one of BY_AMP_ID, BY_USER_ID"),
    (_upload(id_type=None), "id_type must be one of"),
    (_upload(ids=[]), "ids must not be empty"),
    (_upload(ids=["a", ""]), r"ids\[1\] is an empty string"),
    (_upload(ids=["a", 7]), r"ids\[1\] must be a string, got int"),
    (_upload(ids=["a", None]), r"ids\[1\] must be a string"),
    (_upload(ids="abc"), "not a single string"),
    (_upload(ids=42), "must be an iterable"),
    (_upload(ids=_too_many()), "more than 10 distinct ids"),
    (_upload(published="yes"), "published must be a bool"),
    (_upload(skip_save=1), "skip_save must be a bool"),
    (_upload(skip_invalid_ids=None), "skip_invalid_ids must be a bool"),
    (_upload(cg=""), "cg must not be empty"),
    (_upload(existing_cohort_id=""), "existing_cohort_id must not be empty"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_UPLOADS)
async def test_bad_upload_inputs_send_nothing(
    fake: FakeAmplitude, kwargs: dict[str, Any], message: str
) -> None:
    async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                 limits=amp.Limits(max_cohort_size=10)) as client:
        with pytest.raises(amp.InvalidRequestError, match=message):
            await client.upload_cohort(**kwargs)
    assert fake.log == []


def _change(**overrides: Any) -> Any:
    return lambda: amp.MembershipChange(**{"ids": ["a"], "id_type": "BY_ID",
                                           "operation": "ADD", **overrides})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (_change(id_type="BY_EMAIL"), "id_type must be one of BY_ID, BY_NAME"),
        (_change(operation="DELETE"), "operation must be one of ADD, REMOVE"),
        (_change(ids="abc"), "not a single string"),
    ],
)
def test_bad_membership_change_construction(build: Any, message: str) -> None:
    with pytest.raises(amp.InvalidRequestError, match=message):
        build()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("", [_change()()]), {}, "cohort_id must not be empty"),
        (("c", []), {}, "memberships must not be empty"),
        (("c", _change()()), {}, "sequence of MembershipChange"),
        (("c", [{"ids": ["a"]}]), {}, r"memberships\[0\] must be a MembershipChange"),
        (("c", [_change(ids=[])()]), {}, r"memberships\[0\]: ids must not be empty"),
        (("c", [_change(ids=["", "b"])()]), {}, r"memberships\[0\]: ids\[0\] is an empty"),
        (("c", [_change()()]), {"count_group": ""}, "count_group must not be empty"),
        (("c", [_change()()]), {"skip_invalid_ids": "no"}, "skip_invalid_ids must be a bool"),
    ],
)
async def test_bad_membership_inputs_send_nothing(
    client: amp.CohortsClient, fake: FakeAmplitude, args: tuple[Any, ...],
    kwargs: dict[str, Any], message: str,
) -> None:
    with pytest.raises(amp.InvalidRequestError, match=message):
        await client.update_membership(*args, **kwargs)
    assert fake.log == []


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 1_000), size=st.integers(1, 300))
def test_chunking_covers_everything_in_order_within_the_limit(total: int, size: int) -> None:
    values = [str(i) for i in range(total)]
    chunks = [[v for _, piece in chunk.pieces for v in piece] for chunk in pack([values], size)]
    assert [v for chunk in chunks for v in chunk] == values
    assert all(1 <= len(chunk) <= size for chunk in chunks)
    assert len(chunks) == -(-total // size)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 25), min_size=1, max_size=6), limit=st.integers(1, 20))
def test_membership_packing_respects_the_limit(sizes: list[int], limit: int) -> None:
    from amp_cohorts_async.testing import run_in_virtual_time

    def main() -> Any:
        async def run() -> tuple[FakeAmplitude, amp.MembershipResult]:
            fake = FakeAmplitude()
            fake.add_cohort("t", size=0, members=[])
            changes = [amp.MembershipChange(ids=user_ids(n, f"c{i}-"), id_type="BY_NAME",
                                            operation="ADD") for i, n in enumerate(sizes)]
            fake.add_users(id_ for change in changes for id_ in change.ids)
            async with amp.CohortsClient(fake.api_key, fake.secret_key,
                                         transport=fake.transport(),
                                         limits=amp.Limits(max_ids_per_request=limit)) as c:
                return fake, await c.update_membership("t", changes)

        return run

    fake, result = run_in_virtual_time(main())
    total = sum(sizes)
    assert result.requests_sent == -(-total // limit)
    assert not fake.violations
    assert len(fake.member_ids("t")) == total
