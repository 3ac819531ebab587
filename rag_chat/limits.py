"""Per-user abuse limits, shared by every instance through Redis.

::

    messages     sliding window: at most N in any 60 s  (RAG_RATE_LIMIT_PER_MINUTE, 30)
                 ──► RateLimited(retry_after = when the oldest one leaves the window)
    connections  leases: at most N open WebSockets per user (RAG_MAX_CONNECTIONS_PER_USER)
    AI replies   leases: at most N answers generating at once per user (RAG_MAX_REPLIES_PER_USER)

A window is a sorted set of timestamps, a lease set a sorted set of ids scored by their expiry;
each check is one Lua script that reads Redis' own clock, so instances with skewed clocks
agree. Leases expire on their own (LEASE_TTL_S) unless this instance refreshes them, so an
instance that dies does not hold its users' slots for ever.

Limits fail open: when Redis does not answer, the request goes on (and meets the same outage
in the room log, which reports it clearly); a limit is not worth an outage of its own.

Every refusal calls ``on_hit`` with the limit's name (``messages``, ``replies``,
``connections``): the app counts them in its metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from string import Template
from typing import Any, Protocol

from redis.exceptions import RedisError

from rag_chat.errors import RateLimited, TooManyConnections, TooManyReplies

log = logging.getLogger(__name__)

WINDOW_S = 60.0
LEASE_TTL_S = 60.0
_LIMIT_NAMES = {"conn": "connections", "reply": "replies"}  # lease kinds, as on_hit names them

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# The two checks as fragments, so that the scripts built from them share one text: a sliding
# window (its key, limit, window in ms, the new entry's id; $refused returns the wait) and a
# lease set (its key, member, cap, ttl in ms; $refused / $taken return).
_WINDOW = Template("""
redis.call('ZREMRANGEBYSCORE', $key, '-inf', now - tonumber($window))
if redis.call('ZCARD', $key) >= tonumber($limit) then
  local oldest = redis.call('ZRANGE', $key, 0, 0, 'WITHSCORES')
  local wait = math.max(1, tonumber(oldest[2]) + tonumber($window) - now)
  return $refused
end
redis.call('ZADD', $key, now, $entry)
redis.call('PEXPIRE', $key, $window)
""")

_LEASE = Template("""
redis.call('ZREMRANGEBYSCORE', $key, '-inf', now)
if not redis.call('ZSCORE', $key, $member)
   and redis.call('ZCARD', $key) >= tonumber($cap) then
  return $refused
end
redis.call('ZADD', $key, now + tonumber($ttl), $member)
redis.call('PEXPIRE', $key, $ttl)
return $taken
""")

_HIT = (
    _NOW
    + _WINDOW.substitute(
        key="KEYS[1]", limit="ARGV[1]", window="ARGV[2]", entry="ARGV[3]", refused="wait"
    )
    + "return 0\n"
)

_ACQUIRE = _NOW + _LEASE.substitute(
    key="KEYS[1]", member="ARGV[1]", cap="ARGV[2]", ttl="ARGV[3]", refused="0", taken="1"
)

_REFRESH = (
    _NOW
    + """
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""
)

# a message that asks for an answer: the message counted (as _HIT) and the answer's lease
# taken (as _ACQUIRE) in one round trip; {wait_ms, 1|0}, no lease taken when over the window
_HIT_ACQUIRE = (
    _NOW
    + _WINDOW.substitute(
        key="KEYS[1]", limit="ARGV[1]", window="ARGV[2]", entry="ARGV[3]", refused="{wait, 0}"
    )
    + _LEASE.substitute(
        key="KEYS[2]",
        member="ARGV[4]",
        cap="ARGV[5]",
        ttl="ARGV[6]",
        refused="{0, 0}",
        taken="{0, 1}",
    )
)


class LimitStore(Protocol):
    async def hit(self, key: str, limit: int, window_ms: int) -> int:
        """0 when allowed (and counted), else the milliseconds until it would be."""
        ...

    async def acquire(self, key: str, member: str, cap: int, ttl_ms: int) -> bool: ...

    async def hit_and_acquire(
        self,
        hit_key: str,
        limit: int,
        window_ms: int,
        lease_key: str,
        member: str,
        cap: int,
        ttl_ms: int,
    ) -> tuple[int, bool]:
        """``hit``, then (when it was allowed) ``acquire``, at once: (hit's wait, acquired)."""
        ...

    async def refresh(self, key: str, members: list[str], ttl_ms: int) -> None: ...

    async def release(self, key: str, member: str) -> None: ...

    async def aclose(self) -> None: ...


