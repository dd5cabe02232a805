"""The S3 leg in one worker thread with blocking reads: the download at the disk's speed.

Streaming a large export through httpx on the event loop costs Python work per 64 KiB chunk in
httpx, httpcore, h11 and anyio on the loop thread, and a writer thread that must win the GIL
back from that busy loop for every batch (profiled: 47 % of samples on the loop). Here one
worker thread does the whole leg with blocking reads of 1 MiB into one reused buffer, and
writes and hashes each read from the same memoryview in that thread; the loop only starts it,
reads a counter for progress, and stops it.

Only for a client that owns its httpx client (the TLS context is shared with it, so both legs
verify the same way; proxies come from the same environment variables). A borrowed client or
an injected transport keeps the async path, which honours whatever it was configured with.

Cancellation shuts the socket down, so a read blocked in the thread returns at once; the
caller waits for the thread to end before the temp file is removed.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import urllib.request
from base64 import b64encode
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Generic, TypeVar
from urllib.parse import unquote, urlsplit

import anyio
import attrs

from ._background import alongside
from ._body import Sink
from ._exceptions import APIStatusError, DownloadError, IncompleteBodyError, TransportError
from ._redact import redact_url
from ._status import status_error_from

__all__ = ("BlockingGetter", "Leg", "ThreadedBody", "run_abortable")

T = TypeVar("T")

REPORT_EVERY = 0.25  # seconds between two progress reports of a transfer in the thread
USER_AGENT = "amp-cohorts-async"


class Leg:
    """One blocking GET: its connection, its response, and the switch that aborts it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connection: http.client.HTTPConnection | None = None
        self._socket: socket.socket | None = None
        self.aborted = False
        self.response: http.client.HTTPResponse | None = None

    def attach(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if self.aborted:
                raise TransportError("download cancelled", never_sent=True)
            self._connection = connection

    def attach_socket(self, sock: socket.socket) -> None:
        """The socket about to connect: an abort from now on interrupts the connect too."""
        with self._lock:
            if self.aborted:
                raise TransportError("download cancelled", never_sent=True)
            self._socket = sock

    def abort(self) -> None:
        """Stop the thread's blocking connect or read now (from any thread): shut the socket
        down (Linux ends a connect in progress that way too)."""
        with self._lock:
            self.aborted = True
            sockets = [self._connection.sock if self._connection is not None else None,
                       self._socket]
        for sock in sockets:
            if sock is not None:
                with contextlib.suppress(OSError):  # already closed, or wrapped by TLS
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def read_into(self, buffer: memoryview) -> int:
        """Blocking: the next bytes of the body into ``buffer``; 0 at its end."""
        assert self.response is not None
        try:
            return self.response.readinto(buffer)
        except http.client.IncompleteRead as exc:
            raise IncompleteBodyError(f"the body ended early ({exc})") from None
        except (OSError, http.client.HTTPException) as exc:
            if self.aborted:
                raise TransportError("download cancelled") from None
            raise TransportError(f"{type(exc).__name__} reading the download: {exc}") from None


class ThreadedBody:
    """A presigned URL's answer on the threaded leg (see ``_body.Body``)."""

    def __init__(self, leg: Leg, status: int, headers: dict[str, str], url: str) -> None:
        self.leg = leg
        self.status = status
        self.headers: Mapping[str, str] = headers
        self._url = url

    def location(self) -> None:
        return None  # a presigned URL's redirect is not followed: it is an error status

    async def error(self) -> APIStatusError:
        response = self.leg.response
        assert response is not None
        body = await run_abortable(lambda: _read_error(response), self.leg)
        return status_error_from(self.status, self.headers, body, f"GET {redact_url(self._url)}")

    async def pour_into(self, sink: Sink, report: Callable[[], None]) -> int:
        async def report_every() -> None:
            while True:
                await anyio.sleep(REPORT_EVERY)
                report()

        async with alongside(report_every):
            return await run_abortable(lambda: sink.pump(self.leg.read_into), self.leg)


def _read_error(response: http.client.HTTPResponse) -> bytes:
    try:
        return response.read(1 << 16)
    except (OSError, http.client.HTTPException):
        return b""


@attrs.frozen
class BlockingGetter:
    """Opens presigned URLs from a worker thread, with the owned httpx client's TLS context."""

    ssl_context: ssl.SSLContext
    timeout: float = 60.0
    trust_env: bool = True

    def proxied(self, url: str) -> bool:
        """Whether ``url`` is fetched through a proxy (which then resolves its host)."""
        parts = urlsplit(url)
        return parts.scheme == "https" and self._proxy(parts.hostname or "") is not None

    @contextlib.asynccontextmanager
    async def opened(self, url: str, headers: Mapping[str, str],
                     address: str | None) -> AsyncIterator[ThreadedBody]:
        """GET ``url`` from a worker thread, connecting to ``address`` when given (the host's
        checked address); the answer's body is read by ``pour_into``."""
        leg = Leg()
        try:
            status, answer = await run_abortable(
                lambda: self.open(url, headers, leg, address), leg)
            yield ThreadedBody(leg, status, answer, url)
        finally:
            leg.close()  # a socket close, quick; on the loop so a cancellation cannot skip it

    def open(self, url: str, headers: Mapping[str, str], leg: Leg,
             address: str | None = None) -> tuple[int, dict[str, str]]:
        """Blocking: connect, send the GET, read the status and headers into ``leg``."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        proxy = self._proxy(host) if https else None
        shown = redact_url(url)
        try:
            connection = self._connection(host, port, https, proxy)
            # The socket is made here, connected to the address checked (or, through a
            # proxy, to the proxy), and handed to the leg before it connects.
            connection._create_connection = _connector(leg, address)  # type: ignore[attr-defined]
            leg.attach(connection)
            connection.request("GET", target, headers={
                **headers, "Accept-Encoding": "identity", "User-Agent": USER_AGENT,
            })
            response = connection.getresponse()
        except TransportError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                # Deterministic: retrying cannot help, and the message says what to fix.
                raise DownloadError(f"GET {shown}: {exc} (set SSL_CERT_FILE, or pass an "
                                    f"http_client with verify=)") from None
            never_sent = isinstance(exc, ConnectionRefusedError | socket.gaierror)
            detail = "cancelled" if leg.aborted else f"{type(exc).__name__}: {exc}"
            raise TransportError(f"GET {shown}: {detail}", never_sent=never_sent) from None
        leg.response = response
        return response.status, {name.lower(): value for name, value in response.getheaders()}

    def _proxy(self, host: str) -> tuple[str, int, str | None] | None:
        """(host, port, Proxy-Authorization) of the https proxy from the environment (as the
        httpx client reads it with ``trust_env``), or None for a direct connection."""
        if not self.trust_env:
            return None
        proxies = urllib.request.getproxies()
        url = proxies.get("https") or proxies.get("all")
        if not url or urllib.request.proxy_bypass(host):
            return None
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DownloadError(f"unsupported proxy for the download: {redact_url(url)}")
        credentials = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            credentials = "Basic " + b64encode(pair.encode()).decode()
        return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), \
            credentials

    def _connection(self, host: str, port: int, https: bool,
                    proxy: tuple[str, int, str | None] | None) -> http.client.HTTPConnection:
        if not https:  # loopback only (the download policy allows plain http nowhere else)
            return http.client.HTTPConnection(host, port, timeout=self.timeout)
        if proxy is None:
            return http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=self.ssl_context)
        # A CONNECT tunnel through the proxy: TLS end to end, verified against the target.
        proxy_host, proxy_port, credentials = proxy
        tunnel = http.client.HTTPSConnection(proxy_host, proxy_port, timeout=self.timeout,
                                             context=self.ssl_context)
        tunnel.set_tunnel(host, port, headers={"Proxy-Authorization": credentials}
                          if credentials else None)
        return tunnel


def _connector(leg: Leg, address: str | None) -> Callable[..., socket.socket]:
    """http.client's ``_create_connection``: a socket the leg can abort, connected to
    ``address`` (no second resolution; TLS is still verified against the URL's host name)."""

    def create_connection(target: tuple[str, int], timeout: object = None,
                          source_address: tuple[str, int] | None = None) -> socket.socket:
        host = address if address is not None else target[0]
        family, kind, proto, _name, where = socket.getaddrinfo(
            host, target[1], type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            leg.attach_socket(sock)
            if isinstance(timeout, int | float):
                sock.settimeout(timeout)
            if source_address is not None:
                sock.bind(source_address)
            sock.connect(where)
        except BaseException:
            sock.close()
            raise
        return sock

    return create_connection


class _Call(Generic[T]):
    """One blocking call of the leg, handed to a worker thread, and whether it has started.

    A call cancelled before a thread picked it up must never run (anyio then skips it, and no
    one would ever report it finished); one cancelled while it runs is stopped by aborting the
    leg, and waited for.
    """

    def __init__(self, work: Callable[[], T]) -> None:
        self._work = work
        self._lock = threading.Lock()
        self._state = "queued"  # -> "running" -> "over", or -> "dropped"
        self.over = threading.Event()

    def run(self) -> T:
        with self._lock:
            if self._state == "dropped":
                raise TransportError("download cancelled", never_sent=True)
            self._state = "running"
        try:
            return self._work()
        finally:
            with self._lock:
                self._state = "over"
            self.over.set()

    def drop(self) -> bool:
        """Never start it; True if it is already running (the caller must stop it)."""
        with self._lock:
            if self._state == "queued":
                self._state = "dropped"
            return self._state == "running"


async def run_abortable(work: Callable[[], T], leg: Leg) -> T:
    """``work()`` in a worker thread; cancelled, it aborts ``leg`` and waits for the thread.

    The thread must be over before the caller goes on (and removes the temp file it writes);
    aborting the leg shuts its socket down, so a thread blocked in a read or a connect returns
    at once, and a call that had not started yet never will.
    """
    call = _Call(work)
    try:
        return await anyio.to_thread.run_sync(call.run, abandon_on_cancel=True)
    except BaseException:
        running = call.drop()
        leg.abort()
        if running:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(call.over.wait)
        raise
