"""The HTTP boundary: the only module that touches httpx.

It builds requests with credentials, sends them, and translates every httpx error and every
error status into the library's own exceptions. Nothing above it sees an httpx exception.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import anyio
import attrs
import httpcore
import httpx

from ._background import single_error
from ._body import Body, Sink
from ._config import DownloadPolicy, is_loopback
from ._exceptions import (
    APIStatusError,
    DownloadError,
    InvalidRequestError,
    ResponseValidationError,
    TransportError,
)
from ._logs import install_httpx_quieting, library_request
from ._redact import install_log_redaction, redact, redact_url
from ._redirects import check_download_url, resolve_download_host
from ._s3_leg import BlockingGetter
from ._status import parse_retry_after, status_error_from

__all__ = (
    "ROUTE",
    "Credentials",
    "HttpBoundary",
    "Request",
    "Response",
    "StreamedBody",
    "default_http_client",
    "http_client_for",
    "parse_json",
    "parse_retry_after",
    "status_error_from",
)

logger = logging.getLogger("amp_cohorts_async")

QueryParams = Sequence[tuple[str, str]]
# The request extension that names the request's route template (httpcore ignores it).
ROUTE = "amp_cohorts_route"
# The request and response types the layers above handle without importing httpx.
Request = httpx.Request
Response = httpx.Response


@attrs.frozen(repr=False)
class Credentials:
    """API key and secret; never shown by repr or str."""

    api_key: str
    secret_key: str

    def authorization(self) -> str:
        token = base64.b64encode(f"{self.api_key}:{self.secret_key}".encode()).decode("ascii")
        return f"Basic {token}"

    def __repr__(self) -> str:
        return "Credentials(api_key='***', secret_key='***')"

    __str__ = __repr__


def http_client_for(
    http_client: Any, transport: Any, max_connections: int
) -> tuple[httpx.AsyncClient, bool, BlockingGetter | None]:
    """The httpx client to use, whether we own it, and the threaded S3 leg's opener.

    Only a client we build ourselves, on a real network transport, gets the threaded S3 leg,
    sharing that client's TLS context; a borrowed client or an injected transport keeps every
    transfer on itself, so whatever it was configured with (verify, proxies, mocks) holds.
    """
    if http_client is not None and transport is not None:
        raise InvalidRequestError("pass either http_client or transport, not both")
    if http_client is not None:
        if not isinstance(http_client, httpx.AsyncClient):
            raise InvalidRequestError(
                f"http_client must be an httpx.AsyncClient, got {type(http_client).__name__}"
            )
        return http_client, False, None
    if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
        raise InvalidRequestError(
            f"transport must be an httpx.AsyncBaseTransport, got {type(transport).__name__}"
        )
    if transport is not None:
        return default_http_client(max_connections, transport), True, None
    # One TLS context for both legs: verification as httpx does it (certifi, or SSL_CERT_FILE
    # / SSL_CERT_DIR from the environment).
    context = httpx.create_ssl_context(verify=True, trust_env=True)
    client = default_http_client(max_connections, None, verify=context)
    return client, True, BlockingGetter(context, timeout=60.0, trust_env=True)


def default_http_client(
    max_connections: int,
    transport: httpx.AsyncBaseTransport | None,
    verify: ssl.SSLContext | bool = True,
) -> httpx.AsyncClient:
    """The client a CohortsClient owns when none is borrowed.

    The pool is sized to the concurrency limit (plus room for S3 transfers, which hold no
    Amplitude permit); keep-alive outlives the longest poll interval so polls reuse connections.
    """
    return httpx.AsyncClient(
        transport=transport,
        verify=verify,
        timeout=httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=None),
        limits=httpx.Limits(
            max_connections=max_connections * 2 + 8,
            max_keepalive_connections=max_connections * 2,
            keepalive_expiry=60.0,
        ),
        follow_redirects=False,
        trust_env=True,
    )


# Errors raised before a byte of the request left: the server cannot have seen it.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


def _request_line(request: httpx.Request) -> str:
    return f"{request.method} {redact_url(request.url)}"


def translate_transport_error(exc: httpx.HTTPError, request: httpx.Request) -> TransportError:
    """The library's TransportError for an httpx failure; the only place that maps them."""
    kind = type(exc).__name__
    detail = redact(str(exc)) or kind
    refused = isinstance(exc, httpx.ConnectError) and _caused_by(exc, ConnectionRefusedError)
    if refused:
        where = f"{request.url.host}:{request.url.port or request.url.scheme}"
        return TransportError(f"connection refused by {where} ({_request_line(request)}); is "
                              f"the server running and the URL right?", refused=True)
    if isinstance(exc, httpx.ConnectError) and _caused_by(exc, socket.gaierror):
        return TransportError(f"cannot resolve the host name {request.url.host!r} "
                              f"({_request_line(request)}); is the URL right, and is there a "
                              "network?", unresolved=True)
    return TransportError(
        f"{kind} on {_request_line(request)}: {detail}", never_sent=isinstance(exc, _NOT_SENT)
    )


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # a short chain: httpx -> httpcore -> OSError
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def status_error(response: httpx.Response, body: bytes) -> APIStatusError:
    """The exception for an error response whose body has been read."""
    return status_error_from(response.status_code, response.headers, body,
                             _request_line(response.request), response=response)


