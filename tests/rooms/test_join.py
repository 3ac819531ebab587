"""A join's Redis reads go together (real Redis log, presence and memory): the history is
read while the presence entry is added, and the member still gets ``joined`` first, then its
own presence event, then what its room gains."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rag_chat.errors import NotJoined
from rag_chat.memory.redis import RedisMemory
from rag_chat.rooms import Member, RedisPresence, RedisRoomLog
from rag_chat.rooms.presence import Members
from rag_chat.rooms.service import Rooms
from tests.rooms.conftest import REDIS_URL, delete_prefix, new_prefix, until


class _Waiting(RedisPresence):
    """Adds an entry only once the member's history read has started: a join that read the
    history after the presence entry (one round trip after another) would wait forever."""

    def __init__(self, url: str, prefix: str, history_started: asyncio.Event) -> None:
        super().__init__(url, prefix)
        self.history_started = history_started

    async def add(self, room: str, conn: str, user: str) -> Members:
        await asyncio.wait_for(self.history_started.wait(), 5)
        return await super().add(room, conn, user)


class _Noting(RedisMemory):
    started: asyncio.Event

    async def history(self, conversation_id: str, limit: int | None = None) -> Any:
        self.started.set()
        return await super().history(conversation_id, limit)


@contextlib.asynccontextmanager
async def _rooms(
    prefix: str, log: RedisRoomLog, memory: RedisMemory, presence: RedisPresence
) -> AsyncIterator[Rooms]:
    """Rooms over these real Redis parts (no AI asked here), closed and their keys deleted
    afterwards."""
    rooms = Rooms(log, presence, None, memory)  # type: ignore[arg-type]
    await rooms.start()
    try:
        yield rooms
    finally:
        await rooms.stop()
        await presence.aclose()
        await memory.aclose()
        await log.aclose()
        delete_prefix(prefix)


async def test_a_join_reads_history_and_adds_presence_together() -> None:
    prefix = new_prefix()
    log = RedisRoomLog(REDIS_URL, prefix)
    memory = _Noting.from_url(REDIS_URL, prefix=prefix)
    memory.started = asyncio.Event()
    presence = _Waiting(REDIS_URL, prefix, memory.started)
    async with _rooms(prefix, log, memory, presence) as rooms:
        await log.append("r", {"type": "message", "id": "old", "text": "before the join"})
        got: list[dict[str, Any]] = []
        sub = await rooms.join(Member("c1", "alice"), "r", None, got.append)
        assert got[0]["type"] == "joined"
        assert got[0]["members"] == [{"user": "alice", "connections": 1}]
        assert got[0]["last_seq"] == 1
        await until(lambda: len(got) >= 2)
        assert got[1]["type"] == "presence" and got[1]["user"] == "alice"
        assert got[1]["seq"] == 2  # after the head the join read, so it is in the stream
        await log.append("r", {"type": "message", "id": "new", "text": "after"})
        await until(lambda: len(got) >= 3)
        assert [e["seq"] for e in got[1:]] == [2, 3] and sub.last == 3


class _Slow(RedisPresence):
    """Holds the presence entry of room "slow" until ``go`` is set: a join half done."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(url, prefix)
        self.go = asyncio.Event()
        self.holding = asyncio.Event()

    async def add(self, room: str, conn: str, user: str) -> Members:
        if room == "slow":
            self.holding.set()
            await self.go.wait()
        return await super().add(room, conn, user)


async def test_leaving_everything_releases_a_connections_rooms_and_only_its_own() -> None:
    """What a closing connection held, joins still under way included, is released; the
    others in its rooms stay (leave_all looks only at the connection's own rooms)."""
    prefix = new_prefix()
    log = RedisRoomLog(REDIS_URL, prefix)
    memory = RedisMemory.from_url(REDIS_URL, prefix=prefix)
    presence = _Slow(REDIS_URL, prefix)
    alice, bob = Member("c1", "alice"), Member("c2", "bob")
    async with _rooms(prefix, log, memory, presence) as rooms:
        for room in ("r1", "r2"):
            await rooms.join(alice, room, None, lambda e: None)
        await rooms.join(bob, "r1", None, lambda e: None)
        half = asyncio.ensure_future(rooms.join(alice, "slow", None, lambda e: None))
        try:
            await asyncio.wait_for(presence.holding.wait(), 5)
            await rooms.leave_all(alice)
            assert [m["user"] for m in await presence.members("r1")] == ["bob"]
            assert await presence.members("r2") == []
            assert not any(rooms.is_member(alice, r) for r in ("r1", "r2", "slow"))
            assert rooms.is_member(bob, "r1")
            assert "c1" not in rooms._local.get("slow", {})  # the half-done join's claim, too
        finally:
            half.cancel()  # what a closing connection does with its joins under way
            # (or the join saw the leave itself, if its subscription came after it)
            with contextlib.suppress(asyncio.CancelledError, NotJoined):
                await half
        await rooms.leave_all(alice)  # nothing left: a no-op
        assert await presence.members("slow") == []
        assert [m["user"] for m in await presence.members("r1")] == ["bob"]


async def test_a_join_whose_subscription_comes_after_the_connection_left_keeps_nothing() -> None:
    """leave_all while a join waits for its subscription: the join, once subscribed, sees
    that its connection left, undoes it and says so; nothing of it stays (before, its
    subscription stayed registered for a connection that was gone)."""
    prefix = new_prefix()
    log = RedisRoomLog(REDIS_URL, prefix)
    memory = RedisMemory.from_url(REDIS_URL, prefix=prefix)
    presence = RedisPresence(REDIS_URL, prefix)
    alice = Member("c1", "alice")
    async with _rooms(prefix, log, memory, presence) as rooms:
        subscribing, go = asyncio.Event(), asyncio.Event()
        subscribe = rooms.hub.subscribe

        async def held(*args: Any, **kwargs: Any) -> Any:
            subscribing.set()
            await go.wait()
            return await subscribe(*args, **kwargs)

        rooms.hub.subscribe = held  # type: ignore[method-assign]
        join = asyncio.ensure_future(rooms.join(alice, "r", None, lambda e: None))
        try:
            await asyncio.wait_for(subscribing.wait(), 5)
            await rooms.leave_all(alice)
            go.set()
            with pytest.raises(NotJoined, match="while joining"):
                await asyncio.wait_for(join, 5)
        finally:
            join.cancel()
        assert not rooms.is_member(alice, "r")
        assert rooms.hub.local_subscribers("r") == 0
        assert "c1" not in rooms._local.get("r", {})
        assert await presence.members("r") == []
