"""Keys, Basic tokens and S3 signatures never reach repr, exception text or log records."""

from __future__ import annotations

import base64
import logging
import pathlib

import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude

API_KEY = "api-key-AAAA1111"
SECRET = "secret-key-BBBB2222"
TOKEN = base64.b64encode(f"{API_KEY}:{SECRET}".encode()).decode()


def _secrets(fake: FakeAmplitude) -> list[str]:
    signatures = [
        e.query for e in fake.log if e.endpoint == "s3"
    ]
    values = [API_KEY, SECRET, TOKEN]
    for query in signatures:
        values.extend(v for k, v in query if k in ("X-Amz-Signature", "X-Amz-Credential"))
    return values


def _reachable(root: object, depth: int = 4) -> list[object]:
    """``root`` and the library objects its attributes lead to (the client's whole inside)."""
    found: list[object] = []
    stack = [(root, 0)]
    while stack:
        obj, level = stack.pop()
        if any(obj is seen for seen in found):
            continue
        found.append(obj)
        if level < depth and type(obj).__module__.startswith("amp_cohorts_async"):
            stack.extend((value, level + 1) for value in getattr(obj, "__dict__", {}).values())
    return found


def test_repr_and_str_hide_credentials() -> None:
    client = amp.CohortsClient(API_KEY, SECRET)
    objects = _reachable(client)
    assert len(objects) > 10  # the walk reached the layers below the client
    for obj in objects:
        for text in (repr(obj), str(obj)):
            assert API_KEY not in text
            assert SECRET not in text
            # The token itself is held as a string by the boundary; no object shows it.
            assert isinstance(obj, str) or TOKEN not in text


async def test_logs_and_errors_over_sockets_hold_no_secret(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # root at DEBUG: httpx's and httpcore's records too
    # httpx's lines of the library's requests only come when asked for, as here.
    caplog.set_level(logging.DEBUG, logger="httpx")
    with FakeAmplitude(api_key=API_KEY, secret_key=SECRET, inline_threshold=100) as fake:
        fake.add_cohort("big", size=500)
        fake.inject("s3", "status", status=403)  # an S3 error message carries the URL
        async with fake.serve() as base_url:
            async with amp.CohortsClient(
                API_KEY, SECRET, base_url=base_url,
                poll=amp.PollPolicy(initial_interval=0.01), retry=amp.RetryPolicy(
                    initial_delay=0.01)
            ) as client:
                await client.download_cohort("big", tmp_path)
            async with amp.CohortsClient(API_KEY, "wrong-secret-CCCC", base_url=base_url) as bad:
                with pytest.raises(amp.AuthenticationError) as caught:
                    await bad.list_cohorts()
        secrets = [*_secrets(fake), "wrong-secret-CCCC"]
    assert len(secrets) > 3, "the download went through S3"
    assert any(r.name.startswith("httpx") for r in caplog.records)
    assert any(r.name.startswith("httpcore") for r in caplog.records)
    text = "\n".join(r.getMessage() for r in caplog.records) + str(caught.value)
    text += repr(caught.value) + str(caught.value.response)
    for secret in secrets:
        assert secret not in text


async def test_transport_error_text_has_no_query(caplog: pytest.LogCaptureFixture) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {request.url}")

    async with amp.CohortsClient(
        API_KEY, SECRET, transport=httpx.MockTransport(refuse),
        retry=amp.RetryPolicy(max_attempts=1),
    ) as client:
        with pytest.raises(amp.TransportError) as caught:
            await client.request_cohort("abc", props=True, prop_keys=["X-Amz-Signature=zzz"])
    assert "zzz" not in str(caught.value)
