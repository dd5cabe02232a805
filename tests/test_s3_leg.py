"""The S3 leg in a worker thread (clients that own their httpx client), over real sockets:
cancellation stops the thread and leaves nothing, TLS verification holds, progress flows."""

from __future__ import annotations

import contextlib
import hashlib
import io
import pathlib
import random
import ssl
import subprocess
import sys
import threading
import time

import anyio
import httpx
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async._digest import BackgroundDigest
from amp_cohorts_async._files import AtomicFile
from amp_cohorts_async._sink import BodySink
from amp_cohorts_async.testing import FakeAmplitude

from .conftest import finished_export

POLL = amp.PollPolicy(initial_interval=0.05, max_interval=0.2)
COUNTING = amp.DownloadPolicy(count_members=True)


def threads_in_the_leg() -> list[str]:
    """Threads whose stack is inside the blocking S3 leg right now, and digest threads alive."""
    names = [thread.name for thread in threading.enumerate() if thread.name == "amp-digest"]
    for frame in sys._current_frames().values():
        while frame is not None:
            code = frame.f_code
            if (code.co_name in ("pump_blocking", "read_into", "open")
                    and "amp_cohorts_async" in code.co_filename):
                names.append(code.co_name)
                break
            frame = frame.f_back  # type: ignore[assignment]
    return names


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True)
    return str(cert), str(key)