class RedisLimitStore:
    def __init__(self, url: str, prefix: str) -> None:
        from rag_chat.rooms.log import redis_client  # a pool that waits, not fails

        self._redis: Any = redis_client(url, socket_connect_timeout=1, socket_timeout=2)
        self.prefix = f"{prefix}limit:"
        self._hit = self._redis.register_script(_HIT)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._hit_acquire = self._redis.register_script(_HIT_ACQUIRE)
        self._refresh = self._redis.register_script(_REFRESH)

    async def hit(self, key: str, limit: int, window_ms: int) -> int:
        wait = await self._hit(keys=[self.prefix + key], args=[limit, window_ms, uuid.uuid4().hex])
        return int(wait)

    async def acquire(self, key: str, member: str, cap: int, ttl_ms: int) -> bool:
        return bool(await self._acquire(keys=[self.prefix + key], args=[member, cap, ttl_ms]))

    async def hit_and_acquire(
        self,
        hit_key: str,
        limit: int,
        window_ms: int,
        lease_key: str,
        member: str,
        cap: int,
        ttl_ms: int,
    ) -> tuple[int, bool]:
        wait, acquired = await self._hit_acquire(
            keys=[self.prefix + hit_key, self.prefix + lease_key],
            args=[limit, window_ms, uuid.uuid4().hex, member, cap, ttl_ms],
        )
        return int(wait), bool(acquired)

    async def refresh(self, key: str, members: list[str], ttl_ms: int) -> None:
        await self._refresh(keys=[self.prefix + key], args=[ttl_ms, *members])

    async def release(self, key: str, member: str) -> None:
        await self._redis.zrem(self.prefix + key, member)

    async def aclose(self) -> None:
        await self._redis.aclose()


class LocalLimitStore:
    def __init__(self) -> None:
        self._windows: dict[str, deque[float]] = {}
        self._leases: dict[str, dict[str, float]] = {}

    async def hit(self, key: str, limit: int, window_ms: int) -> int:
        now = time.monotonic() * 1000
        window = self._windows.setdefault(key, deque())
        while window and window[0] <= now - window_ms:
            window.popleft()
        if len(window) >= limit:
            return max(1, int(window[0] + window_ms - now))
        window.append(now)
        return 0

    async def acquire(self, key: str, member: str, cap: int, ttl_ms: int) -> bool:
        now = time.monotonic() * 1000
        leases = self._leases.setdefault(key, {})
        for m, expiry in list(leases.items()):
            if expiry <= now:
                del leases[m]
        if member not in leases and len(leases) >= cap:
            return False
        leases[member] = now + ttl_ms
        return True

    async def hit_and_acquire(
        self,
        hit_key: str,
        limit: int,
        window_ms: int,
        lease_key: str,
        member: str,
        cap: int,
        ttl_ms: int,
    ) -> tuple[int, bool]:
        wait = await self.hit(hit_key, limit, window_ms)
        return (wait, False) if wait else (0, await self.acquire(lease_key, member, cap, ttl_ms))

    async def refresh(self, key: str, members: list[str], ttl_ms: int) -> None:
        now = time.monotonic() * 1000
        for m in members:
            self._leases.setdefault(key, {})[m] = now + ttl_ms

    async def release(self, key: str, member: str) -> None:
        leases = self._leases.get(key, {})
        leases.pop(member, None)
        if not leases:
            self._leases.pop(key, None)

    async def aclose(self) -> None:
        return None


