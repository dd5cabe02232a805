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
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

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
)
from ._validate import require_encodable

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "RedisLimits needs redis-py: pip install 'amp-cohorts-async[redis]'", name=exc.name
    ) from exc

__all__ = ("RedisLimits",)

T = TypeVar("T")

_MICRO = 1_000_000
_QUOTA_KEY_SECONDS = 40 * 24 * 3600  # a month's count outlives its month, then goes

# Common prelude: the server's clock in microseconds, exact integer strings for scores, and
# the leases of holders that stopped renewing handed back.
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

# KEYS: slots, inflight, stamps, pause, quota (a hash: month -> count)
# ARGV: want_slot, want_cohort, max_slots, lease_us, token, quota (-1: none), edge_us,
#       longest_us, then (max_requests, length_us) per window
# Returns {'ok', month} | {'pause', us} | {'slots', -1} | {'window', us or -1} |
#         {'quota', used, month}
_ACQUIRE = _PRELUDE + """
expire_leases(KEYS[1], KEYS[2], KEYS[3])
local edge = tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', n(now - tonumber(ARGV[8]) - edge))
if ARGV[1] == '1' then
  local paused = tonumber(redis.call('GET', KEYS[4]) or '0')
  if paused > now then return {'pause', paused - now} end
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return {'slots', -1} end
end
if ARGV[2] == '1' then
  local used = tonumber(redis.call('HGET', KEYS[5], this_month) or '0')
  local quota = tonumber(ARGV[6])
  if quota >= 0 and used + 1 > quota then return {'quota', used, this_month} end
  local flying = redis.call('ZCARD', KEYS[2])
  local wait = 0
  for i = 9, #ARGV, 2 do
    local limit = tonumber(ARGV[i])
    local length = tonumber(ARGV[i + 1]) + edge
    local low = '(' .. n(now - length)
    local inside = redis.call('ZCOUNT', KEYS[3], low, '+inf')
    local occupied = flying + inside
    if occupied >= limit then
      local must = occupied - limit + 1
      if must > inside then return {'window', -1} end
      local oldest = redis.call('ZRANGEBYSCORE', KEYS[3], low, '+inf', 'WITHSCORES',
                                'LIMIT', must - 1, 1)
      local until_free = tonumber(oldest[2]) + length - now
      if until_free > wait then wait = until_free end
    end
  end
  if wait > 0 then return {'window', wait} end
end
local lease = n(now + tonumber(ARGV[4]))
if ARGV[1] == '1' then redis.call('ZADD', KEYS[1], lease, ARGV[5]) end
if ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[5], this_month, 1)
  redis.call('EXPIRE', KEYS[5], QUOTA_KEY_SECONDS)
  redis.call('ZADD', KEYS[2], lease, ARGV[5])
end
return {'ok', this_month}
""".replace("QUOTA_KEY_SECONDS", str(_QUOTA_KEY_SECONDS))

# KEYS: slots, inflight, stamps, quota;  ARGV: slot token, cohort token, stamp, refund,
# stamps_ttl_ms, the cohort permit's month.  Returns the number of leases found expired.
_RELEASE = _PRELUDE + """
local lost = 0
if ARGV[1] ~= '' and redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then lost = lost + 1 end
if ARGV[2] ~= '' then
  if redis.call('ZREM', KEYS[2], ARGV[2]) == 0 then lost = lost + 1 end
  if ARGV[3] == '1' then
    redis.call('ZADD', KEYS[3], n(now), ARGV[2])
    redis.call('PEXPIRE', KEYS[3], ARGV[5])
  else
    redis.call('ZREM', KEYS[3], ARGV[2])
  end
  if ARGV[4] == '1' and tonumber(redis.call('HGET', KEYS[4], ARGV[6]) or '0') > 0 then
    redis.call('HINCRBY', KEYS[4], ARGV[6], -1)
  end
end
return lost
"""

# KEYS: slots, inflight;  ARGV: lease_us, then "s:<token>" / "c:<token>"
_RENEW = _PRELUDE + """
local lost = {}
for i = 2, #ARGV do
  local key = KEYS[1]
  if string.sub(ARGV[i], 1, 1) == 'c' then key = KEYS[2] end
  local token = string.sub(ARGV[i], 3)
  if redis.call('ZSCORE', key, token) then
    redis.call('ZADD', key, 'XX', n(now + tonumber(ARGV[1])), token)
  else
    table.insert(lost, token)
  end
end
return lost
"""

