"""What a new user reaches for first: one cohort by id, a refused key that says why, a DNS
failure said at once, the version."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude


async def test_get_cohort_reads_the_list_and_spends_no_quota(
    fake: FakeAmplitude, client: amp.CohortsClient
) -> None:
    cohort = await client.get_cohort("large")
    assert cohort.id == "large"
    assert cohort.size == 20_000
    with pytest.raises(amp.NotFoundError, match="'gone' is not among the project's cohorts"):
        await client.get_cohort("gone")
    assert [entry.endpoint for entry in fake.log] == ["list", "list"]
    assert client.scheduler.cohort_requests_spent == 0
    with pytest.raises(amp.InvalidRequestError):
        await client.get_cohort("")
    assert len(fake.log) == 2  # bad input: nothing sent


def refusing_transport(seen: list[str]) -> httpx.MockTransport:
    def refuse(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(401, json={"error": {"http_code": 401, "type": "unauthorized",
                                                   "message": "Invalid API key"}})

    return httpx.MockTransport(refuse)


@pytest.mark.parametrize(("region", "host", "other"), [
    ("us", "amplitude.com", "eu"),
    ("eu", "analytics.eu.amplitude.com", "us"),
])
async def test_a_refused_key_names_the_host_and_the_other_region(
    region: str, host: str, other: str
) -> None:
    seen: list[str] = []
    async with amp.CohortsClient("key", "secret", region=region,
                                 transport=refusing_transport(seen)) as client:
        with pytest.raises(amp.AuthenticationError) as caught:
            await client.get_usage()
    assert seen == [host]
    assert caught.value.message == "Invalid API key"  # the server's words, untouched
    text = str(caught.value)
    assert f"{host} (region {region!r}) refused these keys" in text
    assert f"pass region={other!r} (--region {other})" in text
    assert "secret" not in text


async def test_another_host_refusing_the_keys_is_named(fake: FakeAmplitude) -> None:
    async with fake.serve() as base_url, amp.CohortsClient(
        fake.api_key, "wrong-secret", base_url=base_url
    ) as client:
        with pytest.raises(amp.AuthenticationError, match=r"127\.0\.0\.1 refused these keys$"):
            await client.list_cohorts()


async def test_a_host_that_does_not_resolve_is_said_at_once() -> None:
    async with amp.CohortsClient("key", "secret",
                                 base_url="https://no-such-host.invalid") as client:
        with pytest.raises(amp.TransportError) as caught:
            await client.list_cohorts()
    error = caught.value
    assert error.unresolved
    assert error.attempts in (None, 1)  # not six silent retries
    assert "cannot resolve the host name 'no-such-host.invalid'" in str(error)


def test_version() -> None:
    result = subprocess.run([sys.executable, "-m", "amp_cohorts_async", "--version"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert result.stdout == f"amp-cohorts {amp.__version__}\n"
    assert amp.__version__ != "0+unknown"
