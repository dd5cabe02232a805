"""apply_diff: REMOVE before ADD within the id limit, writes that never overlap, and a rerun
after a failure that leaves the target exactly equal to the source."""

from __future__ import annotations

import os
import pathlib
import sys
import uuid

import anyio
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude, Member

from .test_redis_limits import WORKER, _drive

LIMITS = amp.Limits(max_ids_per_request=3)
NO_RETRY = amp.RetryPolicy(max_attempts=1)


def export(path: pathlib.Path, amplitude_ids: list[int]) -> pathlib.Path:
    lines = ['"amplitude_id","user_id"'] + [f'"{i}","user-{i}"' for i in amplitude_ids]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def fake_with(cohort_id: str, amplitude_ids: list[int], **options: float) -> FakeAmplitude:
    fake = FakeAmplitude(**options)  # type: ignore[arg-type]
    fake.add_cohort(cohort_id, size=0,
                    members=[Member(str(i), f"user-{i}") for i in amplitude_ids])
    return fake


async def diff_of(tmp_path: pathlib.Path, old: list[int], new: list[int],
                  name: str = "diff") -> amp.MembershipDiff:
    return await amp.diff_members(export(tmp_path / f"{name}-old.csv", old),
                                  export(tmp_path / f"{name}-new.csv", new), tmp_path / name)


def client_of(fake: FakeAmplitude, **options: object) -> amp.CohortsClient:
    return amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                             limits=LIMITS, **options)  # type: ignore[arg-type]


async def test_removes_come_first_each_request_within_the_limit(tmp_path: pathlib.Path) -> None:
    old, new = list(range(1, 21)), list(range(8, 30))
    diff = await diff_of(tmp_path, old, new)
    with fake_with("target", old) as fake:
        async with client_of(fake) as client:
            result = await client.apply_diff("target", diff)
        changes = fake.membership_changes
        operations = [operation for _, operation, _ in changes]
        assert operations == ["REMOVE"] * 3 + ["ADD"] * 3  # 7 exiting, 9 entering, 3 a request
        assert [count for _, _, count in changes] == [3, 3, 1, 3, 3, 3]
        assert fake.member_ids("target", by="amplitude_id") == set(map(str, new))
    assert result.requests_sent == 6
    assert [o.operation for o in result.memberships_result] == [amp.Operation.REMOVE,
                                                                amp.Operation.ADD]
    assert not fake.violations


async def test_a_rerun_of_an_applied_diff_sends_nothing(tmp_path: pathlib.Path) -> None:
    diff = await diff_of(tmp_path, [1, 2], [2, 3])
    with fake_with("target", [1, 2]) as fake:
        async with client_of(fake) as client:
            await client.apply_diff("target", diff)
            again = await client.apply_diff("target", diff)
    assert again.requests_sent == 0
    assert len(fake.membership_changes) == 2


class FailingNthWrite(httpx.AsyncBaseTransport):
    """The emulator, except that the ``n``-th membership request is answered 500."""

    def __init__(self, fake: FakeAmplitude, n: int) -> None:
        self.inner = fake.transport()
        self.n = n
        self.seen = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/membership"):
            self.seen += 1
            if self.seen == self.n:
                return httpx.Response(500, json={"error": {"message": "boom"}})
        return await self.inner.handle_async_request(request)


