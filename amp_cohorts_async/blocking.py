"""The blocking client: the async client's methods without ``await``, for scripts and notebooks.

    from amp_cohorts_async.blocking import CohortsClient, iter_members
    with CohortsClient() as client:                  # same arguments and methods, no await
        client.download_cohorts(ids, "exports/")

Each blocking client owns one event loop in a background thread, and each call runs the async
client's coroutine of the same name there, so a batch keeps its concurrency and its limits
and nothing is implemented twice. ``iter_members``, ``iter_member_batches`` and
``iter_arrow_batches`` are plain generators over the async ones, and ``diff_members`` a plain
function (each on a loop of its own while it runs).

Progress callbacks (``on_progress``) are called on the loop's thread. Ctrl-C while a call
waits cancels that call on the loop (a download leaves no partial file) before the
``KeyboardInterrupt`` reaches the caller. Called from inside a running event loop, every
entry point raises ``RuntimeError``: there, ``await`` the async client instead.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from os import PathLike
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, Self, TypeVar, overload

import anyio
from anyio.from_thread import BlockingPortal

from ._arrow import iter_arrow_batches as _iter_arrow_batches
from ._client import CohortsClient as AsyncCohortsClient
from ._config import DownloadPolicy, Limits, PollPolicy, RetryPolicy
from ._diff import diff_members as _diff_members
from ._members import MemberBatch
from ._members import iter_member_batches as _iter_member_batches
from ._members import iter_members as _iter_members
from ._scheduler import Scheduler

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ("CohortsClient", "diff_members", "iter_arrow_batches", "iter_member_batches",
           "iter_members")

P = ParamSpec("P")
T = TypeVar("T")
# Rows handed over per trip between the loop thread and the caller: a trip costs tens of
# microseconds, a row a few, so one trip per row would triple the cost of reading a file.
_ROWS_PER_TRIP = 512


def _refuse_inside_a_running_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"amp_cohorts_async.blocking.{what} was called inside a running event loop, which it "
        "would block; there, use the async client: `async with amp_cohorts_async."
        "CohortsClient(...) as client: await client.<method>(...)`"
    )


class _LoopThread:
    """One event loop in a daemon thread, and a way to run coroutines on it from outside."""

    def __init__(self) -> None:
        self._portal: BlockingPortal | None = None
        started = threading.Event()
        # Daemon: a client never closed must not keep the interpreter from exiting.
        self._thread = threading.Thread(target=anyio.run, args=(self._serve, started),
                                        name="amp-cohorts-blocking", daemon=True)
        self._thread.start()
        started.wait()

    async def _serve(self, started: threading.Event) -> None:
        async with BlockingPortal() as portal:
            self._portal = portal
            started.set()
            await portal.sleep_until_stopped()

    def run(self, function: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """``await function(*args, **kwargs)`` on the loop; the caller's thread waits for it.

        Interrupted while waiting (Ctrl-C), the call is cancelled on the loop and awaited to
        its end, so its clean-up (temp files, connections) has run when the interrupt goes on.
        """
        portal = self._portal
        if portal is None:
            raise RuntimeError("the blocking client is closed; create a new one")
        finished = threading.Event()

        async def guarded() -> T:
            try:
                return await function(*args, **kwargs)
            finally:
                finished.set()

        future: Future[T] = portal.start_task_soon(guarded)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                future.cancel()
                finished.wait()
            raise

    def stop(self) -> None:
        portal, self._portal = self._portal, None
        if portal is None:
            return
        portal.call(portal.stop, True)
        self._thread.join()


class _Blocking(Generic[P, T]):
    """A method of the blocking client that runs the async client's method on the loop."""

    def __init__(
        self, method: Callable[Concatenate[AsyncCohortsClient, P], Coroutine[Any, Any, T]]
    ) -> None:
        self._method = method
        self.__doc__ = method.__doc__

    def __set_name__(self, owner: type[Any], name: str) -> None:
        if name != self._method.__name__:
            raise TypeError(f"{owner.__name__}.{name} would run {self._method.__name__}")

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, instance: CohortsClient, owner: type[Any]) -> Callable[P, T]: ...

    def __get__(self, instance: CohortsClient | None, owner: type[Any]) -> Self | Callable[P, T]:
        if instance is None:
            return self
        method = self._method

        @functools.wraps(method)
        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            _refuse_inside_a_running_loop(f"CohortsClient.{method.__name__}")
            return instance._loop.run(method, instance.async_client, *args, **kwargs)

        return call


