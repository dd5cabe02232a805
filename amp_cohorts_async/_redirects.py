"""Where a presigned download link may lead: checked before any connection is made.

A redirect from ``/file`` is an answer from the network, so it is input: a compromised proxy
or a forged answer could point the client at an internal service (a metadata endpoint, a
private address) or another scheme. The policy allows https to the listed hosts only, and
plain-http loopback only when the client itself talks to a loopback origin.

A name on the list can still resolve anywhere (a hijacked record, a wildcard that covers a
host someone else controls, DNS rebinding). So the host is resolved once, here, and every
address it resolves to must be public (loopback too when the base URL is loopback) unless the
host is named exactly in ``extra_hosts``; the connection then goes to the address checked,
never through a second resolution, and TLS is still verified against the host name.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from anyio import getaddrinfo

from ._config import DownloadPolicy, is_loopback
from ._exceptions import DownloadError, TransportError
from ._redact import redact_url

__all__ = ("check_download_url", "resolve_download_host")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


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


async def resolve_download_host(url: str, policy: DownloadPolicy, *,
                                loopback_origin: bool) -> str | None:
    """The address to connect to for ``url`` (which passed ``check_download_url``): its host
    resolved once, every address checked. None when the host is an address literal (already
    checked: connect to it as it is)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        found = await getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise TransportError(f"cannot resolve the download host {host}: {exc}",
                             never_sent=True) from None
    resolved = [str(entry[4][0]) for entry in found]  # as the resolver wrote them
    addresses = [ipaddress.ip_address(text.split("%")[0]) for text in resolved]
    if not addresses:
        raise TransportError(f"the download host {host} resolves to nothing", never_sent=True)
    if host not in policy.extra_hosts:  # named exactly: the user vouches for where it leads
        for address in addresses:
            kind = _not_public(address, loopback_origin=loopback_origin)
            if kind is not None:
                raise DownloadError(
                    f"refused download URL {redact_url(url)[:200]!r}: {host} resolves to "
                    f"{address}, a {kind} address (name the host exactly in "
                    f"DownloadPolicy(extra_hosts=...) to allow it)"
                )
    return resolved[0]


def _not_public(address: Address, *, loopback_origin: bool) -> str | None:
    """What kind of non-public address ``address`` is, or None when a download may go there."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return None if loopback_origin else "loopback"
    if address.is_link_local:
        return "link-local (cloud metadata)"
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return "reserved"
    if address.is_private or not address.is_global:
        return "private"
    return None
