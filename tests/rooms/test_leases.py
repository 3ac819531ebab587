"""Answer leases: an answer streaming on an instance that dies is ended by another instance.
Real Redis; tests/rooms/test_multi_instance.py kills a real server mid-answer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rag_chat.rooms import RedisRoomLog, Rooms
from tests.rooms.conftest import REDIS_URL, delete_prefix, new_prefix

pytestmark = pytest.mark.timeout(30)


async def test_a_lapsed_lease_is_handed_out_once_and_a_released_one_never() -> None:
    prefix = new_prefix()
    log = RedisRoomLog(REDIS_URL, prefix)
    try:
        await log.hold_replies([("r", "a1", "q1"), ("r", "a2", "q2"), ("s", "a3", "q3")], 0.3)
        await log.release_reply(("r", "a2", "q2"))
        assert await log.lapsed_replies() == []  # not yet
        await asyncio.sleep(0.5)
        assert sorted(await log.lapsed_replies()) == [("r", "a1", "q1"), ("s", "a3", "q3")]
        assert await log.lapsed_replies() == []  # each to one caller only
        # taken again before it lapses: still held
        await log.hold_replies([("r", "a4", "q4")], 0.3)
        await asyncio.sleep(0.2)
        await log.hold_replies([("r", "a4", "q4")], 0.3)
        await asyncio.sleep(0.2)
        assert await log.lapsed_replies() == []
    finally:
        await log.aclose()
        delete_prefix(prefix)


async def test_only_an_answer_still_open_is_ended_and_ours_are_held_again() -> None:
    prefix = new_prefix()
    log = RedisRoomLog(REDIS_URL, prefix)
    rooms = Rooms(log, presence=None, chat=None, memory=None, presence_ttl_s=0.2)  # type: ignore[arg-type]
    try:
        ai: dict[str, Any] = {"user": "ai", "conversation_id": "r"}
        for event in (
            {"type": "ai.start", "message_id": "done", "reply_to": "q1", **ai},
            {"type": "ai.token", "message_id": "done", "delta": "x", **ai},
            {"type": "ai.done", "message_id": "done", "finish_reason": "stop", **ai},
            {"type": "ai.start", "message_id": "open", "reply_to": "q2", **ai},
            {"type": "ai.token", "message_id": "open", "delta": "y", **ai},
            {"type": "ai.start", "message_id": "quiet", "reply_to": "q3", **ai},
            {"type": "ai.start", "message_id": "ours", "reply_to": "q4", **ai},
        ):
            await log.append("r", event)
        # "done" ended but its lease was never released (Redis was away then); "open" and
        # "quiet" were streaming on an instance that died; "ours" runs here (a late renewal)
        leases = [("r", m, q) for m, q in (("done", "q1"), ("open", "q2"), ("quiet", "q3"))]
        await log.hold_replies([*leases, ("r", "ours", "q4")], 0.2)
        rooms._leases["ours"] = ("r", "ours", "q4")
        await asyncio.sleep(0.4)
        head = await log.last_seq("r")
        await rooms._end_lapsed()

        ends = await log.since("r", head)
        assert [(e["type"], e["message_id"], e["partial"], e["reply_to"]) for e in ends] == [
            ("error", "open", True, "q2"),
            ("error", "quiet", False, "q3"),
        ]
        assert {e["code"] for e in ends} == {"internal_error"}
        # ours is held again, the others are gone from the leases
        assert await log.lapsed_replies() == []
        await asyncio.sleep(0.4)
        assert await log.lapsed_replies() == [("r", "ours", "q4")]
    finally:
        await log.aclose()
        delete_prefix(prefix)
