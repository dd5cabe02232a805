"""RedisLimits: one Amplitude app's limits shared by every process and host, on Redis.

Install with the ``redis`` extra (``pip install 'amp-cohorts-async[redis]'``) and pass it to
every client of the app::

    from amp_cohorts_async.redis import RedisLimits

    limits = RedisLimits.from_url("redis://host:6379/0")
    async with amp.CohortsClient(limits_backend=limits) as client: ...

Every decision is one Lua script run atomically on the Redis server, on the server's clock
(``TIME``), never a client clock read before the round trip:

* concurrency slots are leases with a TTL (``lease_ttl``), renewed while held, so the slots of
  a killed worker come back within the TTL; a lease found expired while held is reported;
* the rate windows are an exact sliding log of answered cohort requests (stamped when the
  answer is settled) plus those in flight; a script that says "wait" says exactly how long;
* the shared pause after a 429 and the monthly quota count live there too; the quota month
  (UTC) is the month on the Redis server's clock, so hosts whose clocks straddle midnight at
  the end of a month still count in one month.

Keys are namespaced per app by a hash of the API key (never the key itself), or by
``namespace=``, so one Redis serves several apps. If Redis cannot be reached or fails, the
client raises ``LimitsBackendError`` naming the URL without its password: it never falls back
to process-local limits, which could break the account's limits without anyone noticing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

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
    checked_lease_ttl,
)
from ._validate import require_encodable

try:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "RedisLimits needs redis-py: pip install 'amp-cohorts-async[redis]'", name=exc.name
    ) from exc

__all__ = ("RedisLimits",)

logger = logging.getLogger("amp_cohorts_async")

T = TypeVar("T")

_MICRO = 1_000_000
_QUOTA_KEY_SECONDS = 40 * 24 * 3600  # a month's count outlives its month, then goes

# Common prelude: the server's clock in microseconds, exact integer strings for scores, the
# check that the shared state was not lost, and the leases of holders that stopped renewing
# handed back. Every script gets KEYS[1] = the app's state hash and ARGV[1..4] = the epoch this
# client knows ('' for none), a fresh epoch id should one be needed, and the cohort and slot
# hold-offs after a loss (us); its own keys and arguments follow, as K and A.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function n(x) return string.format('%.0f', x) end
-- The UTC calendar month of epoch seconds, "YYYY-MM" (civil-from-days, H. Hinnant).
local function utc_month(seconds)
  local z = math.floor(seconds / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400
  if month <= 2 then year = year + 1 end
  return string.format('%04d-%02d', year, month)
end
local this_month = utc_month(math.floor(now / 1000000))
"""

_STATE = """
local state = KEYS[1]
local K, A = {}, {}
for i = 2, #KEYS do K[i - 1] = KEYS[i] end
for i = 5, #ARGV do A[i - 4] = ARGV[i] end
-- The state is this app's epoch: made by the first client, lost with everything else. The
-- server's run id changes with a restart or a failover, which may have lost recent writes
-- even where the epoch survived (a snapshot, a replica behind its primary).
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
local known = ARGV[1]
local epoch = redis.call('HGET', state, 'epoch')
local lost = 0
local function recover()
  epoch = ARGV[2]
  lost = 1
  redis.call('HSET', state, 'epoch', epoch, 'run_id', run_id, 'fresh', '0',
             'cohort_until', n(now + tonumber(ARGV[3])), 'slot_until', n(now + tonumber(ARGV[4])))
end
if not epoch then
  if known == '' then  -- a store this app never used, as far as this client knows
    epoch = ARGV[2]
    redis.call('HSET', state, 'epoch', epoch, 'run_id', run_id, 'fresh', '1')
  else
    recover()
  end
elseif redis.call('HGET', state, 'run_id') ~= run_id then
  recover()
elseif known ~= '' and epoch ~= known then
  -- Made again since this client last looked: by a client that noticed the loss (which
  -- began the hold-offs), or by one that could not know of it (then begin them now).
  if redis.call('HGET', state, 'fresh') == '1' then recover() else lost = 1 end
end
local function of_this_epoch(token) return string.sub(token, 1, #epoch + 1) == epoch .. ':' end
local function expire_leases(slots, inflight, stamps)
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', n(now))
  local dead = redis.call('ZRANGEBYSCORE', inflight, '-inf', n(now), 'WITHSCORES')
  for i = 1, #dead, 2 do
    -- a cohort request whose holder died counts as answered when its lease ran out
    redis.call('ZADD', stamps, dead[i + 1], dead[i])
    redis.call('ZREM', inflight, dead[i])
  end
end
"""


