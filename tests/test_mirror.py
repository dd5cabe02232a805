"""mirror_cohort across two emulators: created, unchanged at no cost, updated exactly, an
interrupted apply finished by the next run, and an empty source that creates nothing."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import anyio
import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude

from .conftest import FAST_POLL
from .test_apply_diff import FailingNthWrite

pytestmark = pytest.mark.looptime


def client_of(fake: FakeAmplitude, transport: httpx.AsyncBaseTransport | None = None,
              **options: object) -> amp.CohortsClient:
    return amp.CohortsClient(fake.api_key, fake.secret_key,
                             transport=transport or fake.transport(), poll=FAST_POLL,
                             **options)  # type: ignore[arg-type]


def user_ids(fake: FakeAmplitude, cohort_id: str) -> set[str]:
    return fake.member_ids(cohort_id, by="user_id")


def without_user_id(fake: FakeAmplitude, cohort_id: str) -> int:
    return sum(not m.user_id for m in fake.cohorts[cohort_id].iter_members())


def writes(fake: FakeAmplitude) -> int:
    return len(fake.requests_to("upload")) + len(fake.requests_to("membership"))


async def test_created_unchanged_updated(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    with FakeAmplitude(job_duration=3.0) as origin, FakeAmplitude() as copy:
        copy.knows_users_of(origin)  # the same people in both projects
        origin.add_cohort("src", size=60)
        async with client_of(origin) as source, client_of(copy) as target:
            first = await amp.mirror_cohort(source, target, "src", state, app_id=7,
                                            owner="o@example.com", name="Mirrored")
            assert first.action == "created"
            target_id = first.target_cohort_id
            assert target_id is not None
            assert copy.cohorts[target_id].name == "Mirrored"
            assert user_ids(copy, target_id) == user_ids(origin, "src")
            assert first.entering == len(user_ids(origin, "src"))
            assert first.skipped_no_user_id == without_user_id(origin, "src") > 0

            requests, written = origin.cohort_requests, writes(copy)
            again = await amp.mirror_cohort(source, target, "src", state, app_id=7,
                                            owner="o@example.com", name="Mirrored")
            assert again.action == "unchanged"
            assert (again.entering, again.exiting) == (0, 0)
            assert again.target_cohort_id == target_id
            assert origin.cohort_requests == requests  # no quota
            assert writes(copy) == written  # no write

            before = user_ids(origin, "src")
            origin.touch("src", churn=0.25)
            after = user_ids(origin, "src")
            updated = await amp.mirror_cohort(source, target, "src", state, app_id=7,
                                              owner="o@example.com", name="Mirrored")
            assert updated.action == "updated"
            assert updated.entering == len(after - before)
            assert updated.exiting == len(before - after)
            assert updated.skipped_no_user_id == without_user_id(origin, "src")
            assert user_ids(copy, target_id) == after
            assert len(copy.cohorts) == 1  # one target, ever
    assert not origin.violations
    assert not copy.violations


async def test_an_interrupted_apply_is_finished_by_the_next_run(tmp_path: pathlib.Path
                                                                ) -> None:
    state = tmp_path / "state"
    limits = amp.Limits(max_ids_per_request=2)
    with FakeAmplitude(job_duration=3.0) as origin, FakeAmplitude() as copy:
        copy.knows_users_of(origin)  # the same people in both projects
        origin.add_cohort("src", size=40)
        async with client_of(origin) as source, client_of(copy, limits=limits) as target:
            created = await amp.mirror_cohort(source, target, "src", state, app_id=7,
                                              owner="o@example.com")
        target_id = created.target_cohort_id
        assert target_id is not None
        before = user_ids(origin, "src")
        origin.touch("src", churn=0.3)
        after = user_ids(origin, "src")
        changes_before = len(copy.membership_changes)
        failing = FailingNthWrite(copy, 3)
        async with client_of(origin) as source, client_of(
                copy, failing, limits=limits, retry=amp.RetryPolicy(max_attempts=1)) as target:
            with pytest.raises(amp.PartialWriteError):
                await amp.mirror_cohort(source, target, "src", state, app_id=7,
                                        owner="o@example.com")
        assert json.loads((state / "mirror.json").read_text())["pending"] is not None
        assert user_ids(copy, target_id) not in (before, after)  # part way
        async with client_of(origin) as source, client_of(copy, limits=limits) as target:
            finished = await amp.mirror_cohort(source, target, "src", state, app_id=7,
                                               owner="o@example.com")
        assert finished.action == "updated"
        assert user_ids(copy, target_id) == after
        # every change applied exactly once across the failed run and the rerun
        applied = sum(count for _, _, count in copy.membership_changes[changes_before:])
        assert applied == len(after - before) + len(before - after)
        assert json.loads((state / "mirror.json").read_text())["pending"] is None


async def test_an_empty_source_creates_no_target(tmp_path: pathlib.Path) -> None:
    with FakeAmplitude(job_duration=1.0) as origin, FakeAmplitude() as copy:
        copy.knows_users_of(origin)  # the same people in both projects
        origin.add_cohort("empty", size=0)
        async with client_of(origin) as source, client_of(copy) as target:
            result = await amp.mirror_cohort(source, target, "empty", tmp_path, app_id=7,
                                             owner="o@example.com")
    assert result.action == "unchanged"
    assert result.target_cohort_id is None
    assert writes(copy) == 0
    assert copy.cohorts == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"app_id": 0}, "app_id must be a positive int"),
        ({"owner": ""}, "owner must not be empty"),
        ({"name": ""}, "name must not be empty"),
        ({"published": "yes"}, "published must be a bool"),
        ({"cohort_id": ""}, "cohort_id must not be empty"),
    ],
)
async def test_bad_input(tmp_path: pathlib.Path, options: dict[str, object],
                         message: str) -> None:
    arguments: dict[str, object] = {"cohort_id": "src", "app_id": 7, "owner": "o@example.com",
                                    **options}
    cohort_id = arguments.pop("cohort_id")
    with FakeAmplitude() as origin, FakeAmplitude() as copy:
        copy.knows_users_of(origin)  # the same people in both projects
        async with client_of(origin) as source, client_of(copy) as target:
            with pytest.raises(amp.InvalidRequestError, match=message):
                await amp.mirror_cohort(source, target, cohort_id, tmp_path,  # type: ignore[arg-type]
                                        **arguments)  # type: ignore[arg-type]
        assert origin.log == []


async def test_command_line_mirror(tmp_path: pathlib.Path) -> None:
    with FakeAmplitude(job_duration=0.0) as origin, FakeAmplitude(
            api_key="target-key", secret_key="target-secret") as copy:
        copy.knows_users_of(origin)  # the same people in both projects
        origin.add_cohort("src", size=30)
        async with origin.serve() as source_url, copy.serve() as target_url:
            env = {**os.environ, "AMPLITUDE_API_KEY": origin.api_key,
                   "AMPLITUDE_SECRET_KEY": origin.secret_key,
                   "AMPLITUDE_TARGET_API_KEY": "target-key",
                   "AMPLITUDE_TARGET_SECRET_KEY": "target-secret",
                   "AMPLITUDE_TARGET_BASE_URL": target_url,
                   "XDG_CACHE_HOME": str(tmp_path / "cache")}
            command = [sys.executable, "-m", "amp_cohorts_async", "mirror", "src",
                       str(tmp_path / "state"), "--app-id", "7", "--owner", "o@example.com",
                       "--base-url", source_url, "--poll-interval", "0.1"]
            result = await anyio.run_process(command, env=env, check=False)
            assert result.returncode == 0, result.stderr
            (target_id,) = copy.cohorts
            assert result.stdout.decode().startswith(f"created: src -> {target_id}: ")
            assert user_ids(copy, target_id) == user_ids(origin, "src")
            again = await anyio.run_process([*command, "--json"], env=env, check=False)
            assert json.loads(again.stdout)["action"] == "unchanged"
            missing = {k: v for k, v in env.items() if k != "AMPLITUDE_TARGET_API_KEY"}
            refused = await anyio.run_process(command, env=missing, check=False)
            assert refused.returncode == 2
            assert b"AMPLITUDE_TARGET_API_KEY" in refused.stderr
