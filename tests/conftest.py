from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude, threads_visible_to_looptime

# Fast polling keeps virtual-time tests short; the limits stay Amplitude's real ones.
FAST_POLL = amp.PollPolicy(initial_interval=1.0, max_interval=5.0, deadline=3600.0)


@pytest.fixture(autouse=True)
def _threads_visible_to_looptime() -> Iterator[None]:
    with threads_visible_to_looptime():
        yield


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
