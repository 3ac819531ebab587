"""The room event log: every event of a room, numbered by a room-wide increasing ``seq``.

Redis: one stream per room, ``{prefix}room:{room}:log``, whose entry ids are ``{seq}-0``; a
Lua script takes the next seq (INCR) and appends (XADD, capped with MAXLEN ~) atomically, so
the order in the stream is the order everyone sees, on every instance. A reader that knows its
last seq reads exactly what it missed with XRANGE, and follows the live tail with XREAD.

``LocalRoomLog`` is the single-process implementation (used when Redis is not configured and
not running): the same contract over in-process deques.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from rag_chat.errors import MemoryUnavailable

Event = dict[str, Any]

LOG_MAXLEN = 10_000  # events kept per room (approximately: MAXLEN ~)
LOG_TTL_S = 7 * 24 * 3600  # a room's log expires a week after its last event
MAX_BLOCK_MS = 10_000

_APPEND = """
local seq = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], seq .. '-0', 'e', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return seq
"""


class RoomLog(Protocol):
    kind: str

    async def append(self, room: str, event: Event) -> Event: ...

    async def since(self, room: str, after: int, limit: int = LOG_MAXLEN) -> list[Event]: ...

    async def read(self, cursors: Mapping[str, int], block_ms: int) -> list[Event]: ...

    async def last_seq(self, room: str) -> int: ...

    async def claim(self, room: str, client_id: str, ttl_s: float) -> bool: ...

    async def aclose(self) -> None: ...


def _stamp(room: str, seq: int, event: Event) -> Event:
    return {**event, "room": room, "seq": seq}


class RedisRoomLog:
    kind = "redis"

    def __init__(self, url: str, prefix: str = "rag:") -> None:
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.1), retries=3)
        self._redis: Any = Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5, retry=retry
        )
        # XREAD BLOCK holds its connection for up to MAX_BLOCK_MS on purpose: its own client,
        # whose socket timeout outlasts the block
        self._reader: Any = Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=MAX_BLOCK_MS / 1000 + 5,
        )
        self.prefix = prefix
        self._append = self._redis.register_script(_APPEND)

    def _keys(self, room: str) -> tuple[str, str]:
        return f"{self.prefix}room:{room}:log", f"{self.prefix}room:{room}:seq"

    async def append(self, room: str, event: Event) -> Event:
        event = {**event, "ts": event.get("ts") or time.time()}
        try:
            seq = await self._append(
                keys=list(self._keys(room)), args=[json.dumps(event), LOG_MAXLEN, LOG_TTL_S]
            )
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for room events ({exc})") from exc
        return _stamp(room, int(seq), event)

    async def since(self, room: str, after: int, limit: int = LOG_MAXLEN) -> list[Event]:
        key = self._keys(room)[0]
        try:
            rows = await self._redis.xrange(key, min=f"{after + 1}-0", max="+", count=limit)
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for room events ({exc})") from exc
        return [_stamp(room, int(eid.split("-")[0]), json.loads(f["e"])) for eid, f in rows]

    async def read(self, cursors: Mapping[str, int], block_ms: int) -> list[Event]:
        if not cursors:
            await asyncio.sleep(block_ms / 1000)
            return []
        streams = {self._keys(room)[0]: f"{seq}-0" for room, seq in cursors.items()}
        rooms = {self._keys(room)[0]: room for room in cursors}
        try:
            reply = await self._reader.xread(streams, block=min(block_ms, MAX_BLOCK_MS), count=1000)
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for room events ({exc})") from exc
        out = []
        for key, rows in reply or []:
            room = rooms[key]
            for eid, fields in rows:
                out.append(_stamp(room, int(eid.split("-")[0]), json.loads(fields["e"])))
        return out

    async def last_seq(self, room: str) -> int:
        try:
            value = await self._redis.get(self._keys(room)[1])
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for room events ({exc})") from exc
        return int(value or 0)

    async def claim(self, room: str, client_id: str, ttl_s: float) -> bool:
        """True the first time ``client_id`` is seen in ``room`` (idempotent sends)."""
        key = f"{self.prefix}room:{room}:cid:{client_id}"
        try:
            return bool(await self._redis.set(key, "1", nx=True, ex=int(ttl_s)))
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for room events ({exc})") from exc

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._reader.aclose()


class LocalRoomLog:
    kind = "memory"

    def __init__(self) -> None:
        self._logs: dict[str, deque[Event]] = {}
        self._seq: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._claimed: dict[tuple[str, str], float] = {}

    async def append(self, room: str, event: Event) -> Event:
        seq = self._seq.get(room, 0) + 1
        self._seq[room] = seq
        stamped = _stamp(room, seq, {**event, "ts": event.get("ts") or time.time()})
        self._logs.setdefault(room, deque(maxlen=LOG_MAXLEN)).append(stamped)
        async with self._changed:
            self._changed.notify_all()
        return stamped

    async def since(self, room: str, after: int, limit: int = LOG_MAXLEN) -> list[Event]:
        return [e for e in self._logs.get(room, ()) if e["seq"] > after][:limit]

    async def read(self, cursors: Mapping[str, int], block_ms: int) -> list[Event]:
        def fresh() -> list[Event]:
            return [e for room, seq in cursors.items() for e in self._logs.get(room, ())
                    if e["seq"] > seq]  # fmt: skip

        found = fresh()
        if found:
            return found
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), block_ms / 1000)
            except TimeoutError:
                return []
        return fresh()

    async def last_seq(self, room: str) -> int:
        return self._seq.get(room, 0)

    async def claim(self, room: str, client_id: str, ttl_s: float) -> bool:
        now = time.monotonic()
        if self._claimed.get((room, client_id), 0) > now:
            return False
        self._claimed[(room, client_id)] = now + ttl_s
        return True

    async def aclose(self) -> None:
        return None
