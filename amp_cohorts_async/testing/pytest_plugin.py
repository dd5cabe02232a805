"""The pytest plugin of amp_cohorts_async (registered through the ``pytest11`` entry point).

Fixture ``fake_amplitude``: a ``FakeAmplitude`` emulator with a ``CohortsClient`` bound to it
in-process, so a test of your own code is three lines::

    async def test_export(fake_amplitude, tmp_path):
        fake_amplitude.fake.add_cohort("c1", size=100)
        result = await fake_amplitude.client.download_cohort("c1", tmp_path)
        assert len([row async for row in amp.iter_members(result.path)]) == 100

Async tests need pytest-asyncio (or anyio's plugin). With pytest-asyncio and looptime
installed, tests using the fixture run in virtual time: rate-window waits and export jobs
take no real time. The fixture is synchronous, so any async test plugin can use it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import attrs
import pytest

from .._client import CohortsClient
from .._config import PollPolicy
from ._fake import FakeAmplitude
from ._virtual import threads_visible_to_looptime

__all__ = ("FakeAmplitudeFixture", "fake_amplitude")


@attrs.frozen
class FakeAmplitudeFixture:
    """What ``fake_amplitude`` gives a test: the emulator and a client bound to it."""

    fake: FakeAmplitude
    client: CohortsClient


@pytest.fixture
def fake_amplitude(request: pytest.FixtureRequest) -> Iterator[FakeAmplitudeFixture]:
    """A FakeAmplitude (jobs take 10 s) and a CohortsClient on its in-process transport."""
    if importlib.util.find_spec("looptime") is not None:
        # looptime's own plugin reads the marker when the test is called.
        request.node.add_marker(pytest.mark.looptime)
    with FakeAmplitude(job_duration=10.0) as fake, threads_visible_to_looptime():
        client = CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                               poll=PollPolicy(initial_interval=1.0, max_interval=5.0))
        yield FakeAmplitudeFixture(fake, client)
