"""Virtual time (looptime) for tests, benchmarks and scripts.

looptime fast-forwards the loop clock whenever nothing is ready to run. It knows about threads
started through ``loop.run_in_executor`` and waits for them, but anyio's worker threads are
invisible to it: while a file write runs in an anyio thread, the clock could jump to the next
timer (a timeout, a rate window) and fire it early. ``threads_visible_to_looptime`` routes
``anyio.to_thread.run_sync`` through the loop's executor for the duration, so thread work takes
zero virtual time, as it should.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")

__all__ = ("run_in_virtual_time", "threads_visible_to_looptime")


async def _run_sync_in_loop_executor(
    func: Callable[..., T], *args: Any, abandon_on_cancel: bool = False, **_options: Any
) -> T:
    """anyio's semantics on the loop's executor: a call that may not be abandoned is waited
    for even when the caller is cancelled (the cancellation arrives once it is over), so
    nothing runs on in a thread after its caller has cleaned up."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, functools.partial(func, *args))
    if abandon_on_cancel:
        return await future
    with anyio.CancelScope(shield=True):
        result = await future
    return result


@contextlib.contextmanager
def threads_visible_to_looptime() -> Iterator[None]:
    original = anyio.to_thread.run_sync
    anyio.to_thread.run_sync = _run_sync_in_loop_executor  # type: ignore[assignment]
    try:
        yield
    finally:
        anyio.to_thread.run_sync = original


def run_in_virtual_time(main: Callable[[], Awaitable[T]], **options: Any) -> T:
    """``asyncio.run(main())`` on a loop whose clock jumps over idle time (needs looptime).

    An hour of rate-limit waiting takes well under a second of real time; work done in
    worker threads takes zero virtual time.
    """
    import looptime  # an optional dependency: only virtual-time users need it

    loop = looptime.new_event_loop(**options)  # created with virtual time on
    try:
        with threads_visible_to_looptime():
            return loop.run_until_complete(_call(main))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


async def _call(main: Callable[[], Awaitable[T]]) -> T:
    return await main()
