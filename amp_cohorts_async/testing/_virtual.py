"""Run a coroutine under virtual time (looptime), outside pytest: for benchmarks and scripts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ("run_in_virtual_time",)


def run_in_virtual_time(main: Callable[[], Awaitable[T]], **options: Any) -> T:
    """``asyncio.run(main())`` on a loop whose clock jumps over idle time (needs looptime).

    An hour of rate-limit waiting takes well under a second of real time; work done in
    worker threads and socket I/O takes zero virtual time.
    """
    import looptime  # an optional dependency: only virtual-time users need it

    loop = looptime.new_event_loop(**options)  # created with virtual time on
    try:
        return loop.run_until_complete(_call(main))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


async def _call(main: Callable[[], Awaitable[T]]) -> T:
    return await main()