def server_context(certificate: tuple[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


@pytest.mark.parametrize("seed", range(4))
async def test_cancelled_at_random_points_the_thread_stops_and_nothing_is_left(
    tmp_path: pathlib.Path, seed: int
) -> None:
    with FakeAmplitude(inline_threshold=1024) as fake:
        fake.add_cohort("big", size=60_000)
        fake.inject("s3", "slow", delay=0.2)  # the first transfer takes ~2 s
        async with fake.serve() as base_url, amp.CohortsClient(
            fake.api_key, fake.secret_key, base_url=base_url, poll=POLL,
        ) as client:
            request = await finished_export(client, "big")
            delay = random.Random(seed).uniform(0.05, 1.0)
            started = time.monotonic()
            with anyio.move_on_after(delay) as scope:
                await client.download_file(request.request_id, tmp_path / "big.csv")
            assert scope.cancelled_caught
            # Stopped, not waited out (the leg's read timeout is 30 s); a generous bound keeps a
            # loaded machine from flaking.
            assert time.monotonic() - started - delay < 5
            assert threads_in_the_leg() == []  # the blocking read was stopped, not abandoned
            assert list(tmp_path.iterdir()) == []
            assert client.scheduler.gate.in_use == 0
            result = await client.download_file(request.request_id, tmp_path / "big.csv")
        assert hashlib.sha256(result.path.read_bytes()).hexdigest() == result.sha256
        assert result.path.read_bytes() == fake.export_bytes(request.request_id)


async def test_cancelled_as_the_leg_starts_it_stops_at_once(tmp_path: pathlib.Path) -> None:
    """Cancelled at 40 points around the start of the S3 leg's worker thread, every download
    stops within seconds, with anyio's own worker threads (no virtual time here). A worker call
    cancelled before a thread picked it up was skipped, and the wait for its end ran out its
    30 s (4 runs in 30 of this loop did)."""
    with FakeAmplitude(inline_threshold=1024) as fake:
        fake.add_cohort("big", size=60_000)
        async with fake.serve() as base_url, amp.CohortsClient(
            fake.api_key, fake.secret_key, base_url=base_url, poll=POLL,
        ) as client:
            request = await finished_export(client, "big")
            await client.download_file(request.request_id, tmp_path / "whole.csv")
            for point in range(40):
                delay = random.Random(point).uniform(0.0, 0.06)
                started = time.monotonic()
                with anyio.move_on_after(delay):
                    await client.download_file(request.request_id, tmp_path / "big.csv")
                # The bug cost 30 s; a generous bound keeps a loaded machine from flaking.
                assert time.monotonic() - started - delay < 5, f"point {point}"
                assert threads_in_the_leg() == []
                assert sorted(p.name for p in tmp_path.iterdir()) in (
                    ["whole.csv"], ["big.csv", "whole.csv"])  # whole files only
                (tmp_path / "big.csv").unlink(missing_ok=True)


async def test_progress_flows_from_the_thread(tmp_path: pathlib.Path) -> None:
    events: list[amp.ProgressEvent] = []
    with FakeAmplitude(inline_threshold=1024, job_duration=0.05) as fake:
        fake.add_cohort("big", size=60_000)
        fake.inject("s3", "slow", delay=0.1, times=10)
        async with fake.serve() as base_url, amp.CohortsClient(
            fake.api_key, fake.secret_key, base_url=base_url, poll=POLL, download=COUNTING,
        ) as client:
            result = await client.download_cohort("big", tmp_path, on_progress=events.append)
    downloading = [e.bytes_done for e in events if e.phase == "downloading"]
    assert len(downloading) >= 3
    assert downloading == sorted(downloading)
    assert any(0 < done < result.size_bytes for done in downloading)  # during the transfer
    assert downloading[-1] == result.size_bytes
    assert result.members == 60_000  # counted in the thread as written


@pytest.mark.parametrize("cut_at", [100, 1_500_000])
async def test_a_dropped_body_resumes_with_every_byte_hashed_and_counted_once(
    tmp_path: pathlib.Path, cut_at: int
) -> None:
    """The digest thread has hashed and counted exactly what was written when the connection
    drops, so the resumed transfer's sha256 and member count are the whole file's."""
    with FakeAmplitude(inline_threshold=1024, job_duration=0.05) as fake:
        fake.add_cohort("big", size=60_000)
        fake.inject("s3", "cut", after_bytes=cut_at)
        async with fake.serve() as base_url, amp.CohortsClient(
            fake.api_key, fake.secret_key, base_url=base_url, poll=POLL, download=COUNTING,
        ) as client:
            result = await client.download_cohort("big", tmp_path)
            export = fake.export_bytes(result.request_id)
        ranges = [entry.headers.get("range") for entry in fake.requests_to("s3")]
    assert ranges == [None, f"bytes={cut_at}-"]  # resumed where the drop left it
    assert result.path.read_bytes() == export
    assert result.sha256 == hashlib.sha256(export).hexdigest()
    assert result.members == 60_000
    assert threads_in_the_leg() == []


async def test_an_untrusted_certificate_is_refused(
    tmp_path: pathlib.Path, certificate: tuple[str, str]
) -> None:
    with FakeAmplitude(inline_threshold=1024) as fake:
        fake.add_cohort("big", size=3_000)
        async with fake.serve(s3_tls=server_context(certificate)) as base_url, \
                amp.CohortsClient(fake.api_key, fake.secret_key, base_url=base_url, poll=POLL,
                                  retry=amp.RetryPolicy(max_attempts=2)) as client:
            with pytest.raises(amp.DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.download_cohort("big", tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert [e.status for e in fake.log if e.endpoint == "s3"] == []  # no request was made


async def test_a_certificate_trusted_through_the_environment_is_accepted(
    tmp_path: pathlib.Path, certificate: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])  # as httpx reads it (trust_env)
    with FakeAmplitude(inline_threshold=1024) as fake:
        fake.add_cohort("big", size=3_000)
        async with fake.serve(s3_tls=server_context(certificate)) as base_url, \
                amp.CohortsClient(fake.api_key, fake.secret_key, base_url=base_url,
                                  poll=POLL) as client:
            result = await client.download_cohort("big", tmp_path)
    assert result.size_bytes > 3_000 * 10


async def test_a_borrowed_client_keeps_its_own_verification(
    tmp_path: pathlib.Path, certificate: tuple[str, str]
) -> None:
    trusting = ssl.create_default_context(cafile=certificate[0])
    with FakeAmplitude(inline_threshold=1024) as fake:
        fake.add_cohort("big", size=3_000)
        async with fake.serve(s3_tls=server_context(certificate)) as base_url, \
                httpx.AsyncClient(verify=trusting) as borrowed, \
                amp.CohortsClient(fake.api_key, fake.secret_key, base_url=base_url,
                                  poll=POLL, http_client=borrowed) as client:
            result = await client.download_cohort("big", tmp_path)
    assert result.size_bytes > 3_000 * 10


@pytest.mark.parametrize("fail_after", [None, 0, 3, 7])
def test_the_digest_covers_exactly_what_was_submitted(fail_after: int | None) -> None:
    """Left normally or by an error, the digest thread has hashed and counted every buffer
    submitted (in order) and nothing else, and it has ended."""
    pieces = [random.Random(i).randbytes(random.Random(i).randint(1, 4096)).replace(b"\r", b"\n")
              for i in range(10)]
    submitted: list[bytes] = []
    digest = BackgroundDigest(hashlib.sha256(), size=4096, depth=2)
    with contextlib.suppress(RuntimeError), digest:
        for index, piece in enumerate(pieces):
            if index == fail_after:
                raise RuntimeError("the connection dropped")
            buffer = digest.take()
            buffer[: len(piece)] = piece
            digest.submit(buffer, len(piece))
            submitted.append(piece)
    whole = b"".join(submitted)
    assert digest.hash.hexdigest() == hashlib.sha256(whole).hexdigest()  # type: ignore[attr-defined]
    assert digest.line_breaks == whole.count(b"\n")
    assert not any(thread.name == "amp-digest" for thread in threading.enumerate())


def test_a_failing_digest_thread_fails_the_writer_instead_of_hanging_it() -> None:
    class Broken:
        def update(self, _data: object) -> None:
            raise MemoryError("no memory for the hash")

    digest = BackgroundDigest(Broken(), size=16, depth=1)

    def fill_three() -> None:
        with digest:
            for _ in range(3):  # the second take() waits for a buffer that never comes back
                buffer = digest.take()
                digest.submit(buffer, 16)

    failures: list[BaseException] = []

    def run() -> None:
        try:
            fill_three()
        except BaseException as exc:  # examined below
            failures.append(exc)

    writer = threading.Thread(target=run, daemon=True)  # a hang fails the test, not the run
    writer.start()
    writer.join(timeout=10)
    assert not writer.is_alive(), "the writer hung waiting for a buffer"
    (failure,) = failures
    assert isinstance(failure, amp.DownloadError)
    assert "digest thread failed" in str(failure)
    assert isinstance(failure.__cause__, MemoryError)
    assert not any(thread.name == "amp-digest" for thread in threading.enumerate())


@pytest.mark.parametrize("path", ["thread", "loop"])
async def test_a_corrupt_gzip_body_is_a_download_error_and_leaves_nothing(
    tmp_path: pathlib.Path, path: str
) -> None:
    """Our own gzip decoding (both ways in): zlib's error becomes a named DownloadError."""
    body = b"\x1f\x8b" + b"x" * 64
    source = io.BytesIO(body)

    async def write() -> None:
        async with AtomicFile(tmp_path / "c.csv") as file, BodySink(file) as sink:
            sink.begin("gzip")
            if path == "thread":
                await anyio.to_thread.run_sync(sink.pump, source.readinto)
            else:
                await anyio.to_thread.run_sync(sink.write_batch, [body])

    with pytest.raises(amp.DownloadError, match="corrupt gzip body"):
        await write()
    assert list(tmp_path.iterdir()) == []