# KEYS: pause;  ARGV: seconds in microseconds
_PAUSE = _PRELUDE + """
local target = now + tonumber(ARGV[1])
if tonumber(redis.call('GET', KEYS[1]) or '0') < target then
  redis.call('SET', KEYS[1], n(target), 'PX', math.floor(tonumber(ARGV[1]) / 1000) + 1000)
end
return 1
"""

# KEYS: quota;  ARGV: month, Amplitude's count of it
_KNOWN_USAGE = """
if tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], QUOTA_KEY_SECONDS)
end
return 1
""".replace("QUOTA_KEY_SECONDS", str(_QUOTA_KEY_SECONDS))

# KEYS: quota;  ARGV: month ('': this month on the server's clock)
_QUOTA_USED = _PRELUDE + """
local month = ARGV[1]
if month == '' then month = this_month end
return tonumber(redis.call('HGET', KEYS[1], month) or '0')
"""


# A cohort's write lease: one key holding its holder's token, expiring on the server's clock.
_ACQUIRE_WRITE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
_RENEW_WRITE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_WRITE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _safe_url(url: str) -> str:
    """``url`` without its user name and password, for messages."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparsable Redis URL>"


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
        if isinstance(lease_ttl, bool) or not isinstance(lease_ttl, int | float) or not (
            math.isfinite(lease_ttl) and lease_ttl >= 0.5
        ):
            raise InvalidRequestError(f"lease_ttl must be a number of seconds >= 0.5, "
                                      f"got {lease_ttl!r}")
        if namespace is not None and (not isinstance(namespace, str) or not namespace.strip()
                                      or any(c in namespace for c in "{} \n")):
            raise InvalidRequestError("namespace must be non-empty text without braces or "
                                      "spaces")
        self.lease_ttl: float | None = float(lease_ttl)
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
        cls, url: str, *, namespace: str | None = None, lease_ttl: float = 30.0
    ) -> RedisLimits:
        """Limits on the Redis at ``url`` (``redis://[:password@]host:port/db``,
        ``rediss://`` for TLS, ``unix://``). Nothing connects until the first request."""
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidRequestError("the limits URL must start with redis://, rediss:// or "
                                      "unix://")
        require_encodable(url, "the limits URL")
        try:
            client = aioredis.Redis.from_url(
                url, socket_connect_timeout=5.0, socket_timeout=10.0, decode_responses=True
            )
        except (ValueError, RedisError) as exc:
            raise InvalidRequestError(f"invalid limits URL {_safe_url(url)}: {exc}") from None
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

    async def _run(self, script: Callable[..., Awaitable[T]], keys: list[str],
                   args: list[Any]) -> T:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise LimitsBackendError(
                f"the shared limits on Redis at {self._url} failed: {type(exc).__name__}: "
                f"{str(exc)[:200]}; nothing was sent (the client never falls back to "
                f"per-process limits)"
            ) from None

    # -- the protocol -------------------------------------------------------------------
    async def acquire(self, request: PermitRequest) -> Permit | PermitWait:
        limits = self._limits
        if limits is None:
            raise RuntimeError("RedisLimits is not bound to a client yet")
        assert self.lease_ttl is not None
        token = secrets.token_hex(8)
        windows: list[Any] = []
        for window in limits.cohort_requests:
            windows += [window.max_requests, round(window.seconds * _MICRO)]
        reply = await self._run(
            self._acquire,
            [self._key("slots"), self._key("inflight"), self._key("stamps"),
             self._key("pause"), self._key("quota")],
            [int(request.slot), int(request.cohort), limits.max_concurrent_requests,
             round(self.lease_ttl * _MICRO), token,
             -1 if request.quota is None else request.quota, round(WINDOW_EDGE * _MICRO),
             self._longest_us, *windows],
        )
        verdict = reply[0]
        if verdict == "ok":
            return Permit(token, request.slot, request.cohort,
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
        already = sum(1 for p in permits if p.token in self._reported)
        self._reported.difference_update(p.token for p in permits)
        return max(0, int(lost) - already)

    async def renew(self, permits: Sequence[Permit]) -> int:
        assert self.lease_ttl is not None
        names = [f"{'c' if p.cohort else 's'}:{p.token}" for p in permits]
        lost = await self._run(self._renew, [self._key("slots"), self._key("inflight")],
                               [round(self.lease_ttl * _MICRO), *names])
        fresh = [token for token in lost if token not in self._reported]
        self._reported.update(fresh)
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