def _script(body: str) -> str:
    """A script of the protocol: the prelude, then ``body`` whose reply comes back as
    ``{epoch, lost, reply}``."""
    body = body.replace("QUOTA_KEY_SECONDS", str(_QUOTA_KEY_SECONDS))
    return _PRELUDE + _STATE + "local function body()\n" + body + "end\n" + \
        "return {epoch, lost, body()}\n"


# K: slots, inflight, stamps, pause, quota (a hash: month -> count)
# A: want_slot, want_cohort, max_slots, lease_us, token, quota (-1: none), edge_us,
#    longest_us, then (max_requests, length_us) per window
# Reply: {'ok', month, token} | {'pause', us} | {'slots', us or -1} | {'window', us or -1} |
#        {'quota', used, month}
_ACQUIRE = _script("""
expire_leases(K[1], K[2], K[3])
local edge = tonumber(A[7])
redis.call('ZREMRANGEBYSCORE', K[3], '-inf', n(now - tonumber(A[8]) - edge))
if A[1] == '1' then
  local paused = tonumber(redis.call('GET', K[4]) or '0')
  if paused > now then return {'pause', paused - now} end
  -- after a loss, held leases are re-asserted by their holders within one TTL
  local hold = tonumber(redis.call('HGET', state, 'slot_until') or '0')
  if hold > now then return {'slots', hold - now} end
  if redis.call('ZCARD', K[1]) >= tonumber(A[3]) then return {'slots', -1} end
end
if A[2] == '1' then
  -- after a loss, the lost stamps have all aged out of every window
  local hold = tonumber(redis.call('HGET', state, 'cohort_until') or '0')
  if hold > now then return {'window', hold - now} end
  local used = tonumber(redis.call('HGET', K[5], this_month) or '0')
  local quota = tonumber(A[6])
  if quota >= 0 and used + 1 > quota then return {'quota', used, this_month} end
  local flying = redis.call('ZCARD', K[2])
  local wait = 0
  for i = 9, #A, 2 do
    local limit = tonumber(A[i])
    local length = tonumber(A[i + 1]) + edge
    local low = '(' .. n(now - length)
    local inside = redis.call('ZCOUNT', K[3], low, '+inf')
    local occupied = flying + inside
    if occupied >= limit then
      local must = occupied - limit + 1
      if must > inside then return {'window', -1} end
      local oldest = redis.call('ZRANGEBYSCORE', K[3], low, '+inf', 'WITHSCORES',
                                'LIMIT', must - 1, 1)
      local until_free = tonumber(oldest[2]) + length - now
      if until_free > wait then wait = until_free end
    end
  end
  if wait > 0 then return {'window', wait} end
end
local lease = n(now + tonumber(A[4]))
local token = epoch .. ':' .. A[5]
if A[1] == '1' then redis.call('ZADD', K[1], lease, token) end
if A[2] == '1' then
  redis.call('HINCRBY', K[5], this_month, 1)
  redis.call('EXPIRE', K[5], QUOTA_KEY_SECONDS)
  redis.call('ZADD', K[2], lease, token)
end
return {'ok', this_month, token}
""")

