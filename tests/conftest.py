from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude, threads_visible_to_looptime

# Fast polling keeps virtual-time tests short; the limits stay Amplitude's real ones.
FAST_POLL = amp.PollPolicy(initial_interval=1.0, max_interval=5.0, deadline=3600.0)


def pytest_configure(config: pytest.Config) -> None:
    """A suite started as a background job of a script (``cmd &``) inherits Ctrl-C ignored, and
    every process it starts would too: the tests that Ctrl-C a child would see it run on. The
    children get Python's own Ctrl-C behaviour back, whatever the shell did."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


async def finished_export(client: amp.CohortsClient, cohort_id: str) -> amp.CohortRequest:
    """An export of ``cohort_id`` requested and, in real time, ready at the emulator."""
    request = await client.request_cohort(cohort_id)
    while not (await client.get_request_status(request.request_id)).done:
        await anyio.sleep(0.02)
    return request


@pytest.fixture(autouse=True)
def _threads_visible_to_looptime(request: pytest.FixtureRequest) -> Iterator[None]:
    """Virtual-time tests route anyio's worker threads through the loop's executor (see
    ``threads_visible_to_looptime``); every other test keeps anyio's own thread runner, so the
    production cancellation of worker threads is what those tests exercise."""
    if request.node.get_closest_marker("looptime") is None:
        yield
        return
    with threads_visible_to_looptime():
        yield


@pytest.fixture(autouse=True)
def _cache_of_its_own(tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line keeps its limits in the user's cache: one per test, never the real one
    (a test's requests would otherwise hold the next test's windows)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def fake() -> Iterator[FakeAmplitude]:
    with FakeAmplitude(job_duration=10.0, seed=1) as fake:
        fake.add_cohort("small", size=25, properties=("city", "plan"))
        fake.add_cohort("large", size=20_000)
        yield fake


@pytest.fixture
async def client(fake: FakeAmplitude) -> AsyncIterator[amp.CohortsClient]:
    async with amp.CohortsClient(
        fake.api_key, fake.secret_key, transport=fake.transport(), poll=FAST_POLL, seed=7
    ) as client:
        yield client


@pytest.fixture
async def served(fake: FakeAmplitude) -> AsyncIterator[tuple[FakeAmplitude, str]]:
    """The emulator over loopback sockets (jobs of 0.2 s), for subprocesses to reach."""
    fake.job_duration = 0.2
    async with fake.serve() as base_url:
        yield fake, base_url


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[object]:
    """Give sync tests a loop that we close.

    looptime's hook asks the event-loop policy for a loop even around sync tests, which makes
    the policy create one that nobody closes (a ResourceWarning, an error under our filters).
    """
    if pyfuncitem.get_closest_marker("asyncio") is not None:  # pytest-asyncio runs it
        return (yield)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return (yield)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


# -- a real redis-server for the shared-limits tests -------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _redis_binary(name: str = "redis-server", package: str = "redis-server") -> str:
    """The path of a Redis program; skips the test without it, except where AMP_REQUIRE_REDIS
    is set (CI): there it fails, so a missing server can never pass as green."""
    binary = shutil.which(name)
    if binary is None:
        message = f"{name} is not installed (apt-get install {package})"
        if os.environ.get("AMP_REQUIRE_REDIS"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def _wait_for_port(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)


class RedisServer:
    """A redis-server on a loopback port of its own, without persistence: ``stop()`` then
    ``start()`` is a restart that loses every key, as a production Redis without persistence
    does."""

    def __init__(self, *extra: str) -> None:
        self.binary = _redis_binary()
        self.port = _free_port()
        self.extra = extra
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "yes", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, self._process)

    def stop(self) -> None:
        """Kill it (SIGKILL: no goodbye to the clients) and wait until it is gone."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(10)
            self._process = None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis to test against: AMP_TEST_REDIS_URL, or a redis-server started for the run."""
    if url := os.environ.get("AMP_TEST_REDIS_URL"):
        yield url
        return
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may kill and start again."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _free_cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free too."""
    for _ in range(100):
        port = _free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    pytest.fail("no free port pair for a cluster node")


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis Cluster of 3 masters on loopback, made for the run with redis-cli; the URL of
    one node (the cluster client finds the others)."""
    binary = _redis_binary()
    cli = _redis_binary("redis-cli", "redis-tools")
    directory = tmp_path_factory.mktemp("cluster")
    ports = [_free_cluster_port() for _ in range(3)]
    nodes = [subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", f"nodes-{port}.conf", "--dir", str(directory), "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in ports]
    try:
        for port, node in zip(ports, nodes, strict=True):
            _wait_for_port(port, node)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in subprocess.run(
                [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True,
                timeout=10).stdout for port in ports):
            if time.monotonic() > deadline:
                pytest.fail("the Redis Cluster did not come up")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for node in nodes:
            node.kill()
            node.wait(10)
