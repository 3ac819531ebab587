"""A join's Redis reads go together (real Redis log, presence and memory): the history is
read while the presence entry is added, and the member still gets ``joined`` first, then its
own presence event, then what its room gains."""

from __future__ import annotations

import asyncio
from typing import Any

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


async def test_a_join_reads_history_and_adds_presence_together() -> None:
    prefix = new_prefix()
    log = RedisRoomLog(REDIS_URL, prefix)
    memory = _Noting.from_url(REDIS_URL, prefix=prefix)
    memory.started = asyncio.Event()
    presence = _Waiting(REDIS_URL, prefix, memory.started)
    rooms = Rooms(log, presence, None, memory)  # type: ignore[arg-type]  # no AI asked here
    await rooms.start()
    try:
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
    finally:
        await rooms.stop()
        await presence.aclose()
        await memory.aclose()
        await log.aclose()
        delete_prefix(prefix)
