"""Where a presigned download link may lead: checked before any connection is made.

A redirect from ``/file`` is an answer from the network, so it is input: a compromised proxy
or a forged answer could point the client at an internal service (a metadata endpoint, a
private address) or another scheme. The policy allows https to the listed hosts only, and
plain-http loopback only when the client itself talks to a loopback origin.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from ._config import DownloadPolicy, is_loopback
from ._exceptions import DownloadError
from ._redact import redact_url

__all__ = ("check_download_url",)


def _host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def check_download_url(url: str, policy: DownloadPolicy, *, loopback_origin: bool) -> None:
    """Raise DownloadError unless ``url`` is a place the policy lets a download go."""
    shown = redact_url(url)[:200]
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise DownloadError(f"refused download URL {shown!r}: not a valid URL") from None
    if parts.username is not None or parts.password is not None:
        raise DownloadError(f"refused download URL {shown!r}: it carries credentials")
    if not host:
        raise DownloadError(f"refused download URL {shown!r}: no host")
    loopback_ok = loopback_origin and is_loopback(host)
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback_ok):
        raise DownloadError(f"refused download URL {shown!r}: only https is followed")
    if loopback_ok:
        return
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is not None:
        named = str(address) in policy.hosts  # e.g. an internal proxy the user listed
        forbidden = (address.is_link_local or address.is_loopback or address.is_unspecified
                     or address.is_multicast or address.is_reserved)
        if named and not forbidden:
            return
        raise DownloadError(f"refused download URL {shown!r}: address {address} is not allowed")
    if not _host_allowed(host, policy.hosts):
        raise DownloadError(
            f"refused download URL {shown!r}: host {host} is not an allowed download host "
            f"({', '.join(policy.hosts)}; add yours with DownloadPolicy(extra_hosts=...))"
        )
