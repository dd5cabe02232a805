"""The pytest plugin of amp_cohorts_async (registered through the ``pytest11`` entry point).

Fixture ``fake_amplitude``: a ``FakeAmplitude`` emulator with a ``CohortsClient`` bound to it
in-process, so a test of your own code is three lines::

    async def test_export(fake_amplitude, tmp_path):
        fake_amplitude.fake.add_cohort("c1", size=100)
        result = await fake_amplitude.client.download_cohort("c1", tmp_path)
        assert len([row async for row in amp.iter_members(result.path)]) == 100

Async tests need pytest-asyncio (or anyio's plugin). With pytest-asyncio and looptime
installed (``pip install 'amp-cohorts-async[testing]'``), tests using the fixture run in
virtual time: rate-window waits and export jobs take no real time. The fixture is
synchronous, so any async test plugin can use it.

Set the emulator up with the ``fake_amplitude`` marker (or ``indirect`` parametrisation with
a dict): any ``FakeAmplitude`` argument, e.g. ``usage`` (cohort requests already spent this
month), ``limits`` (the client obeys the same), ``job_duration`` (seconds, a range, or a
callable), ``latency``, ``gzip``; and ``cohorts``, a mapping of ids to sizes to add::

    @pytest.mark.fake_amplitude(usage=499, job_duration=(5, 60), cohorts={"c1": 100})
    async def test_the_last_request_of_the_month(fake_amplitude):
        ...
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fake_amplitude(**options): set up the fake_amplitude fixture's emulator "
        "(FakeAmplitude arguments such as usage, limits, job_duration; cohorts={id: size})")


@pytest.fixture
def fake_amplitude(request: pytest.FixtureRequest) -> Iterator[FakeAmplitudeFixture]:
    """A FakeAmplitude (jobs take 10 s unless set) and a CohortsClient on its in-process
    transport, obeying the emulator's limits."""
    if importlib.util.find_spec("looptime") is not None:
        # looptime's own plugin reads the marker when the test is called.
        request.node.add_marker(pytest.mark.looptime)
    marker = request.node.get_closest_marker("fake_amplitude")
    options: dict[str, Any] = {"job_duration": 10.0, **(marker.kwargs if marker else {}),
                               **getattr(request, "param", {})}
    cohorts: dict[str, int] = options.pop("cohorts", {})
    with FakeAmplitude(**options) as fake, threads_visible_to_looptime():
        for cohort_id, size in cohorts.items():
            fake.add_cohort(cohort_id, size=size)
        client = CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                               limits=fake.limits,
                               poll=PollPolicy(initial_interval=1.0, max_interval=5.0))
        yield FakeAmplitudeFixture(fake, client)
