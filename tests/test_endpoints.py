"""Every endpoint's wire format, parsing and error mapping, through a respx router."""

from __future__ import annotations

import base64
import json
import pathlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
import respx

import amp_cohorts_async as amp

BASE = "https://amplitude.com"
SEED = json.loads((pathlib.Path(__file__).parent / "data" / "seed_cohorts.json").read_text())
AUTH = "Basic " + base64.b64encode(b"key:secret").decode()
CSV = b'"amplitude_id","user_id"\n"1","a"\n'
NO_RETRY = amp.RetryPolicy(max_attempts=1)


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(base_url=BASE, assert_all_called=False)


@pytest.fixture
async def client(router: respx.Router) -> AsyncIterator[amp.CohortsClient]:
    transport = httpx.MockTransport(router.async_handler)
    async with amp.CohortsClient("key", "secret", transport=transport, retry=NO_RETRY) as c:
        yield c


async def test_list_cohorts_parses_the_seed_sample(
    client: amp.CohortsClient, router: respx.Router
) -> None:
    route = router.get("/api/3/cohorts").respond(200, json=SEED)
    cohorts = await client.list_cohorts()
    request = route.calls.last.request
    assert request.headers["Authorization"] == AUTH
    assert "includeSyncInfo" not in request.url.params
    [cohort] = cohorts
    assert cohort.id == "id_12345"
    assert cohort.app_id == 123456
    assert cohort.name == "Test Cohort 1"
    assert cohort.size == 111
    assert cohort.owners == ["demo@amplitude.com"]
    assert cohort.definition is not None
    assert cohort.definition["version"] == 3
    assert cohort.last_mod == datetime(2023, 3, 21, 22, 21, 34, tzinfo=UTC)
    assert cohort.created_at is not None
    assert cohort.created_at.tzinfo is not None
    assert cohort.metadata is None
    assert cohort.chart_id is None
    assert cohort.popularity is None
    [sync] = cohort.sync_metadata
    assert sync.target == "braze"
    assert sync.frequency == "hourly"
    assert sync.last_successful is not None
    assert sync.last_successful.utcoffset() is not None
    assert sync.last_successful.astimezone(UTC) == datetime(2023, 3, 21, 23, 9, 58, 848454, UTC)
    assert sync.last_failure is None
    assert sync.params == {"user_id": "demo@amplitude.com"}


async def test_list_cohorts_iso_timestamps_unknown_fields_and_nulls(
    client: amp.CohortsClient, router: respx.Router
) -> None:
    cohort = dict(SEED["cohorts"][0])
    cohort.update(
        lastMod="2024-05-01T10:00:00", createdAt="2024-05-01T09:00:00Z",
        lastComputed=1714550400000, brandNewField={"x": 1}, syncMetadata=None, owners=None,
    )
    route = router.get("/api/3/cohorts").respond(200, json={"cohorts": [cohort], "extra": 1})
    [parsed] = await client.list_cohorts(include_sync_info=True)
    assert route.calls.last.request.url.params["includeSyncInfo"] == "true"
    assert parsed.last_mod == datetime(2024, 5, 1, 10, tzinfo=UTC)  # naive ISO is UTC
    assert parsed.created_at == datetime(2024, 5, 1, 9, tzinfo=UTC)
    assert parsed.last_computed == datetime(2024, 5, 1, 8, tzinfo=UTC)  # epoch milliseconds
    assert parsed.sync_metadata == []
    assert parsed.owners is None


async def test_list_cohorts_minimal_cohort(client: amp.CohortsClient, router: respx.Router) -> None:
    router.get("/api/3/cohorts").respond(200, json={"cohorts": [{"id": 42}]})
    [parsed] = await client.list_cohorts()
    assert parsed.id == "42"
    assert parsed.name is None
    assert parsed.sync_metadata == []


async def test_request_cohort_wire(client: amp.CohortsClient, router: respx.Router) -> None:
    route = router.get(path__startswith="/api/5/cohorts/request/").respond(
        202, json={"request_id": "r-1", "cohort_id": "a/b c"}
    )
    request = await client.request_cohort("a/b c", props=True, prop_keys=["city", "plan"])
    sent = route.calls.last.request
    assert sent.url.raw_path == (
        b"/api/5/cohorts/request/a%2Fb%20c?props=1&propKeys=city&propKeys=plan"
    )
    assert sent.headers["Authorization"] == AUTH
    assert request == amp.CohortRequest(request_id="r-1", cohort_id="a/b c")


async def test_request_cohort_without_props(
    client: amp.CohortsClient, router: respx.Router
) -> None:
    route = router.get("/api/5/cohorts/request/abc").respond(202, json={"request_id": "r"})
    request = await client.request_cohort("abc")
    assert route.calls.last.request.url.query == b""
    assert request.cohort_id == "abc"