class Limits:
    def __init__(
        self,
        store: LimitStore,
        *,
        messages_per_minute: int = 30,
        max_connections: int = 20,
        max_replies: int = 2,
        lease_ttl_s: float = LEASE_TTL_S,
        window_s: float = WINDOW_S,
        on_hit: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.window_ms = int(window_s * 1000)
        self.messages_per_minute = messages_per_minute
        self.max_connections = max_connections
        self.max_replies = max_replies
        self.lease_ttl_ms = int(lease_ttl_s * 1000)
        self.held: dict[str, set[str]] = {}  # lease key -> members this instance holds
        self.hits = 0  # requests refused, by any limit
        self.on_hit = on_hit  # called with "messages", "replies" or "connections" on each
        self._refresher: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="limit-leases")

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None

    async def message(self, who: str) -> None:
        """Count one message of ``who``; :class:`RateLimited` when over the limit."""
        if self.messages_per_minute <= 0:
            return
        try:
            wait_ms = await self.store.hit(f"msg:{who}", self.messages_per_minute, self.window_ms)
        except (RedisError, OSError) as exc:
            log.warning("rate limit not checked, Redis is not reachable: %s", exc)
            return
        if wait_ms:
            raise self._too_many_messages(wait_ms)

    async def ask(self, who: str, reply: str) -> None:
        """A message that asks for an answer: counted as :meth:`message` does and the
        answer's lease taken as :meth:`reply_started` does, in one round trip to Redis (one
        wait less before the first token). :class:`RateLimited` takes no lease."""
        if self.messages_per_minute <= 0:
            await self.reply_started(who, reply)
            return
        key = f"reply:{who}"
        try:
            wait_ms, ok = await self.store.hit_and_acquire(
                f"msg:{who}",
                self.messages_per_minute,
                self.window_ms,
                key,
                reply,
                self.max_replies,
                self.lease_ttl_ms,
            )
        except (RedisError, OSError) as exc:
            log.warning("limits not checked, Redis is not reachable: %s", exc)
            wait_ms, ok = 0, True
        if wait_ms:
            raise self._too_many_messages(wait_ms)
        if not ok:
            raise self._too_many_replies()
        self.held.setdefault(key, set()).add(reply)

    def _too_many_messages(self, wait_ms: int) -> RateLimited:
        self._hit("messages")
        return RateLimited(
            f"too many messages: at most {self.messages_per_minute} in "
            f"{self.window_ms / 1000:g} s; "
            f"try again in {wait_ms / 1000:.1f} s",
            wait_ms / 1000,
        )

    def _too_many_replies(self) -> TooManyReplies:
        self._hit("replies")
        return TooManyReplies(
            f"too many answers at once: at most {self.max_replies} per user; "
            "wait for one to finish or stop it",
            1.0,
        )

    async def _acquire(self, kind: str, who: str, member: str, cap: int) -> bool:
        key = f"{kind}:{who}"
        try:
            ok = await self.store.acquire(key, member, cap, self.lease_ttl_ms)
        except (RedisError, OSError) as exc:
            log.warning("%s limit not checked, Redis is not reachable: %s", kind, exc)
            ok = True
        if ok:
            self.held.setdefault(key, set()).add(member)
        else:
            self._hit(_LIMIT_NAMES.get(kind, kind))
        return ok

    def _hit(self, limit: str) -> None:
        self.hits += 1
        if self.on_hit is not None:
            self.on_hit(limit)

    async def _release(self, kind: str, who: str, member: str) -> None:
        key = f"{kind}:{who}"
        held = self.held.get(key)
        if held is not None:
            held.discard(member)
            if not held:
                del self.held[key]
        try:
            await self.store.release(key, member)
        except (RedisError, OSError) as exc:  # it expires on its own
            log.warning("%s lease not released (it expires by itself): %s", kind, exc)

    async def connect(self, who: str, conn: str) -> None:
        if not await self._acquire("conn", who, conn, self.max_connections):
            raise TooManyConnections(
                f"too many connections: at most {self.max_connections} per user",
                self.lease_ttl_ms / 1000,
            )

    async def disconnect(self, who: str, conn: str) -> None:
        await self._release("conn", who, conn)

    async def reply_started(self, who: str, reply: str) -> None:
        if not await self._acquire("reply", who, reply, self.max_replies):
            raise self._too_many_replies()

    async def reply_finished(self, who: str, reply: str) -> None:
        await self._release("reply", who, reply)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl_ms / 3000)
            for key, members in list(self.held.items()):
                if not members:
                    continue
                try:
                    await self.store.refresh(key, sorted(members), self.lease_ttl_ms)
                except (RedisError, OSError) as exc:
                    log.warning("lease refresh failed: %s", exc)

    async def aclose(self) -> None:
        await self.stop()
        await self.store.aclose()
