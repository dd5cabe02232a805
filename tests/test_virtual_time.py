"""The virtual-time helper keeps anyio's thread semantics: it only changes where threads run."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

import amp_cohorts_async as amp
from amp_cohorts_async.testing import FakeAmplitude


@pytest.mark.looptime
@pytest.mark.parametrize("abandon", [False, True])
async def test_a_cancelled_caller_waits_for_its_thread_unless_it_may_abandon_it(
    abandon: bool,
) -> None:
    """Without the wait, a cancelled download's cleanup raced the write still running in the
    executor, and a writer blocked on a digest thread that had ended hung the loop's close."""
    started, finished = threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        time.sleep(0.2)
        finished.set()

    async def caller() -> None:
        await anyio.to_thread.run_sync(work, abandon_on_cancel=abandon)

    async with anyio.create_task_group() as group:
        group.start_soon(caller)
        while not started.is_set():
            await anyio.sleep(0.001)
        group.cancel_scope.cancel()
    assert finished.is_set() is not abandon
    finished.wait(1)  # nothing left running after the test


@pytest.mark.looptime
@pytest.mark.timeout(10)  # a spin never awaits, so only a signal can end it
async def test_a_pause_with_less_than_a_millisecond_left_is_not_a_busy_loop() -> None:
    """The pause ends within a millisecond of its end; the loop that waits it out must stop
    there too. It went on while less than a millisecond was left, without ever awaiting, so
    in virtual time the clock never moved and the loop spun forever (a full-suite hang)."""
    with FakeAmplitude() as fake:
        async with amp.CohortsClient(fake.api_key, fake.secret_key,
                                     transport=fake.transport()) as client:
            client.scheduler.paused_until = anyio.current_time() + 0.0005
            usage = await client.get_usage()
    assert usage.remaining >= 0


@pytest.mark.looptime
@pytest.mark.timeout(10)  # a spin never awaits, so only a signal can end it
async def test_a_backend_pause_with_less_than_a_millisecond_left_is_not_a_busy_loop() -> None:
    """The same through the backend: a shared pause another client set (here, set on the
    backend alone) that has under a millisecond left when a grant is asked. The grant loop
    slept it out with a sleep that returned at once, asked again, and spun: the clock never
    moved (a 300 s test timeout under load)."""
    backend = amp.InMemoryLimits()
    with FakeAmplitude() as fake:
        async with amp.CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport(),
                                     limits_backend=backend) as client:
            await backend.pause(0.0005)
            usage = await client.get_usage()
    assert usage.remaining >= 0
