import base64
import math

import httpx
import pytest

import amp_cohorts_async as amp


def make(**kwargs: object) -> amp.CohortsClient:
    return amp.CohortsClient("key", "secret", **kwargs)  # type: ignore[arg-type]


async def first_request(*args: object, **kwargs: object) -> httpx.Request:
    """The request a client built with these arguments sends for list_cohorts()."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"cohorts": []})

    client = amp.CohortsClient(*args, transport=httpx.MockTransport(answer),  # type: ignore[arg-type]
                               **kwargs)
    async with client:
        await client.list_cohorts()
    return seen[0]


@pytest.mark.parametrize(
    ("region", "expected"),
    [("us", "https://amplitude.com"), ("eu", "https://analytics.eu.amplitude.com")],
)
async def test_regions(region: str, expected: str) -> None:
    request = await first_request("key", "secret", region=region)
    assert str(request.url) == expected + "/api/3/cohorts"


def test_unknown_region() -> None:
    with pytest.raises(amp.InvalidRequestError, match="unknown region 'asia'"):
        make(region="asia")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9", "https://proxy.corp"]
)
async def test_base_url_accepted(url: str) -> None:
    request = await first_request("key", "secret", base_url=url)
    assert str(request.url) == url + "/api/3/cohorts"


async def test_a_path_in_base_url_is_a_prefix() -> None:
    request = await first_request("key", "secret", base_url="https://proxy.corp/amplitude")
    assert str(request.url) == "https://proxy.corp/amplitude/api/3/cohorts"


@pytest.mark.parametrize("url", [
    "http://proxy.corp", "http://10.0.0.1", "ftp://x", "nope", "https://h:99999",
    "https://h:0", "https://h:port", "https://user:pw@h", "https://h /x", "https://h\n",
    "", 42,
])
def test_base_url_refused(url: str) -> None:
    with pytest.raises(amp.InvalidRequestError):
        make(base_url=url)


async def test_base_url_overrides_region() -> None:
    request = await first_request("key", "secret", region="eu", base_url="https://proxy.example")
    assert request.url.host == "proxy.example"


async def test_credentials_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMPLITUDE_API_KEY", "env-key")
    monkeypatch.setenv("AMPLITUDE_SECRET_KEY", "env-secret")
    request = await first_request()
    token = base64.b64encode(b"env-key:env-secret").decode()
    assert request.headers["Authorization"] == f"Basic {token}"


@pytest.mark.parametrize(("api_key", "secret"), [(None, "s"), ("k", None), ("", "s"), ("k", " ")])
def test_missing_credentials(
    monkeypatch: pytest.MonkeyPatch, api_key: str | None, secret: str | None
) -> None:
    monkeypatch.delenv("AMPLITUDE_API_KEY", raising=False)
    monkeypatch.delenv("AMPLITUDE_SECRET_KEY", raising=False)
    with pytest.raises(amp.InvalidRequestError):
        amp.CohortsClient(api_key, secret)


def test_http_client_and_transport_are_exclusive() -> None:
    with pytest.raises(amp.InvalidRequestError):
        make(http_client=httpx.AsyncClient(), transport=httpx.MockTransport(lambda r: None))


@pytest.mark.parametrize(
    "build",
    [
        lambda: amp.Limits(max_concurrent_requests=0),
        lambda: amp.Limits(cohort_requests=(amp.RateWindow(0, 60),)),
        lambda: amp.RateWindow(4, -1),
        lambda: amp.RetryPolicy(max_attempts=0),
        lambda: amp.PollPolicy(initial_interval=0),
        lambda: amp.PollPolicy(jitter=1.5),
        lambda: amp.Limits(monthly_quota=-1),
        lambda: amp.Limits(max_jobs_in_flight=True),
        lambda: amp.RateWindow(1, math.inf),
        lambda: amp.RateWindow(1, math.nan),
        lambda: amp.RetryPolicy(max_retry_after="5"),
        lambda: amp.RetryPolicy(initial_delay=math.nan),
        lambda: amp.PollPolicy(deadline=math.inf),
        lambda: amp.PollPolicy(multiplier="2"),
        lambda: amp.Limits(cohort_requests=5),
    ],
)
def test_config_validation(build: object) -> None:
    with pytest.raises(amp.InvalidRequestError):
        build()  # type: ignore[operator]


def test_config_defaults_match_amplitude() -> None:
    limits = amp.Limits()
    assert limits.max_concurrent_requests == 5
    assert limits.cohort_requests == (amp.RateWindow(60, 600.0), amp.RateWindow(4, 60.0))
    assert limits.monthly_quota == 500
    assert limits.max_ids_per_request == 100_000
    assert limits.max_cohort_size == 2_000_000
