"""The library's error for an error status: Amplitude's error body read, the class chosen.

Shared by both HTTP stacks of the download path (httpx, and the threaded S3 leg's
``http.client``), so an S3 refusal reads the same whichever stack fetched it.
"""

from __future__ import annotations

import email.utils
import http
import json
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from ._config import REGIONS
from ._exceptions import (
    APIStatusError,
    AuthenticationError,
    NotFoundError,
    RateLimitError,
    ServerError,
)
from ._redact import redact

__all__ = ("parse_retry_after", "status_error_from")


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


def status_error_from(
    code: int,
    headers: Mapping[str, str],
    body: bytes,
    request_line: str,
    *,
    response: Any = None,
) -> APIStatusError:
    """The exception for an error status, its body and its (redacted) request line."""
    message, kind, metadata = _error_fields(body)
    if message is None:
        text = body.decode("utf-8", "replace").strip()
        if text.startswith("<") and "<Message>" in text:  # S3's XML errors
            text = text.split("<Message>", 1)[1].split("</Message>", 1)[0]
        message = text[:300] or _reason(code) or "no message"
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
        return AuthenticationError(message, hint=_refused_keys_hint(request_line), **fields)
    if code == 404:
        return NotFoundError(message, **fields)
    if code >= 500:
        return ServerError(message, **fields)
    return APIStatusError(message, **fields)


def _refused_keys_hint(request_line: str) -> str:
    """Who refused the keys; on Amplitude's hosts, that the other region's keys fail there."""
    host = urllib.parse.urlsplit(request_line.partition(" ")[2]).hostname or "the server"
    for region, origin in REGIONS.items():
        if host == urllib.parse.urlsplit(origin).hostname:
            other = next(r for r in REGIONS if r != region)
            return (f"{host} (region {region!r}) refused these keys; keys of a project in the "
                    f"{other!r} region are refused there: pass region={other!r} "
                    f"(--region {other})")
    return f"{host} refused these keys"


def _reason(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return ""