@pytest.mark.parametrize("failing", [2, 3, 5])  # inside the removes, at the first add, later
async def test_failure_part_way_then_rerun_leaves_target_equal_to_source(
    tmp_path: pathlib.Path, failing: int
) -> None:
    old, new = list(range(1, 11)), list(range(6, 21))  # 5 exiting, 10 entering: 2 + 4 requests
    diff = await diff_of(tmp_path, old, new)
    with fake_with("target", old) as fake:
        transport = FailingNthWrite(fake, failing)
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=transport,
                                     limits=LIMITS, retry=NO_RETRY) as client:
            with pytest.raises(amp.PartialWriteError) as caught:
                await client.apply_diff("target", diff)
        error = caught.value
        assert error.applied_ids == sum(count for _, _, count in fake.membership_changes)
        exiting, entering = error.pending_ids
        assert len(exiting) + len(entering) == 5 + 10 - error.applied_ids
        assert "run apply_diff again" in str(error)
        sent_before = len(fake.membership_changes)
        async with client_of(fake) as client:
            rerun = await client.apply_diff("target", diff)
        assert fake.member_ids("target", by="amplitude_id") == set(map(str, new))
        # only the rest: the requests not applied before
        assert rerun.requests_sent == 6 - sent_before
    assert not fake.violations


@pytest.mark.looptime
async def test_two_tasks_never_overlap_writes_to_one_cohort(tmp_path: pathlib.Path) -> None:
    first = await diff_of(tmp_path, [1, 2, 3, 4], [3, 4, 5, 6, 7], name="first")
    second = await diff_of(tmp_path, [5, 6], [5, 6, 8, 9, 10, 11], name="second")
    with fake_with("target", [1, 2, 3, 4], write_duration=0.5) as fake:
        async with client_of(fake, retry=NO_RETRY) as client, anyio.create_task_group() as group:
            group.start_soon(client.apply_diff, "target", first)
            group.start_soon(client.apply_diff, "target", second)
    assert not fake.violations
    assert fake.member_ids("target", by="amplitude_id") == {str(i) for i in range(3, 12)}


@pytest.mark.looptime
async def test_two_clients_sharing_a_backend_never_overlap(tmp_path: pathlib.Path) -> None:
    first = await diff_of(tmp_path, [1], [1, 2, 3, 4, 5, 6], name="first")
    second = await diff_of(tmp_path, [1], [1, 7, 8, 9, 10, 11], name="second")
    shared = amp.InMemoryLimits()
    with fake_with("target", [1], write_duration=0.5) as fake:
        async with client_of(fake, retry=NO_RETRY, limits_backend=shared) as one, \
                client_of(fake, retry=NO_RETRY, limits_backend=shared) as other, \
                anyio.create_task_group() as group:
            group.start_soon(one.apply_diff, "target", first)
            group.start_soon(other.apply_diff, "target", second)
    assert not fake.violations
    assert fake.member_ids("target", by="amplitude_id") == {str(i) for i in range(1, 12)}


async def test_id_type_follows_the_key(tmp_path: pathlib.Path) -> None:
    old = export(tmp_path / "old.csv", [1, 2])
    new = export(tmp_path / "new.csv", [2, 3])
    diff = await amp.diff_members(old, new, tmp_path / "by-user", key="user_id")
    with fake_with("target", [1, 2]) as fake:
        fake.add_users(["user-3"])  # a user of the project, as an entering member is
        async with client_of(fake) as client:
            result = await client.apply_diff("target", diff)
        assert fake.member_ids("target") == {"user-2", "user-3"}
    assert {o.id_type for o in result.memberships_result} == {amp.MembershipIdType.BY_NAME}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("", "DIFF"), "cohort_id must not be empty"),
        (("c", "not a diff"), "diff must be a MembershipDiff"),
        (("c", "DIFF", "BY_EMAIL"), "id_type must be one of"),
        (("c", "CITY_DIFF"), "id_type is needed for a diff by 'city'"),
    ],
)
async def test_bad_input_before_any_request(
    tmp_path: pathlib.Path, arguments: tuple[str, ...], message: str
) -> None:
    diff = await diff_of(tmp_path, [1], [2])
    values = {"DIFF": diff, "CITY_DIFF": amp.MembershipDiff(
        entering_path=diff.entering_path, exiting_path=diff.exiting_path, entering=1,
        exiting=1, unchanged=0, no_key=0, key="city")}
    cohort_id, given, *id_type = arguments
    with fake_with("c", [1]) as fake:
        async with client_of(fake) as client:
            with pytest.raises(amp.InvalidRequestError, match=message):
                await client.apply_diff(cohort_id, values.get(given, given),  # type: ignore[arg-type]
                                        id_type=id_type[0] if id_type else None)
        assert fake.log == []


