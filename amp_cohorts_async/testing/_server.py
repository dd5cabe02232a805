"""The fake served over real loopback sockets: a small HTTP/1.1 server on asyncio streams.

No server dependency: the standard library's asyncio streams are enough for keep-alive,
Content-Length and chunked bodies, dropped connections and Range, which is all a cohort
client (or curl) needs. Two listeners: the Amplitude API and the S3 stand-in.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus

from . import _control as control
from ._fake import FakeAmplitude
from ._transport import body_chunks, to_fake_request

__all__ = ("serve",)

logger = logging.getLogger("amp_cohorts_async.testing")

_MAX_HEAD = 64 * 1024


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    body = await reader.readexactly(length) if length else b""
    return method, target, headers, body


async def _handle_connection(
    fake: FakeAmplitude, to_s3: bool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            parsed = await _read_request(reader)
            if parsed is None:
                return
            method, target, headers, body = parsed
            request = to_fake_request(method, target, headers, body, to_s3=to_s3)
            if not to_s3 and request.path.startswith(control.PREFIX):
                response = await control.answer(fake, request)
            else:
                response = await fake.handle(request)
            try:
                keep_alive = headers.get("connection", "").lower() != "close"
                out_headers = list(response.headers)
                names = {k.lower() for k, _ in out_headers}
                if isinstance(response.body, bytes) and "content-length" not in names:
                    out_headers.append(("Content-Length", str(len(response.body))))
                    names.add("content-length")
                chunked = "content-length" not in names
                if chunked:
                    out_headers.append(("Transfer-Encoding", "chunked"))
                if not keep_alive:
                    out_headers.append(("Connection", "close"))
                reason = HTTPStatus(response.status).phrase
                head = f"HTTP/1.1 {response.status} {reason}\r\n" + "".join(
                    f"{k}: {v}\r\n" for k, v in out_headers
                )
                writer.write(head.encode("latin-1") + b"\r\n")
                if method != "HEAD":
                    async for chunk in body_chunks(response):
                        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                        await writer.drain()
                    if response.cut_after is not None or response.truncate_to is not None:
                        # A dropped connection: the client sees fewer bytes than promised.
                        writer.transport.abort()
                        return
                    if chunked:
                        writer.write(b"0\r\n\r\n")
            finally:
                if response.on_close is not None:
                    response.on_close()
            await writer.drain()
            if not keep_alive:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    except asyncio.CancelledError:
        return  # the server is shutting down; this task is ours to end quietly
    except Exception:
        logger.exception("fake server failed on a request")
    finally:
        writer.close()


@asynccontextmanager
async def serve(
    fake: FakeAmplitude, host: str, port: int, s3_port: int,
    s3_tls: ssl.SSLContext | None = None,
) -> AsyncIterator[str]:
    """Serve ``fake`` on loopback; yields the Amplitude base URL.

    ``s3_tls``: serve the S3 stand-in over https with this server context (for tests of the
    client's certificate verification).
    """
    connections: set[asyncio.Task[None]] = set()

    def handler(to_s3: bool) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                         Awaitable[None]]:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                await _handle_connection(fake, to_s3, reader, writer)
            finally:
                connections.discard(task)

        return run

    api = await asyncio.start_server(handler(False), host, port, limit=_MAX_HEAD)
    s3 = await asyncio.start_server(handler(True), host, s3_port, limit=_MAX_HEAD, ssl=s3_tls)
    api_port = api.sockets[0].getsockname()[1]
    s3_bound = s3.sockets[0].getsockname()[1]
    previous_origin = fake.s3_origin
    fake.s3_origin = f"{'https' if s3_tls else 'http'}://{host}:{s3_bound}"
    try:
        yield f"http://{host}:{api_port}"
    finally:
        fake.s3_origin = previous_origin
        for server in (api, s3):
            server.close()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        for server in (api, s3):
            await server.wait_closed()
