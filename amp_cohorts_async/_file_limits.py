"""FileLimits: one Amplitude app's limits shared by every process on one host, in one file.

The state ``RedisLimits`` keeps on a server lives here in a SQLite database (stdlib
``sqlite3``, WAL mode). Every operation is one ``BEGIN IMMEDIATE`` transaction: SQLite's write
lock makes it atomic across processes, and the clock is read only once the lock is held, so
decisions are ordered as the transactions are. The blocking calls run in a worker thread, never
on the event loop.

Why SQLite rather than a lock file around a JSON document: a transaction is crash-safe (a
process killed mid-write leaves the previous state, not a torn file), WAL lets readers proceed
during a write, the busy timeout makes a writer wait its turn (up to 10 s), and it runs the same on
Linux, macOS and Windows. Measured (``benchmarks/distributed.py``): an acquire + release costs
~0.35 ms at the median, less than RedisLimits on loopback; the same two operations as flock +
JSON rewrites (crash-safe: temp file + rename) cost 3.8-4.6x as much (11.9x in one run on a
busier machine).

The host clock (``time.time()``) is the one clock: windows, leases, the 429 pause and the UTC
quota month all use it, so a run started after another sees the requests the previous one made
(Ctrl-C, then ``--resume``, does not draw a 429). Leases carry a TTL and are renewed while held,
so the slots of a killed process come back within ``lease_ttl``; its cohort requests in flight
count as answered when their lease ran out.

A file deleted or replaced while in use (a cleared cache) is a state loss, as a Redis flush
is: each process notices at its next call (the inode at the path changed), counts it in
``state_losses``, logs a WARNING and moves to the new file, where no new cohort request is
granted for the longest window and no new slot for one ``lease_ttl``, while the holders
re-assert their leases there.

The default file is one per app in the user's cache directory (``$XDG_CACHE_HOME`` or
``~/.cache``), named by the hash of the API key the client derives, never the key. SQLite's
locking needs a local file system: do not put the file on NFS.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Self, TypeVar

import anyio.to_thread

from ._config import Limits
from ._exceptions import InvalidRequestError, QuotaExceededError
from ._limits import (
    WINDOW_EDGE,
    LimitsBackendError,
    Permit,
    PermitRequest,
    PermitWait,
    ReleaseSignal,
    Settlement,
    SlidingWindowLog,
    checked_lease_ttl,
    utc_month,
)

__all__ = ("FileLimits", "default_limits_path")

logger = logging.getLogger("amp_cohorts_async")

T = TypeVar("T")

# 'AmpC': marks the database as ours, so another program's SQLite file is never written to.
_APPLICATION_ID = 0x416D7043
_SCHEMA_VERSION = 1
_BUSY_TIMEOUT = 10.0  # seconds a transaction queues behind other processes before failing
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE slots (token TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE in_flight (token TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE answered (token TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX answered_at ON answered (at);
CREATE TABLE pause (one INTEGER PRIMARY KEY CHECK (one = 1), until REAL NOT NULL);
CREATE TABLE quota (month TEXT PRIMARY KEY, used INTEGER NOT NULL) WITHOUT ROWID;
"""