@pytest.mark.parametrize("kind", ["redis", "file", "memory"])
async def test_two_processes_never_overlap_with_a_shared_backend(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, kind: str
) -> None:
    """Each process adds 10 members, 2 a request; the emulator holds each write 50 ms. With
    the limits on Redis or in one file no write overlaps another; with each process's own
    limits (the contrast) they do, and the emulator answers 429 and records it."""
    shared = kind != "memory"
    spec = {"redis": lambda: request.getfixturevalue("redis_url"),
            "file": lambda: f"file:{tmp_path / 'limits.sqlite3'}",
            "memory": lambda: "memory"}[kind]()
    env = {**os.environ, "AMP_TEST_NAMESPACE": uuid.uuid4().hex}
    arguments = []
    for index in range(2):
        members = list(range(1 + 10 * index, 11 + 10 * index))
        old = export(tmp_path / f"old{index}.csv", [])
        new = export(tmp_path / f"new{index}.csv", members)
        arguments.append([str(old), str(new), str(tmp_path / f"diff{index}")])
    with fake_with("target", [], write_duration=0.05) as fake:
        async with fake.serve() as base_url:
            processes = [await anyio.open_process(
                [sys.executable, str(WORKER), "apply", base_url, spec, "target", *paths],
                env=env, stderr=None) for paths in arguments]
            readers = [BufferedByteReceiveStream(p.stdout) for p in processes if p.stdout]
            try:
                with anyio.fail_after(90):
                    results = await _drive(processes, readers)
            finally:
                for process in processes:
                    if process.returncode is None:
                        process.kill()
                    await process.aclose()
        if shared:
            assert [r["requests"] for r in results] == [5, 5]
        else:  # requests_sent counts every request sent: the contrast's 429s were sent again
            assert all(r["requests"] >= 5 for r in results)
        assert fake.member_ids("target", by="amplitude_id") == {str(i) for i in range(1, 21)}
        overlaps = [v for v in fake.violations if v.kind == "concurrent_write"]
    if shared:
        assert overlaps == []
    else:
        assert overlaps  # the contrast: without a shared backend the writes collide


@pytest.mark.parametrize("kind", ["memory", "file", "redis"])
async def test_the_write_lease_has_one_holder_per_cohort(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, kind: str
) -> None:
    backend: amp.LimitsBackend
    if kind == "redis":
        from amp_cohorts_async.redis import RedisLimits

        backend = RedisLimits.from_url(
            request.getfixturevalue("redis_url"), namespace=uuid.uuid4().hex, lease_ttl=0.5)
    elif kind == "file":
        backend = amp.FileLimits(tmp_path / "limits.sqlite3", lease_ttl=0.5)
    else:
        backend = amp.InMemoryLimits()
    backend.bind(amp.Limits(), "app")
    try:
        token = await backend.acquire_write("c1")
        assert token is not None
        assert await backend.acquire_write("c1") is None
        other = await backend.acquire_write("c2")  # another cohort: its own lease
        assert other is not None
        assert await backend.renew_write("c1", token)
        await backend.release_write("c1", "not-the-token")  # not its holder: nothing happens
        assert await backend.acquire_write("c1") is None
        await backend.release_write("c1", token)
        again = await backend.acquire_write("c1")
        assert again is not None
        assert again != token
        assert not await backend.renew_write("c1", token)  # an old token renews nothing
        if kind != "memory":  # a holder that stops renewing loses the lease after lease_ttl
            await anyio.sleep(0.7)
            taken = await backend.acquire_write("c1")
            assert taken is not None
            assert not await backend.renew_write("c1", again)
    finally:
        await backend.aclose()
