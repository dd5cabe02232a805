"""The virtual-time helper keeps anyio's thread semantics: it only changes where threads run."""

from __future__ import annotations

import threading
import time

import anyio
import pytest


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
