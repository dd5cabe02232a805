"""The HTTP boundary: the only module that touches httpx.

It builds requests with credentials, sends them, and translates every httpx error and every
error status into the library's own exceptions. Nothing above it sees an httpx exception.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import httpx

from ._exceptions import (
    APIStatusError,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ResponseValidationError,
    ServerError,
    TransportError,
)
from ._redact import install_log_redaction, redact, redact_url

__all__ = (
    "Credentials",
    "HttpBoundary",
    "default_http_client",
    "never_sent",
    "parse_retry_after",
)

logger = logging.getLogger("amp_cohorts_async")

QueryParams = Sequence[tuple[str, str]]


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


def default_http_client(
    max_connections: int, transport: httpx.AsyncBaseTransport | None
) -> httpx.AsyncClient:
    """The client a CohortsClient owns when none is borrowed.

    The pool is sized to the concurrency limit (plus room for S3 transfers, which hold no
    Amplitude permit); keep-alive outlives the longest poll interval so polls reuse connections.
    """
    return httpx.AsyncClient(
        transport=transport,
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


class _TransportError(TransportError):
    def __init__(self, message: str, *, not_sent: bool) -> None:
        super().__init__(message)
        self.not_sent = not_sent


def never_sent(error: TransportError) -> bool:
    """Whether ``error`` happened before a byte of the request left (connect, pool)."""
    return isinstance(error, _TransportError) and error.not_sent


def translate_transport_error(exc: httpx.HTTPError, request: httpx.Request) -> TransportError:
    kind = type(exc).__name__
    detail = redact(str(exc)) or kind
    where = f"{request.method} {redact_url(request.url)}"
    return _TransportError(f"{kind} on {where}: {detail}", not_sent=isinstance(exc, _NOT_SENT))


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
    except (ValueError, UnicodeDecodeError):
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
    message, kind, metadata = _error_fields(body)
    if message is None:
        text = body.decode("utf-8", "replace").strip()
        if text.startswith("<") and "<Message>" in text:  # S3's XML errors
            text = text.split("<Message>", 1)[1].split("</Message>", 1)[0]
        message = text[:300] or response.reason_phrase or "no message"
    message = redact(message)
    where = f"{response.request.method} {redact_url(response.request.url)}"
    fields: dict[str, Any] = {
        "status_code": response.status_code,
        "type": kind,
        "metadata": metadata,
        "response": response,
    }
    text = f"{message} ({where})"
    code = response.status_code
    if code == 429:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return RateLimitError(text, retry_after=retry_after, **fields)
    if code in (401, 403):
        return AuthenticationError(text, **fields)
    if code == 404:
        return NotFoundError(text, **fields)
    if code >= 500:
        return ServerError(text, **fields)
    return APIStatusError(text, **fields)


def parse_json(response: httpx.Response, body: bytes, *, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        snippet = body[:80].decode("utf-8", "replace")
        raise ResponseValidationError(
            f"unexpected {what} response body: $: not JSON (HTTP {response.status_code}, "
            f"starts {snippet!r})"
        ) from None


class HttpBoundary:
    """Builds authenticated requests to the Amplitude origin and sends them."""

    def __init__(
        self, http: httpx.AsyncClient, base_url: httpx.URL, credentials: Credentials
    ) -> None:
        install_log_redaction()
        self.http = http
        self.base_url = base_url
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
    ) -> httpx.Request:
        url = self.base_url.join(path)
        if params:
            url = url.copy_with(params=httpx.QueryParams(list(params)))
        headers = {"Authorization": self._authorization, "Accept": "application/json"}
        if json_body is not None:
            content = json.dumps(json_body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
            return self.http.build_request(method, url, headers=headers, content=content)
        return self.http.build_request(method, url, headers=headers)

    def build_external(self, url: str, headers: Mapping[str, str] | None = None) -> httpx.Request:
        """A request to a presigned URL: no Authorization, whatever the borrowed client sets."""
        try:
            request = self.http.build_request("GET", url, headers=dict(headers or {}))
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, TypeError) as exc:
            raise InvalidRequestError(f"invalid download URL: {redact(str(exc))}") from None
        request.headers.pop("Authorization", None)
        # A presigned URL answers with the stored object; ask for it unchanged so Range works.
        request.headers["Accept-Encoding"] = "identity"
        return request

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send and return the response with its body unread (the caller closes it)."""
        logger.debug("%s %s", request.method, redact_url(request.url))
        try:
            return await self.http.send(request, stream=True, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, request) from None

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
