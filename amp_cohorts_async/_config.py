"""Small frozen configuration values, validated at construction."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

from ._exceptions import InvalidRequestError
from ._validate import require_encodable

__all__ = (
    "REGIONS",
    "DownloadPolicy",
    "Limits",
    "PollPolicy",
    "RateWindow",
    "RetryPolicy",
    "is_loopback",
    "resolve_base_url",
)

REGIONS: dict[str, str] = {
    "us": "https://amplitude.com",
    "eu": "https://analytics.eu.amplitude.com",
}


def _number(attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{attribute.name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidRequestError(f"{attribute.name} must be finite, got {value!r}")


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is None:
        return
    _number(attribute, value)
    if not value > 0:
        raise InvalidRequestError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    _number(attribute, value)
    if not value >= 0:
        raise InvalidRequestError(f"{attribute.name} must be >= 0, got {value!r}")


def _int(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRequestError(f"{attribute.name} must be an int, got {value!r}")


@attrs.frozen
class RateWindow:
    """Never more than ``max_requests`` cohort requests in ANY interval of ``seconds``."""

    max_requests: int = attrs.field(validator=[_int, _positive])
    seconds: float = attrs.field(validator=_positive)


def _to_windows(value: Iterable[RateWindow]) -> tuple[RateWindow, ...]:
    try:
        return tuple(value)
    except TypeError:
        raise InvalidRequestError("cohort_requests must be a tuple of RateWindow") from None


def _windows(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(w, RateWindow) for w in value):
        raise InvalidRequestError("cohort_requests must be a tuple of RateWindow")


def _non_negative_opt(inst: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None:
        _non_negative(inst, attribute, value)


@attrs.frozen(kw_only=True)
class Limits:
    """Amplitude's documented limits; every request of a client obeys them."""

    max_concurrent_requests: int = attrs.field(default=5, validator=[_int, _positive])
    cohort_requests: tuple[RateWindow, ...] = attrs.field(
        default=(RateWindow(60, 600.0), RateWindow(4, 60.0)),
        converter=_to_windows,
        validator=_windows,
    )
    max_jobs_in_flight: int | None = attrs.field(default=None, validator=[_int, _positive])
    monthly_quota: int | None = attrs.field(default=500, validator=[_int, _non_negative_opt])
    max_ids_per_request: int = attrs.field(default=100_000, validator=[_int, _positive])
    max_cohort_size: int = attrs.field(default=2_000_000, validator=[_int, _positive])

    def time_scaled(self, factor: float) -> Limits:
        """These limits with every rate window's length multiplied by ``factor`` (for an
        emulator that runs Amplitude's clock faster, as ``--time-scale`` does)."""
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0:
            raise InvalidRequestError(f"a time scale must be a number > 0, got {factor!r}")
        return attrs.evolve(self, cohort_requests=tuple(
            RateWindow(w.max_requests, w.seconds * factor) for w in self.cohort_requests))


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Full-jitter exponential backoff for 429, 5xx and transport errors."""

    max_attempts: int = attrs.field(default=6, validator=[_int, _positive])
    initial_delay: float = attrs.field(default=0.5, validator=_non_negative)
    max_delay: float = attrs.field(default=30.0, validator=_non_negative)
    max_retry_after: float = attrs.field(default=120.0, validator=_non_negative)


@attrs.frozen(kw_only=True)
class PollPolicy:
    """How an export job's status is polled, and how long a job may take.

    Intervals start at ``initial_interval`` and grow by ``multiplier`` up to ``max_interval``,
    each with +/- ``jitter``; while the client is idle they stay at ``idle_interval``.
    """

    initial_interval: float = attrs.field(default=2.0, validator=_positive)
    max_interval: float = attrs.field(default=30.0, validator=_positive)
    multiplier: float = attrs.field(default=1.5, validator=_positive)
    jitter: float = attrs.field(default=0.2, validator=_non_negative)
    deadline: float | None = attrs.field(default=3600.0, validator=_positive)
    #: While the concurrency gate is idle (a free slot, nobody queued), the next poll comes
    #: after at most this long: status polls cost no quota, so an idle client checks often
    #: and sees a finished job soon; under load the intervals back off as above. ``None``:
    #: always the growing interval.
    idle_interval: float | None = attrs.field(default=2.0, validator=_positive)

    @jitter.validator
    def _check_jitter(self, _attribute: attrs.Attribute[float], value: float) -> None:
        if value >= 1:
            raise InvalidRequestError(f"jitter must be < 1, got {value!r}")


# Where Amplitude's presigned export links point.
DEFAULT_DOWNLOAD_HOSTS: tuple[str, ...] = ("*.amazonaws.com",)
_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_HOST_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})+")


def _host_patterns(value: Any) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidRequestError("extra_hosts must be a sequence of host names")
    patterns = []
    for item in value:
        if not isinstance(item, str):
            raise InvalidRequestError(f"extra_hosts: {item!r} is not a host name")
        pattern = item.strip().lower().rstrip(".")
        try:
            ipaddress.ip_address(pattern)
        except ValueError:
            if not _HOST_PATTERN.fullmatch(pattern):
                raise InvalidRequestError(
                    f"extra_hosts: {item!r} is not a host name or '*.domain' pattern"
                ) from None
        patterns.append(pattern)
    return tuple(patterns)


def _flag(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{attribute.name} must be True or False, got {value!r}")


@attrs.frozen(kw_only=True)
class DownloadPolicy:
    """Where a download may be fetched from, what a body may inflate to, what is counted.

    ``/file`` answers large exports with a redirect to a presigned S3 URL; it is followed only
    over https to a host of ``*.amazonaws.com`` or of ``extra_hosts`` (exact names, or
    ``"*.example.com"`` for its subdomains: a proxy, a CloudFront domain). When the client's
    base URL is a loopback address (tests, the emulator), loopback targets over http are
    allowed too. Private, link-local and metadata addresses are refused unless named exactly.
    A gzip body that inflates more than ``max_gzip_ratio`` times its size is refused.

    ``count_members=True`` counts the file's members as it is written
    (``DownloadResult.members``; the command line does). Off by default, because the count is
    CPU work on the transfer's critical path when the cores are busy: measured on 2 cores
    shared with the server, 177 MB took 0.20 s with it and 0.146 s without (curl -o: 0.148 s).
    """

    extra_hosts: tuple[str, ...] = attrs.field(default=(), converter=_host_patterns)
    max_gzip_ratio: float = attrs.field(default=100.0, validator=_positive)
    count_members: bool = attrs.field(default=False, validator=_flag)

    @property
    def hosts(self) -> tuple[str, ...]:
        return DEFAULT_DOWNLOAD_HOSTS + self.extra_hosts


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_base_url(region: Any, base_url: Any) -> str:
    """The Amplitude origin to talk to, as ``scheme://host[:port][/path]``.

    Plain http is accepted only for loopback hosts; the port must be a valid TCP port.
    """
    if base_url is None:
        if not isinstance(region, str) or region not in REGIONS:
            raise InvalidRequestError(
                f"unknown region {region!r}; expected one of {', '.join(sorted(REGIONS))}"
            )
        return REGIONS[region]
    if not isinstance(base_url, str):
        raise InvalidRequestError(f"base_url must be a string, got {type(base_url).__name__}")
    if len(base_url) > 2048 or any(ord(c) < 0x21 or ord(c) == 0x7F for c in base_url):
        raise InvalidRequestError("base_url must be a URL without spaces or control characters")
    require_encodable(base_url, "base_url")
    try:
        parts = urlsplit(base_url)
        host = parts.hostname
        port = parts.port  # ValueError when out of 0-65535 or not a number
    except ValueError as exc:
        raise InvalidRequestError(f"invalid base_url: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidRequestError("base_url must be an absolute http(s) URL")
    if port == 0:
        raise InvalidRequestError("invalid base_url: port 0")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequestError("base_url must not carry credentials; pass api_key/secret_key")
    if parts.scheme == "http" and not is_loopback(host):
        raise InvalidRequestError(
            "plain http:// base_url is only accepted for loopback hosts; use https://"
        )
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))