def _same_arguments_as(
    _source: Callable[P, object],
) -> Callable[[Callable[..., None]], Callable[Concatenate[Any, P], None]]:
    """Give the decorated ``__init__`` the (typed) parameters of ``_source``."""
    def apply(init: Callable[..., None]) -> Callable[Concatenate[Any, P], None]:
        return init

    return apply


class CohortsClient:
    """The blocking twin of ``amp_cohorts_async.CohortsClient``: same arguments, same methods,
    each call returning what the coroutine returns. Use it in a ``with`` block, or ``close()``.

    ``async_client`` is the client every call runs on (its ``scheduler`` included).
    """

    @_same_arguments_as(AsyncCohortsClient)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse_inside_a_running_loop("CohortsClient")
        self._loop = _LoopThread()
        try:
            # Built and opened on the loop: anything loop-bound it creates belongs there.
            self.async_client: AsyncCohortsClient = self._loop.run(_opened, *args, **kwargs)
        except BaseException:
            self._loop.stop()
            raise
        self.limits: Limits = self.async_client.limits
        self.retry: RetryPolicy = self.async_client.retry
        self.poll: PollPolicy = self.async_client.poll
        self.download: DownloadPolicy = self.async_client.download

    def __repr__(self) -> str:
        return f"blocking.{self.async_client!r}"

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler that grants the client's permits (for inspection)."""
        return self.async_client.scheduler

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the async client and stop the loop thread (a second call does nothing)."""
        if self._loop._portal is None:
            return
        try:
            self._loop.run(self.async_client.aclose)
        finally:
            self._loop.stop()

    list_cohorts = _Blocking(AsyncCohortsClient.list_cohorts)
    get_cohort = _Blocking(AsyncCohortsClient.get_cohort)
    request_cohort = _Blocking(AsyncCohortsClient.request_cohort)
    get_request_status = _Blocking(AsyncCohortsClient.get_request_status)
    get_usage = _Blocking(AsyncCohortsClient.get_usage)
    download_file = _Blocking(AsyncCohortsClient.download_file)
    upload_cohort = _Blocking(AsyncCohortsClient.upload_cohort)
    update_membership = _Blocking(AsyncCohortsClient.update_membership)
    download_cohort = _Blocking(AsyncCohortsClient.download_cohort)
    download_cohorts = _Blocking(AsyncCohortsClient.download_cohorts)
    sync_cohorts = _Blocking(AsyncCohortsClient.sync_cohorts)
    apply_diff = _Blocking(AsyncCohortsClient.apply_diff)


async def _opened(*args: Any, **kwargs: Any) -> AsyncCohortsClient:
    return await AsyncCohortsClient(*args, **kwargs).__aenter__()


# -- functions of the package -------------------------------------------------------------------

def _blocking_function(
    function: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, T]:
    """``function`` without await: each call runs it on a loop of its own, then stops it."""

    @functools.wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        _refuse_inside_a_running_loop(function.__name__)
        loop = _LoopThread()
        try:
            return loop.run(function, *args, **kwargs)
        finally:
            loop.stop()

    return call


diff_members = _blocking_function(_diff_members)


# -- reading files ------------------------------------------------------------------------------

def _blocking_iter(items: AsyncIterator[T], per_trip: int) -> Iterator[T]:
    """Iterate ``items`` on a loop of its own, ``per_trip`` items per hand-over."""
    loop = _LoopThread()

    async def next_items() -> list[T]:
        taken: list[T] = []
        async for item in items:
            taken.append(item)
            if len(taken) >= per_trip:
                break
        return taken

    try:
        while chunk := loop.run(next_items):
            yield from chunk
    finally:
        try:
            loop.run(items.aclose)  # type: ignore[attr-defined]  # an async generator
        finally:
            loop.stop()


def iter_members(path: str | PathLike[str]) -> Iterator[dict[str, str]]:
    """The rows of a downloaded cohort file as dicts keyed by the header (a generator)."""
    _refuse_inside_a_running_loop("iter_members")
    return _blocking_iter(_iter_members(path), _ROWS_PER_TRIP)


def iter_arrow_batches(
    path: str | PathLike[str], *, batch_rows: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """A downloaded cohort file as ``pyarrow.RecordBatch`` es (a generator; ``arrow`` extra)."""
    _refuse_inside_a_running_loop("iter_arrow_batches")
    return _blocking_iter(_iter_arrow_batches(path, batch_rows=batch_rows), 1)


def iter_member_batches(
    path: str | PathLike[str], *, batch_rows: int = 512
) -> Iterator[MemberBatch]:
    """A downloaded cohort file in batches of up to ``batch_rows`` members (a generator)."""
    _refuse_inside_a_running_loop("iter_member_batches")
    return _blocking_iter(_iter_member_batches(path, batch_rows=batch_rows), 1)
