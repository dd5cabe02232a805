"""Keep secrets out of logs, reprs and exception text.

httpx logs every request URL at INFO and httpcore logs response headers (``Location`` with a
presigned S3 URL) at DEBUG. A filter on those loggers rewrites the records before any handler
sees them, so a presigned signature or a Basic token never reaches a log file.
"""

from __future__ import annotations

import logging
import re

__all__ = ("install_log_redaction", "redact", "redact_url")

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