@pytest.mark.parametrize(
    ("status", "body", "done"),
    [
        (202, {"request_id": "r", "cohort_id": "c", "async_status": "JOB INPROGRESS"}, False),
        (200, {"request_id": "r", "cohort_id": "c", "async_status": "JOB COMPLETED"}, True),
    ],
)
async def test_request_status(
    client: amp.CohortsClient, router: respx.Router, status: int, body: dict[str, str], done: bool
) -> None:
    router.get("/api/5/cohorts/request-status/r").respond(status, json=body)
    result = await client.get_request_status("r")
    assert result.done is done
    assert result.async_status == body["async_status"]
    assert result.request_id == "r"
    assert result.cohort_id == "c"


async def test_usage(client: amp.CohortsClient, router: respx.Router) -> None:
    router.get("/api/3/cohorts/usage").respond(
        200, json={"rest_download": {"limit": 500, "usage": 42, "resets_at": "2026-06-01T00:00:00"}}
    )
    usage = await client.get_usage()
    assert usage == amp.Usage(
        limit=500, usage=42, resets_at=datetime(2026, 6, 1, tzinfo=UTC), remaining=458
    )


async def test_upload_body(client: amp.CohortsClient, router: respx.Router) -> None:
    route = router.post("/api/3/cohorts/upload").respond(200, json={
        "cohortId": "new1", "metadata": {"matched": 2, "totals": 3, "invalid_ids_sample": ["x"]}
    })
    result = await client.upload_cohort(
        name="Cohort Name", app_id=7, id_type="BY_AMP_ID", ids=["1", "2", "x"],
        owner="o@example.com", published=True, cg="org", existing_cohort_id="old1",
    )
    body = json.loads(route.calls.last.request.content)
    assert route.calls.last.request.headers["Content-Type"] == "application/json"
    assert body == {
        "name": "Cohort Name", "app_id": 7, "id_type": "BY_AMP_ID", "ids": ["1", "2", "x"],
        "owner": "o@example.com", "published": True, "skip_save": False,
        "skip_invalid_ids": True, "cg": "org", "existing_cohort_id": "old1",
    }
    assert result.cohort_id == "new1"
    assert (result.matched, result.totals, result.invalid_ids_sample) == (2, 3, ["x"])


async def test_membership_body(client: amp.CohortsClient, router: respx.Router) -> None:
    route = router.post("/api/3/cohorts/membership").respond(200, json={
        "cohort_id": "c1",
        "memberships_result": [
            {"skipped_ids": [], "id_type": "BY_ID", "operation": "ADD"},
            {"skipped_ids": ["n2"], "id_type": "BY_NAME", "operation": "REMOVE"},
        ],
    })
    result = await client.update_membership(
        "c1",
        [amp.MembershipChange(ids=["1", "2"], id_type="BY_ID", operation=amp.Operation.ADD),
         amp.MembershipChange(ids=["n1", "n2"], id_type=amp.MembershipIdType.BY_NAME,
                              operation="REMOVE")],
        count_group="User", skip_invalid_ids=False,
    )
    body = json.loads(route.calls.last.request.content)
    assert body == {
        "cohort_id": "c1",
        "memberships": [
            {"ids": ["1", "2"], "id_type": "BY_ID", "operation": "ADD"},
            {"ids": ["n1", "n2"], "id_type": "BY_NAME", "operation": "REMOVE"},
        ],
        "skip_invalid_ids": False,
        "count_group": "User",
    }
    assert [o.skipped_ids for o in result.memberships_result] == [[], ["n2"]]
    assert result.memberships_result[1].operation is amp.Operation.REMOVE


