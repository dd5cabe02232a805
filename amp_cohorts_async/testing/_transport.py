"""The fake served in-process: an httpx transport, streaming bodies without sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from ._fake import FakeAmplitude, FakeRequest, FakeResponse

__all__ = ("FakeTransport", "body_chunks", "to_fake_request")


async def body_chunks(response: FakeResponse) -> AsyncIterator[bytes]:
    """The response body as chunks, cut or truncated as a fault asks."""
    limit = response.cut_after if response.cut_after is not None else response.truncate_to
    sent = 0
    if isinstance(response.body, bytes):
        source: AsyncIterator[bytes] = _once(response.body)
    else:
        source = response.body
    async for chunk in source:
        if limit is not None and sent + len(chunk) > limit:
            chunk = chunk[: limit - sent]
            if chunk:
                yield chunk
            return
        sent += len(chunk)
        yield chunk


async def _once(body: bytes) -> AsyncIterator[bytes]:
    step = 256 * 1024
    for start in range(0, len(body), step):
        yield body[start : start + step]


def to_fake_request(
    method: str, raw_path: str, headers: dict[str, str], body: bytes, *, to_s3: bool
) -> FakeRequest:
    url = httpx.URL(raw_path)
    return FakeRequest(
        method=method.upper(),
        path=url.raw_path.decode("ascii").split("?", 1)[0],
        query=list(url.params.multi_items()),
        headers={k.lower(): v for k, v in headers.items()},
        body=body,
        to_s3=to_s3,
    )


class _Stream(httpx.AsyncByteStream):
    def __init__(self, response: FakeResponse) -> None:
        self.response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in body_chunks(self.response):
            yield chunk
        if self.response.cut_after is not None:
            raise httpx.ReadError("connection reset by peer (injected)")

    async def aclose(self) -> None:
        if self.response.on_close is not None:
            self.response.on_close()


class FakeTransport(httpx.AsyncBaseTransport):
    def __init__(self, fake: FakeAmplitude) -> None:
        self.fake = fake
        self.s3_host = httpx.URL(fake.s3_origin).host

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        raw_target = request.url.raw_path.decode("ascii")
        fake_request = to_fake_request(
            request.method, raw_target, dict(request.headers), body,
            to_s3=request.url.host == self.s3_host,
        )
        response = await self.fake.handle(fake_request)
        headers = list(response.headers)
        if isinstance(response.body, bytes) and not any(
            k.lower() == "content-length" for k, _ in headers
        ):
            headers.append(("Content-Length", str(len(response.body))))
        return httpx.Response(
            response.status, headers=headers, stream=_Stream(response), request=request
        )