# K: slots, inflight, stamps, quota;  A: slot token, cohort token, stamp, refund,
# stamps_ttl_ms, the cohort permit's month.  Reply: the number of leases found expired (a
# lease from before a loss is not: it went with the state).
_RELEASE = _script("""
local lost_leases = 0
if A[1] ~= '' and redis.call('ZREM', K[1], A[1]) == 0 and of_this_epoch(A[1]) then
  lost_leases = lost_leases + 1
end
if A[2] ~= '' then
  if redis.call('ZREM', K[2], A[2]) == 0 and of_this_epoch(A[2]) then
    lost_leases = lost_leases + 1
  end
  if A[3] == '1' then
    redis.call('ZADD', K[3], n(now), A[2])
    redis.call('PEXPIRE', K[3], A[5])
  else
    redis.call('ZREM', K[3], A[2])
  end
  -- a unit charged before a loss is not in the count re-read after it
  if A[4] == '1' and of_this_epoch(A[2])
     and tonumber(redis.call('HGET', K[4], A[6]) or '0') > 0 then
    redis.call('HINCRBY', K[4], A[6], -1)
  end
end
return lost_leases
""")

# K: slots, inflight, stamps;  A: lease_us, then "s:<token>" / "c:<token>".  Every lease is
# extended; one that is gone is put back (re-asserted), even over capacity, so that a slot
# its holder still uses is not granted again. Reply: the tokens that had expired while held
# as "s:<token>" / "c:<token>" (not those from before a loss).
_RENEW = _script("""
local expired = {}
local lease = n(now + tonumber(A[1]))
for i = 2, #A do
  local cohort = string.sub(A[i], 1, 1) == 'c'
  local key = cohort and K[2] or K[1]
  local token = string.sub(A[i], 3)
  if not redis.call('ZSCORE', key, token) then
    if of_this_epoch(token) then table.insert(expired, A[i]) end
    if cohort then redis.call('ZREM', K[3], token) end  -- in flight again, not answered
  end
  redis.call('ZADD', key, lease, token)
end
return expired
""")

# K: pause;  A: seconds in microseconds
_PAUSE = _script("""
local target = now + tonumber(A[1])
if tonumber(redis.call('GET', K[1]) or '0') < target then
  redis.call('SET', K[1], n(target), 'PX', math.floor(tonumber(A[1]) / 1000) + 1000)
end
return 1
""")

# K: quota;  A: month, Amplitude's count of it
_KNOWN_USAGE = _script("""
if tonumber(redis.call('HGET', K[1], A[1]) or '0') < tonumber(A[2]) then
  redis.call('HSET', K[1], A[1], A[2])
  redis.call('EXPIRE', K[1], QUOTA_KEY_SECONDS)
end
return 1
""")

# K: quota;  A: month ('': this month on the server's clock)
_QUOTA_USED = _script("""
local month = A[1]
if month == '' then month = this_month end
return tonumber(redis.call('HGET', K[1], month) or '0')
""")


def _lease_names(permits: Sequence[Permit]) -> set[str]:
    """One name per lease: a permit for a slot and a cohort place holds two leases."""
    return ({f"s:{p.token}" for p in permits if p.slot}
            | {f"c:{p.token}" for p in permits if p.cohort})


# A cohort's write lease: one key holding its holder's token, expiring on the server's clock.
# K: the cohort's write key;  A: token, lease in ms
_ACQUIRE_WRITE = _script("""
if redis.call('SET', K[1], A[1], 'NX', 'PX', A[2]) then return 1 end
return 0
""")
_RENEW_WRITE = _script("""
if redis.call('GET', K[1]) == A[1] then return redis.call('PEXPIRE', K[1], A[2]) end
return 0
""")
_RELEASE_WRITE = _script("""
if redis.call('GET', K[1]) == A[1] then return redis.call('DEL', K[1]) end
return 0
""")