def parse_json(response: httpx.Response, body: bytes, *, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        snippet = body[:80].decode("utf-8", "replace")
        raise ResponseValidationError(
            f"unexpected {what} response body: $: not JSON (HTTP {response.status_code}, "
            f"starts {snippet!r})"
        ) from None


class HttpBoundary:
    """One httpx exchange at a time, with the library's errors; the only user of httpx.

    Requests to the Amplitude origin carry our Basic credentials and nothing of a borrowed
    client's own ``auth``; requests to a presigned URL carry no credentials, no default
    headers and no cookies of the client at all.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        credentials: Credentials,
        download_policy: DownloadPolicy,
        blocking: BlockingGetter | None = None,
    ) -> None:
        install_log_redaction()
        install_httpx_quieting()
        self.http = http
        #: Opens presigned URLs from a worker thread (the fast S3 leg), or None: async only.
        self.blocking = blocking
        self.base_url = httpx.URL(base_url)
        self.download_policy = download_policy
        self._loopback_origin = is_loopback(self.base_url.host)
        self._authorization = credentials.authorization()

    def __repr__(self) -> str:
        return f"HttpBoundary(base_url={str(self.base_url)!r})"

    def build(
        self,
        method: str,
        path: str,
        *,
        params: QueryParams = (),
        json_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        route: str | None = None,
    ) -> httpx.Request:
        """A request to ``path`` under the base URL (whose own path, if any, is a prefix).

        ``route`` is the path's template (``/api/5/cohorts/request/{id}``) when it holds an id,
        kept with the request for its telemetry span, whose name may carry no id.
        """
        url = self.base_url.join(path.lstrip("/"))
        if params:
            url = url.copy_with(params=httpx.QueryParams(list(params)))
        merged = {"Accept": "application/json", **(headers or {})}
        merged["Authorization"] = self._authorization
        content = None
        if json_body is not None:
            content = json.dumps(json_body, separators=(",", ":")).encode()
            merged["Content-Type"] = "application/json"
        try:
            return self.http.build_request(method, url, headers=merged, content=content,
                                           extensions={ROUTE: route or path})
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise InvalidRequestError(f"cannot build the request: {redact(str(exc))}") from None

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send to the Amplitude origin; the response body is left unread (caller closes it)."""
        started = anyio.current_time()
        try:
            with library_request():
                # auth=None: our Authorization header stands, whatever auth a borrowed
                # client has.
                response = await self.http.send(request, stream=True, follow_redirects=False,
                                                auth=None)
        except httpx.HTTPError as exc:
            error = translate_transport_error(exc, request)
            _log_exchange(request, started, error=error)
            raise error from None
        except httpx.InvalidURL as exc:
            # httpx parses a redirect's Location even when it does not follow it.
            raise DownloadError(f"unusable redirect Location: {redact(str(exc))}") from None
        _log_exchange(request, started, response=response)
        return response

    def body(self, response: httpx.Response) -> StreamedBody:
        """An answer of Amplitude's (``/file``) as a ``Body`` the transfer reads."""
        return StreamedBody(response)

    @contextlib.asynccontextmanager
    async def open_presigned(
        self, url: str, headers: Mapping[str, str]
    ) -> AsyncIterator[Body]:
        """GET a presigned URL with only ``headers``: no auth, client headers or cookies.

        The one way to a presigned URL, for both stacks: the URL must pass the download policy
        (DownloadError before any connection), its host is resolved once and every address
        checked, and the connection goes to the address checked; then a client we own on the
        network reads it in a worker thread (``_s3_leg``), any other client through httpx.
        Through a proxy, or a transport that is not the network (a mock, the emulator), the
        host is not resolved here: the proxy or the transport decides where it leads.
        """
        check_download_url(url, self.download_policy, loopback_origin=self._loopback_origin)
        if self.blocking is not None:
            direct = not self.blocking.proxied(url)
            address = await self._resolve(url) if direct else None
            started = anyio.current_time()
            async with self.blocking.opened(url, headers, address) as threaded:
                _log_answer("GET", redact_url(url), started, threaded.status,
                            threaded.headers.get("location"))
                yield threaded
            return
        address = await self._resolve(url) if self._direct(url) else None
        response = await self._send_external(url, headers, address)
        try:
            yield StreamedBody(response)
        finally:
            await response.aclose()

    async def _resolve(self, url: str) -> str | None:
        return await resolve_download_host(url, self.download_policy,
                                           loopback_origin=self._loopback_origin)

    def _direct(self, url: str) -> bool:
        """Whether the client connects to ``url``'s host itself: a plain network transport
        (no proxy, no mock). httpx has no public way to ask which transport serves a URL."""
        transport = self.http._transport_for_url(httpx.URL(url))
        pool = getattr(transport, "_pool", None)
        return isinstance(transport, httpx.AsyncHTTPTransport) and \
            type(pool) is httpcore.AsyncConnectionPool

    async def _send_external(self, url: str, headers: Mapping[str, str],
                             address: str | None) -> httpx.Response:
        """The httpx GET of a presigned URL (to ``address``, when given, instead of a second
        resolution of its host; TLS still verifies the host name, sent as SNI).

        The request is built directly rather than through the client, so nothing the client
        carries (default headers, cookies, ``auth=``) can ride along; S3 answers a request with
        two auth mechanisms with 400.
        """
        try:
            request = httpx.Request("GET", url, headers=dict(headers))
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, TypeError, ValueError) as exc:
            raise DownloadError(f"invalid download URL: {redact(str(exc))}") from None
        # A presigned URL answers with the stored object; ask for it unchanged so Range works.
        request.headers["Accept-Encoding"] = "identity"
        if address is not None:
            named = request.url
            request.url = named.copy_with(host=address)
            request.headers["Host"] = named.netloc.decode("ascii")
            request.extensions["sni_hostname"] = named.host
        started = anyio.current_time()
        try:
            with library_request():
                response = await self.http.send(request, stream=True, follow_redirects=False,
                                                auth=None)
        except httpx.HTTPError as exc:
            error = translate_transport_error(exc, request)
            _log_exchange(request, started, error=error)
            raise error from None
        _log_exchange(request, started, response=response)
        return response

    async def read(self, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, response.request) from None

    async def raise_for_status(self, response: httpx.Response) -> None:
        """Raise the mapped error for a 4xx/5xx response (reading its body first)."""
        if response.status_code < 400:
            return
        try:
            body = await response.aread()
        except httpx.HTTPError:
            body = b""
        raise status_error(response, body)


