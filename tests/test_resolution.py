"""Resolve, check, connect: the S3 host is resolved once, every address checked, and the
connection goes to the address checked with TLS verified against the host name, on both HTTP
stacks, over real sockets.

The names here (``*.fake.test``) exist in no DNS: a resolver stand-in maps them (DNS is the
world outside the test). That a download to such a name succeeds at all shows the connection
went to the address checked, not through a second resolution.
"""

from __future__ import annotations

import ipaddress
import pathlib
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

import amp_cohorts_async as amp
import amp_cohorts_async._redirects as redirects_module
from amp_cohorts_async._redirects import resolve_download_host
from amp_cohorts_async.testing import FakeAmplitude

POLL = amp.PollPolicy(initial_interval=0.02, max_interval=0.1)
NAME = "exports.fake.test"


@pytest.fixture(scope="module")
def names_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A certificate for ``*.fake.test`` names only (no IP address in it)."""
    directory = tmp_path_factory.mktemp("tls-names")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={NAME}",
                    "-addext", f"subjectAltName=DNS:{NAME},DNS:internal.fake.test"],
                   check=True, capture_output=True)
    return str(cert), str(key)


class Resolver:
    """Stands in for DNS: names of ``answers`` resolve to their address, others really."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self._real = anyio.getaddrinfo

    async def __call__(self, host: str, port: Any, **kwargs: Any) -> list[Any]:
        self.asked.append(host)
        if host in self.answers:
            address = self.answers[host]
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (address, port))]
        return await self._real(host, port, **kwargs)


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    stand_in = Resolver({})
    monkeypatch.setattr(redirects_module, "getaddrinfo", stand_in)
    return stand_in


async def download(fake: FakeAmplitude, base_url: str, s3_name: str, directory: pathlib.Path,
                   *, stack: str, policy: amp.DownloadPolicy, trust: str) -> amp.DownloadResult:
    """Download "big" with the S3 stand-in reached by ``s3_name``."""
    s3_port = fake.s3_origin.rsplit(":", 1)[1]
    fake.s3_origin = f"https://{s3_name}:{s3_port}"
    options: dict[str, Any] = {}
    borrowed = None
    if stack == "httpx":
        borrowed = httpx.AsyncClient(verify=ssl.create_default_context(cafile=trust))
        options["http_client"] = borrowed
    try:
        async with amp.CohortsClient(fake.api_key, fake.secret_key, base_url=base_url,
                                     poll=POLL, download=policy,
                                     retry=amp.RetryPolicy(max_attempts=2),
                                     **options) as client:
            return await client.download_cohort("big", directory)
    finally:
        if borrowed is not None:
            await borrowed.aclose()


@pytest.fixture
async def tls_fake(names_certificate: tuple[str, str], monkeypatch: pytest.MonkeyPatch
                   ) -> AsyncIterator[tuple[FakeAmplitude, str]]:
    monkeypatch.setenv("SSL_CERT_FILE", names_certificate[0])  # the owned client's trust
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*names_certificate)
    with FakeAmplitude(job_duration=0.05, inline_threshold=1024) as fake:
        fake.add_cohort("big", size=3_000)
        async with fake.serve(host="0.0.0.0", s3_tls=context) as base_url:
            yield fake, base_url.replace("0.0.0.0", "127.0.0.1")


STACKS = ["threaded", "httpx"]


@pytest.mark.parametrize("stack", STACKS)
async def test_a_listed_name_is_fetched_from_the_address_checked_with_tls_on_the_name(
    tls_fake: tuple[FakeAmplitude, str], resolver: Resolver, names_certificate: tuple[str, str],
    tmp_path: pathlib.Path, stack: str,
) -> None:
    fake, base_url = tls_fake
    resolver.answers[NAME] = "127.0.0.1"  # loopback: allowed, the base URL is loopback
    result = await download(fake, base_url, NAME, tmp_path, stack=stack,
                            policy=amp.DownloadPolicy(extra_hosts=("*.fake.test",)),
                            trust=names_certificate[0])
    assert result.path.read_bytes() == fake.export_bytes(result.request_id)
    assert resolver.asked == [NAME]  # resolved once
    [s3] = fake.requests_to("s3")
    assert s3.headers["host"] == f"{NAME}:{fake.s3_origin.rsplit(':', 1)[1]}"


