"""A helper task that runs alongside a block and stops with it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import anyio

__all__ = ("alongside",)


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