def _log_exchange(request: httpx.Request, started: float, *,
                  response: httpx.Response | None = None,
                  error: TransportError | None = None) -> None:
    """One DEBUG line per exchange (its answer's headers are in): method, URL without its
    query, status or error, seconds; a redirect's Location likewise without its query."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    url = redact_url(request.url)
    if response is not None:
        _log_answer(request.method, url, started, response.status_code,
                    response.headers.get("Location"))
        return
    seconds = round(anyio.current_time() - started, 3)
    logger.debug("%s %s -> %s", request.method, url, type(error).__name__,
                 extra={"event": "http", "method": request.method, "url": url,
                        "error_type": type(error).__name__, "seconds": seconds})


def _log_answer(method: str, url: str, started: float, status: int,
                location: str | None) -> None:
    if not logger.isEnabledFor(logging.DEBUG):
        return
    seconds = round(anyio.current_time() - started, 3)
    logger.debug("%s %s -> %d in %.3fs", method, url, status, seconds,
                 extra={"event": "http", "method": method, "url": url, "status_code": status,
                        "seconds": seconds,
                        "location": None if location is None else redact_url(location)})


_REDIRECTS = frozenset((301, 302, 303, 307, 308))
BATCH_BYTES = 4 << 20  # per worker-thread call: few GIL hand-offs, memory bounded at ~4 batches


class StreamedBody:
    """An httpx response as a ``Body``: its stream poured into a sink in batches."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers

    def location(self) -> str | None:
        if self.status not in _REDIRECTS:
            return None
        location = self.response.headers.get("Location")
        if not location:
            raise DownloadError(f"HTTP {self.status} redirect without a Location")
        try:
            return str(self.response.url.join(location))
        except (httpx.InvalidURL, ValueError) as exc:
            raise DownloadError(f"unusable redirect Location: {redact(str(exc))}") from None

    async def error(self) -> APIStatusError:
        try:
            body = await self.response.aread()
        except httpx.HTTPError:  # the error status is what matters; a broken error body is not
            body = b""
        return status_error(self.response, body)

    async def pour_into(self, sink: Sink, report: Callable[[], None]) -> int:
        """Batches of ~4 MiB are written by the sink in a worker thread while the next batch is
        received (one batch in the thread, at most one more queued), so the network and the
        disk/hash work overlap and memory stays at a few MiB."""
        send, receive = anyio.create_memory_object_stream[list[bytes]](1)
        received = 0
        broken: TransportError | None = None

        async def write_batches() -> None:
            async with receive:
                async for batch in receive:
                    await anyio.to_thread.run_sync(sink.write_batch, batch)

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(write_batches)
                async with send:
                    pending: list[bytes] = []
                    size = 0
                    try:
                        async for chunk in self._raw():
                            received += len(chunk)
                            pending.append(chunk)
                            size += len(chunk)
                            if size >= BATCH_BYTES:
                                await send.send(pending)
                                pending, size = [], 0
                                report()
                    except TransportError as exc:
                        broken = exc  # the connection broke: keep every byte that arrived
                    if pending:
                        await send.send(pending)
        except BaseExceptionGroup as group:
            # The writer failed (the disk, a bad body) and the reader was cancelled, or the
            # other way round: raise the one error as itself, never wrapped in a group.
            raise single_error(group) from None
        if broken is not None:
            raise broken
        return received

    async def _raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives on the wire (not decoded), with httpx errors mapped."""
        response = self.response
        if response.is_stream_consumed and isinstance(response.stream, httpx.AsyncByteStream):
            # A mock transport's response built from bytes was read at construction; its
            # stream still holds the raw (undecoded) bytes, which is what we want.
            async for chunk in response.stream:
                yield chunk
            return
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, response.request) from None

