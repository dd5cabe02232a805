"""Keep secrets out of logs, reprs and exception text.

httpx logs every request URL at INFO and httpcore logs response headers (``Location`` with a
presigned S3 URL) at DEBUG. A filter on those loggers rewrites the records before any handler
sees them, so a presigned signature or a Basic token never reaches a log file.
"""

from __future__ import annotations

import logging
import re
import urllib.parse

__all__ = ("install_log_redaction", "redact", "redact_query_values", "redact_url")

_QUERY = re.compile(r"""(?P<base>https?://[^\s"'<>?]+)\?[^\s"'<>]*""")
_BASIC = re.compile(r"(?i)(basic|bearer)(\s+|'?,\s*b?')[A-Za-z0-9+/=._-]{8,}")
_SIGNATURE_PARAM = re.compile(
    r"(?i)(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId)=[^&\s\"']+"
)

# Loggers whose records may carry request URLs or response headers.
_THIRD_PARTY_LOGGERS = (
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
)


def redact_url(url: object) -> str:
    """The URL without its query string (where presigned signatures live)."""
    text = str(url)
    head, sep, _query = text.partition("?")
    return f"{head}?[redacted]" if sep else head


def redact_query_values(url: str) -> str:
    """The URL with every query value (and any user:password) replaced by ``REDACTED``.

    The query's keys stay, as OpenTelemetry's ``url.full`` convention asks; every value goes,
    not only the known credentials (``X-Amz-Signature``, ``X-Amz-Credential``,
    ``X-Amz-Security-Token``...): a new name for a credential must not leak either.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not a URL one can take apart: keep none of its query
        return redact_url(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "REDACTED:REDACTED@" + netloc.rpartition("@")[2]
    query = "&".join(f"{field.partition('=')[0]}=REDACTED" if field else field
                     for field in parts.query.split("&")) if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact(text: str) -> str:
    """Drop query strings of URLs, Basic/Bearer tokens and signature parameters from text."""
    text = _QUERY.sub(lambda m: f"{m.group('base')}?[redacted]", text)
    text = _SIGNATURE_PARAM.sub(lambda m: f"{m.group(1)}=[redacted]", text)
    return _BASIC.sub(lambda m: f"{m.group(1)}{m.group(2)}[redacted]", text)


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is the emitter's problem; keep it as it is
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True


_FILTER = _RedactingFilter(name="")


def install_log_redaction() -> None:
    """Attach the redacting filter to httpx's and httpcore's loggers (idempotent)."""
    for name in _THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
