"""The HTTP boundary: the only module that touches httpx.

It builds requests with credentials, sends them, and translates every httpx error and every
error status into the library's own exceptions. Nothing above it sees an httpx exception.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import attrs
import httpx

from ._config import DownloadPolicy, is_loopback
from ._exceptions import (
    APIStatusError,
    AuthenticationError,
    DownloadError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ResponseValidationError,
    ServerError,
    TransportError,
)
from ._redact import install_log_redaction, redact, redact_url
from ._redirects import check_download_url
from ._s3_leg import BlockingGetter

__all__ = (
    "Credentials",
    "HttpBoundary",
    "Request",
    "Response",
    "default_http_client",
    "http_client_for",
    "parse_json",
    "parse_retry_after",
    "status_error_from",
)

logger = logging.getLogger("amp_cohorts_async")

QueryParams = Sequence[tuple[str, str]]
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


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or HTTP-date), or None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _error_fields(body: bytes) -> tuple[str | None, str | None, Any]:
    """(message, type, metadata) from Amplitude's ``{"error": {...}}`` body, if it has one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None
    error = data.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        kind = error.get("type")
        return (
            str(message) if message is not None else None,
            str(kind) if kind is not None else None,
            error.get("metadata"),
        )
    if isinstance(error, str):
        return error, None, None
    message = data.get("message")
    return (str(message) if message is not None else None), None, None


def status_error(response: httpx.Response, body: bytes) -> APIStatusError:
    """The exception for an error response whose body has been read."""
    return status_error_from(response.status_code, response.headers, body,
                             _request_line(response.request), response=response)


def status_error_from(
    code: int,
    headers: Mapping[str, str],
    body: bytes,
    request_line: str,
    *,
    response: httpx.Response | None = None,
) -> APIStatusError:
    """The exception for an error status, its body and its (redacted) request line."""
    message, kind, metadata = _error_fields(body)
    if message is None:
        text = body.decode("utf-8", "replace").strip()
        if text.startswith("<") and "<Message>" in text:  # S3's XML errors
            text = text.split("<Message>", 1)[1].split("</Message>", 1)[0]
        message = text[:300] or httpx.codes.get_reason_phrase(code) or "no message"
    message = redact(message)
    fields: dict[str, Any] = {
        "status_code": code,
        "type": kind,
        "metadata": metadata,
        "response": response,
        "request_line": request_line,
    }
    if code == 429:
        retry_after = parse_retry_after(headers.get("Retry-After") or headers.get("retry-after"))
        return RateLimitError(message, retry_after=retry_after, **fields)
    if code in (401, 403):
        return AuthenticationError(message, **fields)
    if code == 404:
        return NotFoundError(message, **fields)
    if code >= 500:
        return ServerError(message, **fields)
    return APIStatusError(message, **fields)


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
    ) -> httpx.Request:
        """A request to ``path`` under the base URL (whose own path, if any, is a prefix)."""
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
            return self.http.build_request(method, url, headers=merged, content=content)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise InvalidRequestError(f"cannot build the request: {redact(str(exc))}") from None

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send to the Amplitude origin; the response body is left unread (caller closes it)."""
        logger.debug("%s %s", request.method, redact_url(request.url))
        try:
            # auth=None: our Authorization header stands, whatever auth a borrowed client has.
            return await self.http.send(request, stream=True, follow_redirects=False, auth=None)
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, request) from None
        except httpx.InvalidURL as exc:
            # httpx parses a redirect's Location even when it does not follow it.
            raise DownloadError(f"unusable redirect Location: {redact(str(exc))}") from None

    def check_external(self, url: str) -> None:
        """DownloadError unless the download policy lets ``url`` be fetched (no connection)."""
        check_download_url(url, self.download_policy, loopback_origin=self._loopback_origin)

    async def send_external(
        self, url: str, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """GET a presigned URL with only ``headers``: no auth, client headers or cookies.

        The URL must pass the download policy first (DownloadError before any connection).
        The request is built directly rather than through the client, so nothing the client
        carries (default headers, cookies, ``auth=``) can ride along; S3 answers a request with
        two auth mechanisms with 400.
        """
        self.check_external(url)
        try:
            request = httpx.Request("GET", url, headers=dict(headers or {}))
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, TypeError, ValueError) as exc:
            raise DownloadError(f"invalid download URL: {redact(str(exc))}") from None
        # A presigned URL answers with the stored object; ask for it unchanged so Range works.
        request.headers["Accept-Encoding"] = "identity"
        logger.debug("GET %s", redact_url(request.url))
        try:
            return await self.http.send(request, stream=True, follow_redirects=False, auth=None)
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, request) from None

    async def read(self, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, response.request) from None

    async def iter_raw(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """The body as it arrives on the wire (not decoded), with httpx errors mapped."""
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

    def redirect_location(self, response: httpx.Response) -> str:
        """The absolute URL a redirect points to; a missing or unusable one is a DownloadError."""
        location = response.headers.get("Location")
        if not location:
            raise DownloadError(f"HTTP {response.status_code} redirect without a Location")
        try:
            return str(response.url.join(location))
        except (httpx.InvalidURL, ValueError) as exc:
            raise DownloadError(f"unusable redirect Location: {redact(str(exc))}") from None

    async def raise_for_status(self, response: httpx.Response) -> None:
        """Raise the mapped error for a 4xx/5xx response (reading its body first)."""
        if response.status_code < 400:
            return
        try:
            body = await response.aread()
        except httpx.HTTPError:
            body = b""
        raise status_error(response, body)