def _credentials_are_ambiguous(url: str) -> bool:
    """Whether the user name or password of ``url`` holds an unescaped ``/``, ``?`` or ``#``.

    A URL parser then takes part of the password for the host, the port or the path (and
    would connect there, and name it in its errors); nothing can tell where it ends.
    """
    rest = url.partition("://")[2]
    userinfo, at, _ = rest.rpartition("@")
    return bool(at) and any(c in userinfo for c in "/?#")


def _safe_url(url: str) -> str:
    """``url`` as messages may show it: scheme, host, port and path, never the user name, the
    password or the query (which may hold ``password=``)."""
    scheme, separator, rest = url.partition("://")
    if not separator or _credentials_are_ambiguous(url):
        return f"{scheme or 'redis'}://<not shown>"
    rest = rest.rpartition("@")[2]
    rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    address, _, path = rest.partition("/")
    if not re.fullmatch(r"([\w.-]*|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?", address):
        return f"{scheme}://<not shown>"
    return f"{scheme}://{address}" + (f"/{path}" if path else "")


class RedisLimits:
    """Shared limits on Redis; see the module documentation.

    Use ``RedisLimits.from_url(url, namespace=None, lease_ttl=30.0)``. Close it with
    ``await limits.aclose()`` (or ``async with``) when no client needs it any more.
    """

    #: How soon a waiter asks again for a slot or window freed in another process.
    recheck: float | None = 0.05
    #: Times this backend found the shared state lost (see ``amp.LimitsBackend``).
    state_losses: int = 0

    def __init__(
        self,
        redis_client: Any,
        *,
        url: str = "redis://",
        namespace: str | None = None,
        lease_ttl: float = 30.0,
        close_client: bool = True,
    ) -> None:
        lease_ttl = checked_lease_ttl(lease_ttl)
        if namespace is not None and (not isinstance(namespace, str) or not namespace.strip()
                                      or any(c in namespace for c in "{} \n")):
            raise InvalidRequestError("namespace must be non-empty text without braces or "
                                      "spaces")
        self.lease_ttl: float | None = lease_ttl
        self.namespace = namespace
        self._redis = redis_client
        self._close_client = close_client
        self._url = _safe_url(url)
        self._limits: Limits | None = None
        self._app: str | None = None
        self._longest_us = 0
        self._stamps_ttl_ms = 60_000
        self._prefix = ""
        self._released = ReleaseSignal()
        self._reported: set[str] = set()
        #: The epoch of the shared state this client last saw ('' before its first call).
        self._epoch = ""
        self._acquire = redis_client.register_script(_ACQUIRE)
        self._release = redis_client.register_script(_RELEASE)
        self._renew = redis_client.register_script(_RENEW)
        self._pause = redis_client.register_script(_PAUSE)
        self._known_usage = redis_client.register_script(_KNOWN_USAGE)
        self._quota_used = redis_client.register_script(_QUOTA_USED)
        self._acquire_write = redis_client.register_script(_ACQUIRE_WRITE)
        self._renew_write = redis_client.register_script(_RENEW_WRITE)
        self._release_write = redis_client.register_script(_RELEASE_WRITE)

    @classmethod
    def from_url(
        cls, url: str, *, namespace: str | None = None, lease_ttl: float = 30.0,
        cluster: bool = False,
    ) -> RedisLimits:
        """Limits on the Redis at ``url`` (``redis://[:password@]host:port/db``,
        ``rediss://`` for TLS, ``unix://``). Nothing connects until the first request.

        ``cluster=True``: ``url`` names one node of a Redis Cluster (redis-py's cluster
        client finds the others); every key of one app lives in one hash slot. No error
        message ever shows any part of the user name or password, however malformed the URL.
        """
        schemes = ("redis://", "rediss://") if cluster else ("redis://", "rediss://", "unix://")
        if not isinstance(url, str) or not url.startswith(schemes):
            raise InvalidRequestError(f"the limits URL must start with {', '.join(schemes)}")
        try:
            require_encodable(url, "the limits URL")
        except InvalidRequestError:
            raise InvalidRequestError("the limits URL is not valid text (a byte that is not "
                                      "UTF-8); it is not shown, as it may hold a password"
                                      ) from None
        if _credentials_are_ambiguous(url):
            raise InvalidRequestError(
                f"the limits URL {_safe_url(url)} has '/', '?' or '#' before its last '@', in "
                "the user name or password: percent-encode them there (%2F, %3F, %23)")
        factory = RedisCluster.from_url if cluster else aioredis.Redis.from_url
        try:
            client = factory(url, socket_connect_timeout=5.0, socket_timeout=10.0,
                             decode_responses=True)
        except (ValueError, TypeError, RedisError) as exc:
            # The parser's own words may quote the URL (the password included): not shown.
            raise InvalidRequestError(f"invalid limits URL {_safe_url(url)} "
                                      f"({type(exc).__name__})") from None
        return cls(client, url=url, namespace=namespace, lease_ttl=lease_ttl)

    def __repr__(self) -> str:
        return f"RedisLimits(url={self._url!r}, namespace={self._prefix or self.namespace!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._close_client:
            await self._redis.aclose()

    # -- binding ------------------------------------------------------------------------
    def bind(self, limits: Limits, app: str) -> None:
        namespace = self.namespace or app
        if self._limits is not None:
            if self._limits != limits or self._app != namespace:
                raise InvalidRequestError(
                    "this RedisLimits already serves another app or other Limits; "
                    "create one per app"
                )
            return
        self._limits = limits
        self._app = namespace
        longest = max((w.seconds for w in limits.cohort_requests), default=0.0)
        self._longest_us = round(longest * _MICRO)
        # Stamps outlive the longest window by a minute, then Redis drops the whole log.
        self._stamps_ttl_ms = math.ceil((longest + 60.0) * 1000)
        # The braces make every key of one app hash to one slot (Redis Cluster).
        self._prefix = f"amp-cohorts:{{{namespace}}}"

    def _key(self, name: str) -> str:
        if self._limits is None:
            raise RuntimeError("RedisLimits is not bound to a client yet")
        return f"{self._prefix}:{name}"

    async def _run(self, script: Callable[..., Awaitable[Any]], keys: list[str],
                   args: list[Any]) -> Any:
        """Run one protocol script; its reply, having noted whether the state was lost."""
        assert self.lease_ttl is not None
        keys = [self._key("state"), *keys]
        args = [self._epoch, secrets.token_hex(8), self._longest_us + round(WINDOW_EDGE * _MICRO),
                round(self.lease_ttl * _MICRO), *args]
        try:
            try:
                epoch, lost, reply = await script(keys=keys, args=args)
            except RedisConnectionError:
                # A pooled connection to a server that restarted fails once; redis-py then
                # connects afresh. Running a script twice can only over-count (a grant whose
                # answer was lost runs out with its lease), never grant too much.
                epoch, lost, reply = await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise LimitsBackendError(
                f"the shared limits on Redis at {self._url} failed: {type(exc).__name__}: "
                f"{str(exc)[:200]} (the client never falls back to per-process limits)"
            ) from None
        if int(lost) and epoch != self._epoch:  # once, however many calls noticed it
            self.state_losses += 1
            logger.warning(
                "the shared limits state on Redis at %s was lost (a restart without "
                "persistence, a failover or a flush): no new cohort request for %.0fs, no new "
                "slot for %.0fs while holders re-assert their leases; the quota count is "
                "taken again from Amplitude", self._url,
                self._longest_us / _MICRO + WINDOW_EDGE, self.lease_ttl)
        self._epoch = epoch
        return reply

    # -- the protocol -------------------------------------------------------------------
    async def acquire(self, request: PermitRequest) -> Permit | PermitWait:
        limits = self._limits
        if limits is None:
            raise RuntimeError("RedisLimits is not bound to a client yet")
        assert self.lease_ttl is not None
        windows: list[Any] = []
        for window in limits.cohort_requests:
            windows += [window.max_requests, round(window.seconds * _MICRO)]
        reply = await self._run(
            self._acquire,
            [self._key("slots"), self._key("inflight"), self._key("stamps"),
             self._key("pause"), self._key("quota")],
            [int(request.slot), int(request.cohort), limits.max_concurrent_requests,
             round(self.lease_ttl * _MICRO), secrets.token_hex(8),
             -1 if request.quota is None else request.quota, round(WINDOW_EDGE * _MICRO),
             self._longest_us, *windows],
        )
        verdict = reply[0]
        if verdict == "ok":
            return Permit(str(reply[2]), request.slot, request.cohort,
                          str(reply[1]) if request.cohort else "")
        if verdict == "quota":
            raise QuotaExceededError(
                f"monthly cohort-request quota reached: {reply[1]} of {request.quota} used in "
                f"{reply[2]} (shared on Redis at {self._url})"
            )
        value = int(reply[1])
        seconds = math.inf if value < 0 else value / _MICRO
        reason = {"pause": "pause", "window": "window"}.get(verdict, "slots")
        return PermitWait(seconds, reason)  # type: ignore[arg-type]

    async def release(self, permits: Sequence[Permit], settlement: Settlement | None) -> int:
        slot = next((p.token for p in permits if p.slot), "")
        cohort = next((p for p in permits if p.cohort), None)
        lost = await self._run(
            self._release,
            [self._key("slots"), self._key("inflight"), self._key("stamps"),
             self._key("quota")],
            [slot, cohort.token if cohort else "",
             int(settlement is not None and settlement.stamp),
             int(settlement is not None and settlement.refund),
             self._stamps_ttl_ms, cohort.month if cohort else ""],
        )
        self._released.fire()
        names = _lease_names(permits)
        already = len(names & self._reported)
        self._reported -= names
        return max(0, int(lost) - already)

    async def renew(self, permits: Sequence[Permit]) -> int:
        assert self.lease_ttl is not None
        lost = await self._run(self._renew, [self._key("slots"), self._key("inflight"),
                                             self._key("stamps")],
                               [round(self.lease_ttl * _MICRO), *sorted(_lease_names(permits))])
        fresh = {name for name in lost if name not in self._reported}
        self._reported |= fresh
        return len(fresh)

    async def pause(self, seconds: float) -> None:
        await self._run(self._pause, [self._key("pause")], [round(seconds * _MICRO)])

    async def wait_for_release(self, at_most: float) -> None:
        # A release in this process wakes us at once; one elsewhere within ``recheck``.
        await self._released.wait(at_most)

    def _write_key(self, cohort_id: str) -> str:
        # Hashed: a cohort id is any text; the key stays short and printable.
        return self._key(f"write:{hashlib.sha256(cohort_id.encode()).hexdigest()[:32]}")

    async def acquire_write(self, cohort_id: str) -> str | None:
        assert self.lease_ttl is not None
        token = secrets.token_hex(8)
        granted = await self._run(self._acquire_write, [self._write_key(cohort_id)],
                                  [token, math.ceil(self.lease_ttl * 1000)])
        return token if int(granted) else None

    async def renew_write(self, cohort_id: str, token: str) -> bool:
        assert self.lease_ttl is not None
        return bool(int(await self._run(self._renew_write, [self._write_key(cohort_id)],
                                        [token, math.ceil(self.lease_ttl * 1000)])))

    async def release_write(self, cohort_id: str, token: str) -> None:
        await self._run(self._release_write, [self._write_key(cohort_id)], [token])
        self._released.fire()

    async def set_known_usage(self, month: str, usage: int) -> None:
        await self._run(self._known_usage, [self._key("quota")], [month, usage])

    async def quota_used(self, month: str | None = None) -> int:
        return int(await self._run(self._quota_used, [self._key("quota")], [month or ""]))