@pytest.mark.parametrize("stack", STACKS)
async def test_tls_is_still_verified_against_the_host_name(
    tls_fake: tuple[FakeAmplitude, str], resolver: Resolver, names_certificate: tuple[str, str],
    tmp_path: pathlib.Path, stack: str,
) -> None:
    fake, base_url = tls_fake
    resolver.answers["other.fake.test"] = "127.0.0.1"  # the certificate does not name it
    with pytest.raises(amp.AmplitudeError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
        await download(fake, base_url, "other.fake.test", tmp_path, stack=stack,
                       policy=amp.DownloadPolicy(extra_hosts=("*.fake.test",)),
                       trust=names_certificate[0])
    assert fake.requests_to("s3") == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("address", ["169.254.169.254", "10.1.2.3", "::ffff:169.254.169.254",
                                     "fd00:ec2::254"])
async def test_a_listed_name_that_resolves_to_a_forbidden_address_is_refused(
    tls_fake: tuple[FakeAmplitude, str], resolver: Resolver, names_certificate: tuple[str, str],
    tmp_path: pathlib.Path, stack: str, address: str,
) -> None:
    fake, base_url = tls_fake
    resolver.answers[NAME] = address
    with pytest.raises(amp.DownloadError, match="resolves to"):
        await download(fake, base_url, NAME, tmp_path, stack=stack,
                       policy=amp.DownloadPolicy(extra_hosts=("*.fake.test",)),
                       trust=names_certificate[0])
    assert fake.requests_to("s3") == []
    assert list(tmp_path.iterdir()) == []


def this_hosts_private_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: it picks the route's source
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    parsed = ipaddress.ip_address(address)
    return address if parsed.is_private and not parsed.is_loopback else None


@pytest.mark.parametrize("stack", STACKS)
async def test_a_private_address_is_allowed_only_for_a_host_named_exactly(
    tls_fake: tuple[FakeAmplitude, str], resolver: Resolver, names_certificate: tuple[str, str],
    tmp_path: pathlib.Path, stack: str,
) -> None:
    private = this_hosts_private_address()
    if private is None:
        pytest.skip("this host has no private, non-loopback address to serve on")
    fake, base_url = tls_fake
    resolver.answers["internal.fake.test"] = private
    wildcard = amp.DownloadPolicy(extra_hosts=("*.fake.test",))
    with pytest.raises(amp.DownloadError, match="private"):
        await download(fake, base_url, "internal.fake.test", tmp_path, stack=stack,
                       policy=wildcard, trust=names_certificate[0])
    named = amp.DownloadPolicy(extra_hosts=("*.fake.test", "internal.fake.test"))
    result = await download(fake, base_url, "internal.fake.test", tmp_path, stack=stack,
                            policy=named, trust=names_certificate[0])
    assert result.path.read_bytes() == fake.export_bytes(result.request_id)


@pytest.mark.parametrize(
    ("address", "loopback_origin", "refused"),
    [("52.216.8.1", False, None), ("2600:1f18::1", False, None),
     ("127.0.0.1", False, "loopback"), ("127.0.0.1", True, None), ("::1", False, "loopback"),
     ("169.254.169.254", True, "link-local"), ("fe80::1", False, "link-local"),
     ("10.0.0.7", False, "private"), ("172.16.0.1", True, "private"),
     ("192.168.1.1", False, "private"), ("100.100.100.200", False, "private"),
     ("fd00:ec2::254", False, "private"), ("::ffff:10.0.0.1", False, "private"),
     ("0.0.0.0", False, "reserved"), ("240.0.0.1", False, "reserved")],
)
async def test_which_addresses_a_download_may_reach(
    resolver: Resolver, address: str, loopback_origin: bool, refused: str | None
) -> None:
    resolver.answers["s3.amazonaws.com"] = address
    url = "https://s3.amazonaws.com/bucket/x.csv?X-Amz-Signature=secret"
    if refused is None:
        assert await resolve_download_host(url, amp.DownloadPolicy(),
                                           loopback_origin=loopback_origin) == address
        return
    with pytest.raises(amp.DownloadError, match=refused) as caught:
        await resolve_download_host(url, amp.DownloadPolicy(), loopback_origin=loopback_origin)
    assert "secret" not in str(caught.value)
    # Named exactly, the user vouches for it.
    named = amp.DownloadPolicy(extra_hosts=("s3.amazonaws.com",))
    assert await resolve_download_host(url, named, loopback_origin=loopback_origin) == address
