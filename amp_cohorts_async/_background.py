"""Work beside the caller: a helper task alongside a block; a thread that stops when asked;
a task group's one error."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio

from ._exceptions import AmplitudeError

__all__ = ("alongside", "run_stoppable", "single_error")

T = TypeVar("T")


@asynccontextmanager
async def alongside(helper: Callable[[], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """Run ``helper()`` (a loop: renewing leases, reporting progress) while the block runs.

    The block's own exception reaches the caller as itself, not wrapped in an exception group
    (the helper, cancelled, adds nothing to it).
    """
    failure: BaseException | None = None
    async with anyio.create_task_group() as group:
        group.start_soon(helper)
        try:
            yield
        except BaseException as exc:
            failure = exc
        finally:
            group.cancel_scope.cancel()
    if failure is not None:
        raise failure


class _Stopped(Exception):
    """The caller was cancelled: the thread's work ends at its next check."""


async def run_stoppable(work: Callable[[Callable[[], None]], T]) -> T:
    """``work(check)`` in a worker thread, where ``check()`` raises once the caller is cancelled.

    Cancelled, the caller waits (shielded) until the thread has seen the check and cleaned up
    after itself, so nothing the thread writes outlives the call.
    """
    stop = threading.Event()
    finished = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise _Stopped

    def tracked() -> T:
        try:
            return work(check)
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(tracked, abandon_on_cancel=True)
    except BaseException:
        stop.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(finished.wait)
        raise


def single_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error a task group's exception group stands for, to raise as itself.

    A library error first (the others are the cancellations it caused), else the first error.
    No caller of a public coroutine should have to unwrap an exception group.
    """
    flat: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            flat.append(error)
    for error in flat:
        if isinstance(error, AmplitudeError):
            return error
    return flat[0]