async def test_download_file_inline(
    client: amp.CohortsClient, router: respx.Router, tmp_path: pathlib.Path
) -> None:
    payload = b'"amplitude_id","user_id"\n"1","a"\n'
    route = router.get("/api/5/cohorts/request/r9/file").respond(200, content=payload)
    result = await client.download_file("r9", tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_bytes() == payload
    assert result.size_bytes == len(payload)
    assert result.cohort_id is None
    assert route.calls.last.request.headers["Authorization"] == AUTH


async def test_download_file_follows_redirect_without_credentials(
    client: amp.CohortsClient, router: respx.Router, tmp_path: pathlib.Path
) -> None:
    s3 = "https://bucket.s3.amazonaws.com/x.csv?X-Amz-Signature=abc123"
    router.get("/api/5/cohorts/request/r9/file").respond(302, headers={"Location": s3})
    s3_route = router.get(s3).respond(200, content=CSV)
    await client.download_file("r9", tmp_path / "out.csv")
    assert "Authorization" not in s3_route.calls.last.request.headers
    assert (tmp_path / "out.csv").read_bytes() == CSV


ERROR_CASES = [
    (400, amp.APIStatusError),
    (401, amp.AuthenticationError),
    (403, amp.AuthenticationError),
    (404, amp.NotFoundError),
    (409, amp.APIStatusError),
    (429, amp.RateLimitError),
    (500, amp.ServerError),
    (502, amp.ServerError),
    (503, amp.ServerError),
    (504, amp.ServerError),
]


@pytest.mark.parametrize(("status", "cls"), ERROR_CASES)
async def test_error_mapping(
    client: amp.CohortsClient, router: respx.Router, status: int, cls: type[Exception]
) -> None:
    router.get("/api/3/cohorts").respond(status, json={"error": {
        "http_code": status, "type": "some_type", "message": "the server's words",
        "metadata": {"invalid": ["x"]}}}, headers={"Retry-After": "7"})
    with pytest.raises(cls) as caught:
        await client.list_cohorts()
    error = caught.value
    assert type(error) is cls
    assert isinstance(error, amp.APIStatusError)
    assert error.status_code == status
    assert error.type == "some_type"
    assert error.metadata == {"invalid": ["x"]}
    assert "the server's words" in str(error)
    assert error.response is not None
    if isinstance(error, amp.RateLimitError):
        assert error.retry_after == 7.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [(b"", "Bad Gateway"), (b"<html>upstream down</html>", "upstream down"),
     (b'{"error": "plain message"}', "plain message")],
)
async def test_error_without_json_shape(
    client: amp.CohortsClient, router: respx.Router, body: bytes, expected: str
) -> None:
    router.get("/api/3/cohorts").respond(502, content=body)
    with pytest.raises(amp.ServerError, match=expected):
        await client.list_cohorts()


@pytest.mark.parametrize(
    ("path", "call", "body", "where"),
    [
        ("/api/3/cohorts", "list", {"cohorts": [{"id": "a", "size": "many"}]}, "cohorts[0].size"),
        ("/api/3/cohorts", "list", {"nothing": []}, "cohorts"),
        ("/api/3/cohorts/usage", "usage", {"rest_download": {"limit": 1}}, "usage"),
        ("/api/5/cohorts/request-status/r", "status", {"async_status": "x"}, "request_id"),
    ],
)
async def test_malformed_success_bodies(
    client: amp.CohortsClient, router: respx.Router, path: str, call: str, body: object,
    where: str,
) -> None:
    router.get(path).respond(200, json=body)
    calls = {"list": client.list_cohorts, "usage": client.get_usage,
             "status": lambda: client.get_request_status("r")}
    with pytest.raises(amp.ResponseValidationError, match=where.replace("[", r"\[")):
        await calls[call]()


async def test_non_json_success_body(client: amp.CohortsClient, router: respx.Router) -> None:
    router.get("/api/3/cohorts").respond(200, content=b"<html>")
    with pytest.raises(amp.ResponseValidationError, match="not JSON"):
        await client.list_cohorts()


async def test_transport_error_is_wrapped(client: amp.CohortsClient, router: respx.Router) -> None:
    router.get("/api/3/cohorts").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(amp.TransportError, match="ConnectError"):
        await client.list_cohorts()


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.request_cohort(""),
        lambda c: c.request_cohort(".."),
        lambda c: c.request_cohort(5),
        lambda c: c.request_cohort("a", prop_keys=["x"]),
        lambda c: c.request_cohort("a", props=True, prop_keys="city"),
        lambda c: c.request_cohort("a", props="yes"),
        lambda c: c.get_request_status(""),
        lambda c: c.download_file("", "x.csv"),
        lambda c: c.download_file("r", "/no/such/dir/x.csv"),
        lambda c: c.list_cohorts(include_sync_info="true"),
    ],
)
async def test_invalid_arguments_send_nothing(
    client: amp.CohortsClient, router: respx.Router, call: object
) -> None:
    with pytest.raises(amp.InvalidRequestError):
        await call(client)  # type: ignore[operator]
    assert not router.calls


async def test_lifecycle() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"cohorts": []}))
    client = amp.CohortsClient("key", "secret", transport=transport)
    async with client:
        assert await client.list_cohorts() == []
        with pytest.raises(RuntimeError, match="already open"):
            await client.__aenter__()
    with pytest.raises(RuntimeError, match="closed"):
        await client.list_cohorts()
    with pytest.raises(RuntimeError, match="closed"):
        async with client:
            pass
    await client.aclose()  # closing twice is harmless


async def test_borrowed_client_is_not_closed() -> None:
    borrowed = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"cohorts": []}))
    )
    async with amp.CohortsClient("key", "secret", http_client=borrowed) as client:
        await client.list_cohorts()
    assert not borrowed.is_closed
    await borrowed.aclose()


async def test_owned_client_is_closed() -> None:
    client = amp.CohortsClient("key", "secret")
    async with client:
        pass
    assert client._http.is_closed
