"""FileLimits where its other tests left a one-line break unnoticed: the wait for another
process switching a new file to WAL has an end."""

from __future__ import annotations

import pathlib
import sqlite3
import threading

import pytest

import amp_cohorts_async as amp
from amp_cohorts_async import _file_limits as file_limits_module

from .test_file_limits import use


async def test_a_new_file_locked_past_the_busy_timeout_is_a_named_error(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process that holds a new file's write lock and never lets go (stopped in a
    debugger, say) fails the open after the busy timeout instead of hanging it."""
    monkeypatch.setattr(file_limits_module, "_BUSY_TIMEOUT", 0.2)
    path = tmp_path / "limits.sqlite3"
    path.touch()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    # Should the wait have no end, the lock goes after 5 s so that the test ends: the open
    # then succeeds, which the assertion refuses.
    release = threading.Timer(5.0, other.execute, ("COMMIT",))
    release.start()
    try:
        with pytest.raises(amp.LimitsBackendError, match="database is locked"):
            await use(amp.FileLimits(path))
    finally:
        release.cancel()
        release.join()
        other.close()
