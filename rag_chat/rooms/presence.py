"""Who is in a room: one entry per connection, with an expiry its instance keeps refreshing.

Redis: the hash ``{prefix}room:{room}:members`` maps a connection id to ``{user, expires}``.
A connection that closes removes its entry; one whose instance died stops being refreshed and
is dropped by the next reader after ``PRESENCE_TTL_S``. Members are the distinct users.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from rag_chat.errors import MemoryUnavailable

PRESENCE_TTL_S = 30.0  # an entry not refreshed for this long is gone (its instance died)

Members = list[dict[str, Any]]  # [{"user": "alice", "connections": 2}, ...] sorted by user


class Presence(Protocol):
    async def add(self, room: str, conn: str, user: str) -> tuple[Members, bool]: ...

    async def remove(self, room: str, conn: str) -> tuple[Members, bool]: ...

    async def members(self, room: str) -> Members: ...

    async def refresh(self, room: str, conns: dict[str, str]) -> tuple[Members, list[str]]: ...

    async def aclose(self) -> None: ...


def _members(entries: dict[str, dict[str, Any]], now: float) -> Members:
    counts: dict[str, int] = {}
    for entry in entries.values():
        if entry["expires"] > now:
            counts[entry["user"]] = counts.get(entry["user"], 0) + 1
    return [{"user": u, "connections": n} for u, n in sorted(counts.items())]


class RedisPresence:
    def __init__(self, url: str, prefix: str = "rag:", ttl_s: float = PRESENCE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._redis: Any = Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5
        )
        self.prefix = prefix

    def _key(self, room: str) -> str:
        return f"{self.prefix}room:{room}:members"

    async def _entries(self, room: str) -> dict[str, dict[str, Any]]:
        raw = await self._redis.hgetall(self._key(room))
        now = time.time()
        entries = {k: json.loads(v) for k, v in raw.items()}
        stale = [k for k, e in entries.items() if e["expires"] <= now]
        if stale:
            await self._redis.hdel(self._key(room), *stale)
            for k in stale:
                del entries[k]
        return entries

    async def add(self, room: str, conn: str, user: str) -> tuple[Members, bool]:
        try:
            before = await self._entries(room)
            entry = {"user": user, "expires": time.time() + self.ttl_s}
            await self._redis.hset(self._key(room), conn, json.dumps(entry))
            await self._redis.expire(self._key(room), int(self.ttl_s * 4) + 1)
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for presence ({exc})") from exc
        new_user = all(e["user"] != user for e in before.values())
        return _members({**before, conn: entry}, time.time()), new_user

    async def remove(self, room: str, conn: str) -> tuple[Members, bool]:
        try:
            entries = await self._entries(room)
            gone = entries.pop(conn, None)
            await self._redis.hdel(self._key(room), conn)
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for presence ({exc})") from exc
        user_left = gone is not None and all(e["user"] != gone["user"] for e in entries.values())
        return _members(entries, time.time()), user_left

    async def members(self, room: str) -> Members:
        try:
            return _members(await self._entries(room), time.time())
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for presence ({exc})") from exc

    async def refresh(self, room: str, conns: dict[str, str]) -> tuple[Members, list[str]]:
        """Extend this instance's entries; returns the members and users whose every entry
        expired (a dead instance's connections) so a ``presence`` event can say they left."""
        try:
            before = await self._redis.hgetall(self._key(room))
            users_before = {json.loads(v)["user"] for v in before.values()}
            entries = await self._entries(room)
            expires = time.time() + self.ttl_s
            if conns:
                mapping = {c: json.dumps({"user": u, "expires": expires}) for c, u in conns.items()}
                await self._redis.hset(self._key(room), mapping=mapping)
                await self._redis.expire(self._key(room), int(self.ttl_s * 4) + 1)
                for c, u in conns.items():
                    entries[c] = {"user": u, "expires": expires}
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for presence ({exc})") from exc
        members = _members(entries, time.time())
        present = {m["user"] for m in members}
        return members, sorted(users_before - present)

    async def aclose(self) -> None:
        await self._redis.aclose()


class LocalPresence:
    def __init__(self) -> None:
        self._rooms: dict[str, dict[str, dict[str, Any]]] = {}

    async def add(self, room: str, conn: str, user: str) -> tuple[Members, bool]:
        entries = self._rooms.setdefault(room, {})
        new_user = all(e["user"] != user for e in entries.values())
        entries[conn] = {"user": user, "expires": float("inf")}
        return _members(entries, time.time()), new_user

    async def remove(self, room: str, conn: str) -> tuple[Members, bool]:
        entries = self._rooms.get(room, {})
        gone = entries.pop(conn, None)
        user_left = gone is not None and all(e["user"] != gone["user"] for e in entries.values())
        return _members(entries, time.time()), user_left

    async def members(self, room: str) -> Members:
        return _members(self._rooms.get(room, {}), time.time())

    async def refresh(self, room: str, conns: dict[str, str]) -> tuple[Members, list[str]]:
        return await self.members(room), []

    async def aclose(self) -> None:
        return None
