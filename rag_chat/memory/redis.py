"""Conversation memory in Redis: survives restarts and is shared by every server instance.

A conversation is the LIST ``{prefix}conv:{conversation_id}`` of JSON strings, oldest first.
Append is one MULTI/EXEC (RPUSH, LTRIM to the newest ``max_messages``, EXPIRE), so a batch
lands whole and the cap and expiry are never out of step with the data.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rag_chat.errors import MemoryUnavailable
from rag_chat.memory.base import (
    StoredMessage,
    check_conversation_id,
    check_limit,
    decode_messages,
    encode_messages,
    one_line,
    redact_url,
)

# A Redis that is down or restarting answers "connection refused" at once: retry with backoff
# (0.2 + 0.4 + 0.8 s) so a restart of about a second goes unnoticed, then fail.
RETRIES = 3
RETRY_BACKOFF_BASE_S = 0.1
RETRY_BACKOFF_CAP_S = 1.0
# A host that drops packets or a hung server answers nothing: these bound each attempt.
CONNECT_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 2.0
# Ping a connection idle this long before reusing it, so a stale one is replaced quietly.
HEALTH_CHECK_INTERVAL_S = 15
# Hard bounds over all the attempts of one call, so a request never hangs on memory.
OPERATION_TIMEOUT_S = 5.0
PING_TIMEOUT_S = 2.0


# replace(): the message whose id is ARGV[1] (searched from the newest) becomes ARGV[2]; when
# there is none, ARGV[2] is appended as append() would (newest ARGV[4] kept). Expiry ARGV[3].
_REPLACE = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do
  local ok, m = pcall(cjson.decode, items[i])
  if ok and type(m) == 'table' and m['id'] == ARGV[1] then
    redis.call('LSET', KEYS[1], i - 1, ARGV[2])
    redis.call('EXPIRE', KEYS[1], ARGV[3])
    return 1
  end
end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[4]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 0
"""


# update(): entry ARGV[1] becomes ARGV[3] if it is still ARGV[2] (compare-and-set)
_SWAP = """
if redis.call('LINDEX', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('LSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""
# how many times update() reads and tries again when the message changed under it
UPDATE_TRIES = 5


class RedisMemory:
    kind: str = "redis"

    def __init__(
        self,
        client: Redis,
        *,
        url: str,
        prefix: str = "rag:",
        max_messages: int = 100,
        ttl_seconds: int = 30 * 24 * 3600,
    ) -> None:
        """``client`` must decode responses (``decode_responses=True``); :meth:`from_url`
        builds one with the timeouts and retries above. ``url`` is for messages only."""
        if max_messages < 1 or ttl_seconds < 1:
            raise ValueError("max_messages and ttl_seconds must be >= 1")
        self._client = client
        self.url = redact_url(url)
        self.prefix = prefix
        self.max_messages = max_messages
        self.ttl_seconds = ttl_seconds
        self._replace = client.register_script(_REPLACE)
        self._swap = client.register_script(_SWAP)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "rag:",
        max_messages: int = 100,
        ttl_seconds: int = 30 * 24 * 3600,
    ) -> RedisMemory:
        """Connects lazily: nothing is tried until the first call (see :meth:`ping`).
        Raises ValueError for a malformed URL."""
        from rag_chat.rooms.log import redis_client  # a pool that waits, not fails

        client = redis_client(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
            retry=Retry(
                ExponentialBackoff(cap=RETRY_BACKOFF_CAP_S, base=RETRY_BACKOFF_BASE_S),
                retries=RETRIES,
            ),
        )
        return cls(
            client, url=url, prefix=prefix, max_messages=max_messages, ttl_seconds=ttl_seconds
        )

    def key(self, conversation_id: str) -> str:
        return f"{self.prefix}conv:{conversation_id}"

    @asynccontextmanager
    async def _talking(self, timeout: float = OPERATION_TIMEOUT_S) -> AsyncIterator[None]:
        """Turn every way of not getting an answer from Redis into MemoryUnavailable."""
        try:
            async with asyncio.timeout(timeout):
                yield
        except TimeoutError:  # our deadline (asyncio's), not redis-py's socket timeout
            raise MemoryUnavailable(
                f"Redis at {self.url} is not reachable (no answer within {timeout:g} s)"
            ) from None
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise MemoryUnavailable(
                f"Redis at {self.url} is not reachable ({one_line(exc)})"
            ) from exc
        except RedisError as exc:  # e.g. OOM, READONLY replica, WRONGTYPE on our key
            raise MemoryUnavailable(f"Redis at {self.url} failed: {one_line(exc)}") from exc

    async def append(self, conversation_id: str, *messages: StoredMessage) -> None:
        key = self.key(check_conversation_id(conversation_id))
        encoded = encode_messages(messages)
        if not encoded:
            return
        # Note: on a connection lost after EXEC reached Redis but before its reply, the retry
        # repeats the transaction, so the batch can (rarely) land twice.
        async with self._talking(), self._client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *encoded)
            pipe.ltrim(key, -self.max_messages, -1)
            pipe.expire(key, self.ttl_seconds)
            await pipe.execute()

    async def replace(self, conversation_id: str, old_id: str, message: StoredMessage) -> bool:
        key = self.key(check_conversation_id(conversation_id))
        (encoded,) = encode_messages((message,))
        async with self._talking():
            found = await self._replace(
                keys=[key], args=[old_id, encoded, self.ttl_seconds, self.max_messages]
            )
        return bool(found)

    async def update(
        self,
        conversation_id: str,
        message_id: str,
        change: Callable[[StoredMessage], StoredMessage],
    ) -> StoredMessage | None:
        key = self.key(check_conversation_id(conversation_id))
        for _ in range(UPDATE_TRIES):
            async with self._talking():
                entries = await self._client.lrange(key, 0, -1)
            raw = [e if isinstance(e, str) else e.decode("utf-8", "replace") for e in entries]
            for i in range(len(raw) - 1, -1, -1):
                stored = decode_messages((raw[i],), key)
                if stored and stored[0].get("id") == message_id:
                    break
            else:
                return None
            (encoded,) = encode_messages((change(stored[0]),))
            async with self._talking():
                if await self._swap(keys=[key], args=[i, raw[i], encoded, self.ttl_seconds]):
                    return decode_messages((encoded,), key)[0]
        raise MemoryUnavailable(f"{key} kept changing while a message of it was updated")

    async def history(self, conversation_id: str, limit: int | None = None) -> list[StoredMessage]:
        key = self.key(check_conversation_id(conversation_id))
        check_limit(limit)
        if limit == 0:  # LRANGE -0 -1 would be the whole list
            return []
        async with self._talking():
            raw = await self._client.lrange(key, 0 if limit is None else -limit, -1)
        # str already (decode_responses=True); bytes only from a client built otherwise
        text = (e if isinstance(e, str) else e.decode("utf-8", "replace") for e in raw)
        return decode_messages(text, key)

    async def delete(self, conversation_id: str) -> bool:
        key = self.key(check_conversation_id(conversation_id))
        async with self._talking():
            return bool(await self._client.delete(key))

    async def ping(self) -> None:
        async with self._talking(PING_TIMEOUT_S):
            await self._client.ping()

    async def aclose(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"RedisMemory(url={self.url!r}, prefix={self.prefix!r})"
