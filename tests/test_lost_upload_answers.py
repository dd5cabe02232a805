"""An upload that creates a cohort, whose answer is lost, never makes a second cohort.

Amplitude has no idempotency key for /upload. After a failure that may come after it acted
(a 5xx, a cut answer, a read timeout, an unreadable 2xx), the client looks in the cohort list
for what it may have made and adopts it; it sends again only when there is none, and says
plainly when it cannot tell.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude

BASE = {"name": "Churn risk", "app_id": 123, "owner": "data@example.com", "published": True,
        "id_type": "BY_USER_ID"}
IDS = [f"user-{i}" for i in range(7)]
FAST = amp.RetryPolicy(initial_delay=0.01, max_delay=0.02)


@pytest.fixture
def fake() -> Iterator[FakeAmplitude]:
    with FakeAmplitude() as fake:
        fake.add_users(IDS)  # users the project knows: the emulator matches only those
        yield fake


def client_for(fake: FakeAmplitude, **kwargs: object) -> amp.CohortsClient:
    kwargs.setdefault("retry", FAST)
    return amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                             **kwargs)  # type: ignore[arg-type]


def named(fake: FakeAmplitude, name: str = "Churn risk") -> list[str]:
    return [c.id for c in fake.cohorts.values() if c.name == name]


@pytest.mark.parametrize("loss", ["502 after acting", "cut answer"])
async def test_a_lost_answer_is_adopted_not_sent_again(fake: FakeAmplitude, loss: str) -> None:
    if loss == "cut answer":
        fake.inject("upload", "cut")
    else:
        fake.inject("upload", "status", status=502, after_acting=True)
    async with client_for(fake) as client:
        result = await client.upload_cohort(**BASE, ids=IDS)
    assert named(fake) == [result.cohort_id]  # one cohort at the emulator, and it is ours
    assert fake.member_ids(result.cohort_id) == set(IDS)
    assert (result.matched, result.totals) == (7, 7)
    # The lost upload, the list that found its cohort, the idempotent ADD that counted its ids.
    assert [e.endpoint for e in fake.log] == ["upload", "list", "membership"]
    assert result.requests_sent == len(fake.log)


async def test_a_failure_before_acting_is_sent_again_after_a_look(fake: FakeAmplitude) -> None:
    fake.inject("upload", "status", status=503)  # refused before acting: nothing was made
    async with client_for(fake) as client:
        result = await client.upload_cohort(**BASE, ids=IDS)
    assert named(fake) == [result.cohort_id]
    assert [e.endpoint for e in fake.log] == ["upload", "list", "upload"]
    assert result.requests_sent == 3


async def test_chunks_after_the_first_are_membership_adds_retried_as_usual(
    fake: FakeAmplitude,
) -> None:
    fake.inject("upload", "status", status=502, after_acting=True)
    fake.inject("membership", "cut")  # an ADD whose answer is lost: sent again, no harm
    async with client_for(fake, limits=amp.Limits(max_ids_per_request=3)) as client:
        result = await client.upload_cohort(**BASE, ids=IDS)
    assert named(fake) == [result.cohort_id]
    assert fake.member_ids(result.cohort_id) == set(IDS)
    assert result.requests_sent == len(fake.log)


async def test_retries_spent_without_a_cohort_raise_the_failure(fake: FakeAmplitude) -> None:
    fake.inject("upload", "status", status=500, times=3)
    async with client_for(fake, retry=amp.RetryPolicy(max_attempts=3, initial_delay=0.01)
                          ) as client:
        with pytest.raises(amp.ServerError):
            await client.upload_cohort(**BASE, ids=IDS)
    assert named(fake) == []
    assert [e.endpoint for e in fake.log] == ["upload", "list", "upload", "list", "upload",
                                              "list"]


async def test_a_refusal_is_not_looked_up(fake: FakeAmplitude) -> None:
    fake.inject("upload", "status", status=400)
    async with client_for(fake) as client:
        with pytest.raises(amp.APIStatusError):
            await client.upload_cohort(**BASE, ids=IDS)
    assert [e.endpoint for e in fake.log] == ["upload"]


async def test_an_unreadable_list_names_the_cohort_that_may_exist(fake: FakeAmplitude) -> None:
    fake.inject("upload", "status", status=502, after_acting=True)
    fake.inject("list", "status", status=500, times=10)
    async with client_for(fake) as client:
        with pytest.raises(amp.UncertainUploadError) as caught:
            await client.upload_cohort(**BASE, ids=IDS)
    error = caught.value
    assert (error.name, error.owner, error.app_id) == ("Churn risk", "data@example.com", 123)
    assert "'Churn risk'" in str(error)
    assert "data@example.com" in str(error)
    assert isinstance(error.__cause__, amp.ServerError)
    assert len(named(fake)) == 1  # made once, never twice
    assert [e.endpoint for e in fake.log].count("upload") == 1


async def test_two_candidates_are_not_guessed_between(fake: FakeAmplitude) -> None:
    async with client_for(fake) as client:
        first = await client.upload_cohort(**BASE, ids=IDS[:2])  # a moment ago, same name
        fake.inject("upload", "status", status=502, after_acting=True)
        with pytest.raises(amp.UncertainUploadError) as caught:
            await client.upload_cohort(**BASE, ids=IDS)
    assert first.cohort_id in caught.value.candidates
    assert sorted(caught.value.candidates) == sorted(named(fake))
    assert len(named(fake)) == 2


async def test_an_older_cohort_of_the_same_name_is_not_adopted(fake: FakeAmplitude) -> None:
    old = fake.add_cohort("old-one", size=3, name="Churn risk")
    old.owners = ["data@example.com"]
    old.app_id = 123  # created_at: a day of 2023
    fake.inject("upload", "status", status=503)
    async with client_for(fake) as client:
        result = await client.upload_cohort(**BASE, ids=IDS)
    assert result.cohort_id != "old-one"
    assert fake.member_ids(result.cohort_id) == set(IDS)


async def test_a_read_timeout_after_acting_over_real_sockets(fake: FakeAmplitude) -> None:
    fake.inject("upload", "slow", delay=5.0)  # acts, then the answer crawls
    async with fake.serve() as base_url, httpx.AsyncClient(timeout=0.3) as http:
        async with amp.CohortsClient(fake.api_key, fake.secret_key, base_url=base_url,
                                     http_client=http, retry=FAST) as client:
            result = await client.upload_cohort(**BASE, ids=IDS)
    assert named(fake) == [result.cohort_id]
    assert fake.member_ids(result.cohort_id) == set(IDS)


async def test_membership_requests_sent_counts_the_retries(fake: FakeAmplitude) -> None:
    fake.add_cohort("target", size=0, members=[])
    fake.inject("membership", "status", status=503)
    async with client_for(fake) as client:
        result = await client.update_membership("target", [amp.MembershipChange(
            ids=IDS, id_type="BY_NAME", operation="ADD")])
    assert result.requests_sent == 2 == len(fake.log)
    assert fake.member_ids("target") == set(IDS)


async def test_apply_diff_requests_sent_counts_the_retries(
    fake: FakeAmplitude, tmp_path: pathlib.Path
) -> None:
    fake.add_cohort("target", size=0, members=[])
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_text('"amplitude_id","user_id"\n"1","gone"\n')
    new.write_text('"amplitude_id","user_id"\n"2","came"\n')
    diff = await amp.diff_members(old, new, tmp_path / "diff", key="user_id")
    fake.inject("membership", "status", status=503)
    async with client_for(fake) as client:
        result = await client.apply_diff("target", diff)
    assert result.requests_sent == 3 == len(fake.log)  # REMOVE (sent twice), ADD


@pytest.mark.looptime
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_under_random_faults_no_upload_makes_two_cohorts(seed: int) -> None:
    """Every endpoint faulted at random (5xx, 429, answers cut after acting): each upload
    call ends with its one cohort, or an error; never two cohorts of one call's name."""
    with FakeAmplitude(seed=seed) as fake:
        fake.add_users(IDS)  # users the project knows: the emulator matches only those
        fake.random_faults(0.4, seed=seed)
        outcomes: dict[str, str | None] = {}
        async with client_for(fake, retry=amp.RetryPolicy(max_attempts=4)) as client:
            for number in range(40):
                name = f"upload {number}"
                try:
                    result = await client.upload_cohort(**{**BASE, "name": name}, ids=IDS)
                except (amp.UncertainUploadError, amp.APIStatusError, amp.TransportError,
                        amp.ResponseValidationError, amp.PartialWriteError):
                    outcomes[name] = None
                    continue
                outcomes[name] = result.cohort_id
                assert fake.member_ids(result.cohort_id) == set(IDS)
        for name, cohort_id in outcomes.items():
            made = named(fake, name)
            assert len(made) <= 1, (name, made)
            if cohort_id is not None:
                assert made == [cohort_id]
        assert fake.random_faults_injected["upload"] > 10
        assert sum(c is not None for c in outcomes.values()) > 20