def default_limits_path(app: str) -> pathlib.Path:
    """Where FileLimits keeps ``app``'s limits unless told: the user's cache directory."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = pathlib.Path(cache) if os.path.isabs(cache) else pathlib.Path.home() / ".cache"
    return base / "amp-cohorts-async" / f"limits-{app}.sqlite3"


def _month_at(now: float) -> str:
    return utc_month(datetime.fromtimestamp(now, UTC))


class FileLimits:
    """Shared limits for the processes of one host, kept in one file; see the module docs.

    ``path``: the database file (default: one per app in the user's cache directory).
    ``lease_ttl``: seconds a permit lives unless renewed; a killed process's slots come back
    after it. Close with ``await limits.aclose()`` (or ``async with``).
    """

    #: How soon a waiter asks again for a slot or window freed in another process.
    recheck: float | None = 0.05
    #: The file's state is not lost while the file lives (see ``amp.LimitsBackend``).
    state_losses: int = 0

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 lease_ttl: float = 30.0) -> None:
        if path is not None and not isinstance(path, str | os.PathLike):
            raise InvalidRequestError(f"path must be a file path or None, got {path!r}")
        self.lease_ttl: float | None = checked_lease_ttl(lease_ttl)
        self._given_path = None if path is None else pathlib.Path(os.fspath(path))
        if self._given_path is not None:
            _require_regular_or_missing(self._given_path, InvalidRequestError)
        self._path: pathlib.Path | None = self._given_path
        self._limits: Limits | None = None
        self._app: str | None = None
        self._longest = 0.0
        self._connection: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the open file
        self._lock = threading.Lock()  # one transaction at a time on the one connection
        self._released = ReleaseSignal()
        self._reported: set[str] = set()
        self._live: set[str] = set()  # granted here and not released yet
        self._from_before_loss: set[str] = set()
        self._losses_found = 0  # counted by the worker thread, taken up by ``_run``
        self._loss_in_this_transaction = False

    @property
    def path(self) -> pathlib.Path | None:
        """The database file (``None`` until a client binds a default one)."""
        return self._path

    def __repr__(self) -> str:
        return f"FileLimits(path={str(self._path) if self._path else None!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self._close)

    def _close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # -- binding ------------------------------------------------------------------------
    def bind(self, limits: Limits, app: str) -> None:
        if self._limits is not None:
            if self._limits != limits or self._app != app:
                raise InvalidRequestError(
                    "this FileLimits already serves another app or other Limits; "
                    "create one per app"
                )
            return
        self._limits = limits
        self._app = app
        self._longest = max((w.seconds for w in limits.cohort_requests), default=0.0)
        if self._path is None:
            self._path = default_limits_path(app)

    # -- the database -------------------------------------------------------------------
    async def _run(self, work: Callable[[sqlite3.Connection, float], T]) -> T:
        """``work(connection, now)`` as one write transaction, in a worker thread."""
        result = await anyio.to_thread.run_sync(self._transaction, work)
        if self._losses_found > self.state_losses:
            self.state_losses = self._losses_found
            # What this process held lives on only in its own memory: its holders re-assert
            # it (renew), and it is neither reported lost nor refunded into the new count.
            self._from_before_loss |= self._live
            logger.warning(
                "the shared limits file %s was deleted or replaced while in use: no new cohort "
                "request for %.0f s, no new slot for %.0f s", self._path, self._longest,
                self._ttl())
        return result

    def _transaction(self, work: Callable[[sqlite3.Connection, float], T]) -> T:
        with self._lock:
            try:
                connection = self._current_connection()
                connection.execute("BEGIN IMMEDIATE")
                try:
                    # Read after the write lock is held: decisions are ordered as transactions.
                    result = work(connection, time.time())
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise self._error(exc) from None
            except OSError as exc:
                raise LimitsBackendError(
                    f"the shared limits file {self._path} cannot be used: "
                    f"{exc.strerror or exc}; nothing was sent"
                ) from None

    def _error(self, exc: sqlite3.Error) -> LimitsBackendError:
        name = getattr(exc, "sqlite_errorname", "")
        if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            return LimitsBackendError(
                f"the shared limits file {self._path} is not a limits database (corrupt, or "
                f"another program's file): delete it to start afresh; nothing was sent"
            )
        return LimitsBackendError(
            f"the shared limits file {self._path} failed: {exc}; nothing was sent (the client "
            f"never falls back to per-process limits)"
        )

    def _current_connection(self) -> sqlite3.Connection:
        """The connection to the file at the path now; a new file there is a state loss."""
        self._loss_in_this_transaction = False
        if self._connection is None:
            return self._open()
        if _identity(self._path) == self._identity:
            return self._connection
        # Deleted or replaced (a cleared cache): the others now share a new file that knows
        # nothing of what was granted before, so it must wait as after a Redis flush.
        self._connection.close()
        self._connection = None
        connection = self._open()
        now = time.time()
        connection.execute("BEGIN IMMEDIATE")
        for key, until in (("cohorts_held_until", now + self._longest + WINDOW_EDGE),
                           ("slots_held_until", now + self._ttl())):
            connection.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                "max(CAST(value AS REAL), CAST(excluded.value AS REAL))", (key, until))
        connection.execute("COMMIT")
        self._losses_found += 1
        self._loss_in_this_transaction = True
        return connection

    def _open(self) -> sqlite3.Connection:
        path = self._path
        if path is None or self._limits is None:
            raise RuntimeError("FileLimits is not bound to a client yet")
        _require_regular_or_missing(path, LimitsBackendError)
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        connection = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None,
                                     check_same_thread=False)
        try:
            _enter_wal_mode(connection)
            # In WAL mode NORMAL survives a killed process; only a power cut may lose the
            # last transactions, which costs at worst a 429.
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute("BEGIN IMMEDIATE")
            try:
                self._prepare(connection)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        self._identity = _identity(path)
        return connection

    def _prepare(self, connection: sqlite3.Connection) -> None:
        """Create the schema in a new file; refuse a file that is not ours or not this app's."""
        application_id = connection.execute("PRAGMA application_id").fetchone()[0]
        if application_id == 0:
            if connection.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                raise sqlite3.DatabaseError("not a limits database")
            # One statement at a time: executescript() would commit the open transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            connection.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            connection.execute("INSERT INTO meta VALUES ('app', ?)", (self._app,))
            connection.execute(_WRITERS)
            return
        if application_id != _APPLICATION_ID:
            raise sqlite3.DatabaseError("not a limits database")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version != _SCHEMA_VERSION:
            raise LimitsBackendError(
                f"the shared limits file {self._path} has format {version}, this version "
                f"reads {_SCHEMA_VERSION}: delete it to start afresh"
            )
        row = connection.execute("SELECT value FROM meta WHERE key = 'app'").fetchone()
        if row is None or row[0] != self._app:
            raise LimitsBackendError(
                f"the shared limits file {self._path} holds another app's limits; give each "
                f"app its own file"
            )
        # Once at open rather than in every lease operation: DDL in the hot path would change
        # the schema under the other processes' cached statements each time a file is new.
        connection.execute(_WRITERS)

    def _expire_leases(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("DELETE FROM slots WHERE expires <= ?", (now,))
        # A cohort request whose holder died counts as answered when its lease ran out.
        db.execute("INSERT OR REPLACE INTO answered SELECT token, expires FROM in_flight "
                   "WHERE expires <= ?", (now,))
        db.execute("DELETE FROM in_flight WHERE expires <= ?", (now,))

    # -- the protocol -------------------------------------------------------------------
    async def acquire(self, request: PermitRequest) -> Permit | PermitWait:
        limits = self._limits
        if limits is None:
            raise RuntimeError("FileLimits is not bound to a client yet")
        token = secrets.token_hex(8)

        def grant(db: sqlite3.Connection, now: float) -> Permit | PermitWait:
            self._expire_leases(db, now)
            db.execute("DELETE FROM answered WHERE at <= ?",
                       (now - self._longest - WINDOW_EDGE,))
            holds = dict(db.execute("SELECT key, CAST(value AS REAL) FROM meta WHERE key IN "
                                    "('slots_held_until', 'cohorts_held_until')").fetchall())
            if request.slot:
                paused = db.execute("SELECT until FROM pause").fetchone()
                if paused is not None and paused[0] > now:
                    return PermitWait(paused[0] - now, "pause")
                if (held := holds.get("slots_held_until", 0.0) - now) > 0:
                    return PermitWait(held, "slots")
                if _count(db, "slots") >= limits.max_concurrent_requests:
                    return PermitWait(math.inf, "slots")
            month = _month_at(now) if request.cohort else ""
            if request.cohort:
                used = _quota(db, month)
                if request.quota is not None and used + 1 > request.quota:
                    raise QuotaExceededError(
                        f"monthly cohort-request quota reached: {used} of {request.quota} "
                        f"used in {month} (shared in {self._path})"
                    )
                wait = max(self._window_wait(db, now, limits),
                           holds.get("cohorts_held_until", 0.0) - now)
                if wait > 0:
                    return PermitWait(wait, "window")
            expires = now + self._ttl()
            if request.slot:
                db.execute("INSERT INTO slots VALUES (?, ?)", (token, expires))
            if request.cohort:
                db.execute("INSERT INTO quota VALUES (?, 1) ON CONFLICT (month) "
                           "DO UPDATE SET used = used + 1", (month,))
                db.execute("INSERT INTO in_flight VALUES (?, ?)", (token, expires))
            return Permit(token, request.slot, request.cohort, month)

        result = await self._run(grant)
        if isinstance(result, Permit):
            self._live.add(result.token)
        return result

    def _window_wait(self, db: sqlite3.Connection, now: float, limits: Limits) -> float:
        stamps = [at for (at,) in db.execute("SELECT at FROM answered ORDER BY at")]
        flying = _count(db, "in_flight")
        wait = 0.0
        for window in limits.cohort_requests:
            log = SlidingWindowLog(window)
            log.stamps.extend(stamps)
            log.in_flight = flying
            wait = max(wait, log.wait_time(now))
        return wait

    def _ttl(self) -> float:
        assert self.lease_ttl is not None
        return self.lease_ttl

    async def release(self, permits: Sequence[Permit], settlement: Settlement | None) -> int:
        stamp = settlement is not None and settlement.stamp
        refund = settlement is not None and settlement.refund

        def give_back(db: sqlite3.Connection, now: float) -> list[str]:
            lost = []
            for permit in permits:
                before_loss = (self._loss_in_this_transaction
                               or permit.token in self._from_before_loss)
                if permit.slot and not _delete(db, "slots", permit.token):
                    lost.append(permit.token)
                if permit.cohort:
                    if not _delete(db, "in_flight", permit.token):
                        lost.append(permit.token)
                    # Stamped now, a little after its answer arrived: on the safe side.
                    if stamp:
                        db.execute("INSERT OR REPLACE INTO answered VALUES (?, ?)",
                                   (permit.token, now))
                    else:
                        _delete(db, "answered", permit.token)
                    if refund and not before_loss:  # its unit is not in the count after a loss
                        db.execute("UPDATE quota SET used = max(used - 1, 0) WHERE month = ?",
                                   (permit.month,))
            return lost

        lost = self._newly_lost(await self._run(give_back))
        self._released.fire()
        tokens = {p.token for p in permits}
        self._reported -= tokens
        self._live -= tokens
        self._from_before_loss -= tokens
        return len(lost)

    def _newly_lost(self, tokens: list[str]) -> list[str]:
        """Leases found expired while held, less those reported before or lost with the file."""
        return [t for t in tokens if t not in self._reported and t not in self._from_before_loss]

    async def renew(self, permits: Sequence[Permit]) -> int:
        def extend(db: sqlite3.Connection, now: float) -> list[str]:
            self._expire_leases(db, now)
            lost = []
            for permit in permits:
                tables = ["slots"] * permit.slot + ["in_flight"] * permit.cohort
                for table in tables:
                    expires = now + self._ttl()
                    if db.execute(f"UPDATE {table} SET expires = ? WHERE token = ?",
                                  (expires, permit.token)).rowcount:
                        continue
                    # Expired while held: put back even if given away meanwhile (over
                    # capacity, then), so from now on nobody else is granted what it still uses.
                    db.execute(f"INSERT INTO {table} VALUES (?, ?)", (permit.token, expires))
                    if table == "in_flight":  # in flight again, no longer counted as answered
                        _delete(db, "answered", permit.token)
                    lost.append(permit.token)
            return lost

        fresh = self._newly_lost(await self._run(extend))
        self._reported.update(fresh)
        return len(fresh)

    async def pause(self, seconds: float) -> None:
        def hold(db: sqlite3.Connection, now: float) -> None:
            db.execute("INSERT INTO pause VALUES (1, ?) ON CONFLICT (one) "
                       "DO UPDATE SET until = max(until, excluded.until)", (now + seconds,))

        await self._run(hold)

    async def wait_for_release(self, at_most: float) -> None:
        # A release in this process wakes us at once; one elsewhere within ``recheck``.
        await self._released.wait(at_most)

    async def set_known_usage(self, month: str, usage: int) -> None:
        def record(db: sqlite3.Connection, now: float) -> None:
            db.execute("INSERT INTO quota VALUES (?, ?) ON CONFLICT (month) "
                       "DO UPDATE SET used = max(used, excluded.used)", (month, usage))

        await self._run(record)

    async def quota_used(self, month: str | None = None) -> int:
        return await self._run(lambda db, now: _quota(db, month or _month_at(now)))


    # -- a cohort's write lease ------------------------------------------------------------
    async def acquire_write(self, cohort_id: str) -> str | None:
        token = secrets.token_hex(8)

        def take(db: sqlite3.Connection, now: float) -> bool:
            db.execute("DELETE FROM writers WHERE cohort = ? AND expires <= ?", (cohort_id, now))
            return db.execute("INSERT OR IGNORE INTO writers VALUES (?, ?, ?)",
                              (cohort_id, token, now + self._ttl())).rowcount == 1

        return token if await self._run(take) else None

    async def renew_write(self, cohort_id: str, token: str) -> bool:
        def extend(db: sqlite3.Connection, now: float) -> bool:
            return db.execute(
                "UPDATE writers SET expires = ? WHERE cohort = ? AND token = ? AND expires > ?",
                (now + self._ttl(), cohort_id, token, now)).rowcount == 1

        return await self._run(extend)

    async def release_write(self, cohort_id: str, token: str) -> None:
        def give_back(db: sqlite3.Connection, now: float) -> None:
            db.execute("DELETE FROM writers WHERE cohort = ? AND token = ?", (cohort_id, token))

        await self._run(give_back)
        self._released.fire()


# Created at open when missing, so a file made before write leases existed needs no new format.
_WRITERS = ("CREATE TABLE IF NOT EXISTS writers (cohort TEXT PRIMARY KEY, token TEXT NOT NULL, "
            "expires REAL NOT NULL) WITHOUT ROWID")


def _enter_wal_mode(connection: sqlite3.Connection) -> None:
    """Switch a new file to WAL, waiting for the other processes that open it at once.

    Two connections that each hold the shared lock of a new rollback-mode file both need the
    exclusive lock to switch it; SQLite answers one of them "database is locked" at once,
    without its busy handler (waiting could deadlock). Once one has switched, the file stays
    WAL and the others' switch is a no-op, so a short jittered retry always ends.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY or (
                    time.monotonic() >= deadline):
                raise
        time.sleep(0.005 + secrets.randbelow(20) / 1000)


def _count(db: sqlite3.Connection, table: str) -> int:
    return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _quota(db: sqlite3.Connection, month: str) -> int:
    row = db.execute("SELECT used FROM quota WHERE month = ?", (month,)).fetchone()
    return 0 if row is None else int(row[0])


def _delete(db: sqlite3.Connection, table: str, token: str) -> int:
    return int(db.execute(f"DELETE FROM {table} WHERE token = ?", (token,)).rowcount)


def _identity(path: pathlib.Path | None) -> tuple[int, int] | None:
    try:
        found = os.stat(path) if path is not None else None
    except FileNotFoundError:
        return None
    return None if found is None else (found.st_dev, found.st_ino)


def _require_regular_or_missing(path: pathlib.Path, error: type[Exception]) -> None:
    """A FIFO or a device would block or break SQLite: refuse anything but a regular file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise error(f"the shared limits file {path} cannot be used: "
                    f"{exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise error(f"the shared limits file {path} is not a regular file")
