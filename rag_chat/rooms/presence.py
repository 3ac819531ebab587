"""Who is in a room: one entry per connection, with an expiry its instance keeps refreshing.

Redis: the hash ``{prefix}room:{room}:members`` maps a connection id to ``{user, expires}``.
Every operation is one Lua script that, atomically: drops expired entries, applies the add,
remove or refresh, and appends the ``presence`` join/leave events it implies to the room's log,
with the same seq counter as every other room event (and publishes them on the live channel,
as :mod:`rag_chat.rooms.log` does). So a user hopping between instances yields
exactly one join and one leave, and a crashed instance's users get their leave from whichever
operation first sees their entries expired.

A refresh extends its instance's entries and puts back those that are gone although their
connections are still open (Redis was down or restarted for longer than the TTL, or lost the
key): silently when the user's stale entry was still there (nobody was told they left), with a
join event when their leave was already announced. The caller removes again any connection
that left while its refresh was on the way (:meth:`Rooms._refresh_presence`).
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from redis.exceptions import RedisError

from rag_chat.errors import MemoryUnavailable
from rag_chat.rooms.log import LOG_MAXLEN, LOG_TTL_S, LocalRoomLog, live_channel, redis_client

PRESENCE_TTL_S = 30.0  # an entry not refreshed for this long is gone (its instance died)

Members = list[dict[str, Any]]  # [{"user": "alice", "connections": 2}, ...] sorted by user

_PRESENCE = """
local op, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local raw = redis.call('HGETALL', KEYS[1])
local live, before_any, before_live, restored = {}, {}, {}, {}
for i = 1, #raw, 2 do
  local e = cjson.decode(raw[i + 1])
  before_any[e.user] = true
  if e.expires > now then
    live[raw[i]] = e
    before_live[e.user] = true
  else
    redis.call('HDEL', KEYS[1], raw[i])
  end
end
if op == 'add' then
  local e = {user = ARGV[8], expires = now + ttl}
  live[ARGV[9]] = e
  redis.call('HSET', KEYS[1], ARGV[9], cjson.encode(e))
elseif op == 'remove' then
  live[ARGV[9]] = nil
  redis.call('HDEL', KEYS[1], ARGV[9])
elseif op == 'refresh' then
  for i = 9, #ARGV, 2 do
    local e = live[ARGV[i]]
    if not e then
      e = {user = ARGV[i + 1]}
      live[ARGV[i]] = e
      if not before_any[e.user] then restored[e.user] = true end
    end
    e.expires = now + ttl
    redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(e))
  end
end
redis.call('EXPIRE', KEYS[1], math.ceil(ttl * 4) + 1)
local counts, names = {}, {}
for _, e in pairs(live) do
  if not counts[e.user] then counts[e.user] = 0; table.insert(names, e.user) end
  counts[e.user] = counts[e.user] + 1
end
table.sort(names)
local parts = {}
for _, u in ipairs(names) do
  table.insert(parts, '{"user":' .. cjson.encode(u) .. ',"connections":' .. counts[u] .. '}')
end
local members = '[' .. table.concat(parts, ',') .. ']'
local function announce(action, user)
  local seq = redis.call('INCR', KEYS[3])
  local ev = '{"type":"presence","action":"' .. action .. '","user":' .. cjson.encode(user)
    .. ',"members":' .. members .. ',"ts":' .. ARGV[2] .. '}'
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], seq .. '-0', 'e', ev)
  redis.call('PUBLISH', ARGV[6], ARGV[7] .. '\\n' .. (seq - 1) .. '\\n' .. ev)
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
if op == 'add' and not before_live[ARGV[8]] then announce('join', ARGV[8]) end
local back = {}
for u, _ in pairs(restored) do table.insert(back, u) end
table.sort(back)
for _, u in ipairs(back) do announce('join', u) end
local left = {}
for u, _ in pairs(before_any) do if not counts[u] then table.insert(left, u) end end
table.sort(left)
for _, u in ipairs(left) do announce('leave', u) end
return members
"""


class Presence(Protocol):
    """Each call also appends the presence events it implies to the room's log."""

    async def add(self, room: str, conn: str, user: str) -> Members: ...

    async def remove(self, room: str, conn: str) -> Members: ...

    async def members(self, room: str) -> Members: ...

    async def refresh(self, room: str, conns: dict[str, str]) -> Members: ...

    async def aclose(self) -> None: ...


class RedisPresence:
    def __init__(self, url: str, prefix: str = "rag:", ttl_s: float = PRESENCE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._redis: Any = redis_client(url, socket_connect_timeout=2, socket_timeout=5)
        self.prefix = prefix
        self._script = self._redis.register_script(_PRESENCE)

    async def _run(self, op: str, room: str, user: str = "", *conns: str) -> Members:
        p = f"{self.prefix}room:{room}"
        try:
            raw = await self._script(
                keys=[f"{p}:members", f"{p}:log", f"{p}:seq"],
                args=[
                    op,
                    repr(time.time()),
                    self.ttl_s,
                    LOG_MAXLEN,
                    LOG_TTL_S,
                    live_channel(self.prefix),
                    room,
                    user,
                    *conns,
                ],
            )
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for presence ({exc})") from exc
        members: Members = json.loads(raw)
        return members

    async def add(self, room: str, conn: str, user: str) -> Members:
        return await self._run("add", room, user, conn)

    async def remove(self, room: str, conn: str) -> Members:
        return await self._run("remove", room, "", conn)

    async def members(self, room: str) -> Members:
        return await self._run("read", room)

    async def refresh(self, room: str, conns: dict[str, str]) -> Members:
        """Extend the entries of ``conns`` ({conn: user}); put back those that are gone."""
        pairs = [x for conn, user in conns.items() for x in (conn, user)]
        return await self._run("refresh", room, "", *pairs)

    async def aclose(self) -> None:
        await self._redis.aclose()


class LocalPresence:
    """The single-process version: the same decisions, made without an await in between."""

    def __init__(self, room_log: LocalRoomLog) -> None:
        self._log = room_log
        self._rooms: dict[str, dict[str, str]] = {}

    def _members(self, room: str) -> Members:
        counts: dict[str, int] = {}
        for user in self._rooms.get(room, {}).values():
            counts[user] = counts.get(user, 0) + 1
        return [{"user": u, "connections": n} for u, n in sorted(counts.items())]

    async def add(self, room: str, conn: str, user: str) -> Members:
        entries = self._rooms.setdefault(room, {})
        new_user = user not in entries.values()
        entries[conn] = user
        members = self._members(room)
        if new_user:
            await self._log.append(
                room, {"type": "presence", "action": "join", "user": user, "members": members}
            )
        return members

    async def remove(self, room: str, conn: str) -> Members:
        entries = self._rooms.get(room, {})
        user = entries.pop(conn, None)
        if not entries:
            self._rooms.pop(room, None)
        members = self._members(room)
        if user is not None and user not in entries.values():
            await self._log.append(
                room, {"type": "presence", "action": "leave", "user": user, "members": members}
            )
        return members

    async def members(self, room: str) -> Members:
        return self._members(room)

    async def refresh(self, room: str, conns: dict[str, str]) -> Members:
        return self._members(room)

    async def aclose(self) -> None:
        return None
