"""Rooms in one process: presence, typing, messages, the AI on request, history, cleanup.
Real Redis and retrieval; the FakeLLM scripts the AI. Cross-instance behaviour is tested with
real server processes in tests/rooms/."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rag_chat.llm.fake import FakeLLM
from rag_chat.rooms import LocalRoomLog, RedisRoomLog, RoomHub
from rag_chat.rooms.log import Event, RoomLog
from rag_chat.settings import Settings
from tests.api.wire import until

# a protocol bug shows as a receive that never returns: fail in bounded time
pytestmark = pytest.mark.timeout(60)


def test_two_members_see_presence_messages_typing_and_the_ai(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["Port ", "8000 [1]."])
    with TestClient(make_app(llm)) as client:
        with client.websocket_connect("/ws") as alice, client.websocket_connect("/ws") as bob:
            alice.send_json({"type": "join", "room": "lobby", "user": "alice"})
            joined = until(alice, "joined")
            assert joined["members"] == [{"user": "alice", "connections": 1}]
            assert joined["history"] == [] and joined["room"] == "lobby"
            bob.send_json({"type": "join", "room": "lobby", "user": "bob"})
            assert until(bob, "joined")["members"] == [
                {"user": "alice", "connections": 1},
                {"user": "bob", "connections": 1},
            ]
            seen = until(alice, "presence", user="bob")
            assert seen["action"] == "join"

            bob.send_json({"type": "typing", "room": "lobby", "state": "start"})
            assert until(alice, "typing", user="bob")["state"] == "start"
            bob.send_json({"type": "message", "room": "lobby", "text": "hi all", "client_id": "b1"})
            # the message arrives, and posting ended bob's typing
            msg = until(alice, "message")
            assert (msg["user"], msg["text"], msg["ai"]) == ("bob", "hi all", False)
            assert until(alice, "typing", user="bob")["state"] == "stop"
            assert llm.calls == []  # nobody asked the AI

            alice.send_json({"type": "message", "room": "lobby", "text": "@ai which port?"})
            for ws in (alice, bob):
                start = until(ws, "ai.start")
                done = until(ws, "ai.done")
                assert done["message_id"] == start["message_id"]
                assert done["finish_reason"] == "stop"
            # the AI was asked without the mention, and saw the room's earlier message
            assert llm.calls[0][-1]["content"].endswith("Question: which port?")
            assert any(m["content"] == "hi all" for m in llm.calls[0][:-1])

            bob.send_json({"type": "leave", "room": "lobby"})
            assert until(bob, "left")["room"] == "lobby"
            left = until(alice, "presence", user="bob")
            assert left["action"] == "leave"
            assert left["members"] == [{"user": "alice", "connections": 1}]

        # history comes with the next join: the messages and the AI's answer
        with client.websocket_connect("/ws") as carol:
            carol.send_json({"type": "join", "room": "lobby", "user": "carol"})
            history = until(carol, "joined")["history"]
            assert [(m["role"], m["content"]) for m in history] == [
                ("user", "hi all"),
                ("user", "@ai which port?"),
                ("assistant", "Port 8000 [1]."),
            ]


def test_typing_stops_on_its_own_and_on_disconnect(make_app: Any, monkeypatch: Any) -> None:
    app = make_app(FakeLLM())
    with TestClient(app) as client:
        app.state.services.rooms.typing_ttl_s = 0.3
        with client.websocket_connect("/ws") as alice:
            alice.send_json({"type": "join", "room": "r-typing", "user": "alice"})
            until(alice, "joined")
            with client.websocket_connect("/ws") as bob:
                bob.send_json({"type": "join", "room": "r-typing", "user": "bob"})
                until(bob, "joined")
                bob.send_json({"type": "typing", "room": "r-typing", "state": "start"})
                assert until(alice, "typing", user="bob")["state"] == "start"
                # no refresh: it expires by itself
                assert until(alice, "typing", user="bob")["state"] == "stop"
                bob.send_json({"type": "typing", "room": "r-typing", "state": "start"})
                assert until(alice, "typing", user="bob")["state"] == "start"
            # bob vanished mid-typing: his typing and presence are cleared for the others
            assert until(alice, "typing", user="bob")["state"] == "stop"
            assert until(alice, "presence", user="bob")["action"] == "leave"


def test_room_errors(make_app: Any) -> None:
    with TestClient(make_app(FakeLLM())) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "room": "nowhere", "text": "hello?"})
        event = ws.receive_json()
        assert event["code"] == "not_joined" and "join room 'nowhere' first" in event["message"]
        ws.send_json({"type": "typing", "room": "nowhere", "state": "start"})
        assert ws.receive_json()["code"] == "not_joined"
        ws.send_json({"type": "join", "room": "bad room!"})
        event = ws.receive_json()
        assert event["code"] == "bad_request" and event["message"].startswith("room: String")
        ws.send_json({"type": "typing", "room": "x", "state": "maybe"})
        assert "state: Input should be 'start' or 'stop'" in ws.receive_json()["message"]


def test_rejoin_with_last_seq_replays_exactly_what_was_missed(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue([f"w{i} " for i in range(30)])
    with TestClient(make_app(llm)) as client:
        with client.websocket_connect("/ws") as ref, client.websocket_connect("/ws") as flaky:
            for ws, user in ((ref, "ref"), (flaky, "flaky")):
                ws.send_json({"type": "join", "room": "resume-1", "user": user})
                until(ws, "joined")
            until(ref, "presence", user="flaky")
            ref.send_json({"type": "message", "room": "resume-1", "text": "@ai go", "ai": True})
            got = []
            while len(got) < 8:  # drop in the middle of the answer
                event = flaky.receive_json()
                if "seq" in event:
                    got.append(event)
            reference = []
            while (event := ref.receive_json())["type"] != "ai.done":
                reference.append(event)
            reference.append(event)
        last = got[-1]["seq"]
        with client.websocket_connect("/ws") as again:
            again.send_json({"type": "join", "room": "resume-1", "user": "flaky",
                             "last_seq": last})  # fmt: skip
            until(again, "joined")
            while (event := again.receive_json())["type"] != "ai.done":
                got.append(event)
            got.append(event)

    def key(e: dict[str, Any]) -> tuple[Any, ...]:
        return (e["seq"], e["type"], e.get("delta"))

    tail = [key(e) for e in got if e["seq"] > reference[0]["seq"] - 1]
    # everything the reference saw from the AI is in the resumed transcript, once, in order
    ai_ref = [key(e) for e in reference if e["type"].startswith("ai.")]
    ai_got = [k for k in tail if k[1].startswith("ai.")]
    assert ai_got == ai_ref
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(set(seqs))


def test_thousands_of_connect_disconnect_cycles_leak_nothing(make_app: Any) -> None:
    app = make_app(FakeLLM())
    with TestClient(app) as client:
        rooms = app.state.services.rooms

        def cycle(i: int) -> None:
            with client.websocket_connect("/ws") as ws:
                ws.send_json({"type": "join", "room": f"leak-{i % 5}", "user": f"u{i}"})
                until(ws, "joined")
                ws.send_json({"type": "typing", "room": f"leak-{i % 5}", "state": "start"})

        for i in range(50):  # warm up caches and pools
            cycle(i)
        gc.collect()
        tasks_before = len(client.portal.call(_all_tasks))
        for i in range(1000):
            cycle(i)
        # a closed connection's cleanup finishes in the background: give it a moment
        for _ in range(100):
            if not rooms.hub.subs and not rooms._local:
                break
            time.sleep(0.05)
        for _ in range(100):  # and the tasks that did it have ended
            gc.collect()
            if len(client.portal.call(_all_tasks)) <= tasks_before:
                break
            time.sleep(0.05)
        assert rooms.hub.subs == {} and rooms.hub.cursors == {}
        assert rooms._local == {} and rooms._typing == {} and rooms._subs == {}
        assert len(client.portal.call(_all_tasks)) <= tasks_before
        assert app.state.services.metrics.connections._value.get() == 0


async def _all_tasks() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks()


async def _hub_contract(room_log: RoomLog, room: str) -> None:
    hub = RoomHub(room_log)
    hub.start()
    try:
        for i in range(5):
            await room_log.append(room, {"type": "message", "n": i})
        got_late: list[Event] = []
        got_live: list[Event] = []
        await hub.subscribe(room, None, got_live.append)  # from now on: seq 6 and later
        # a late joiner catches up from seq 2 while others append concurrently
        writer = asyncio.create_task(_append_many(room_log, room, 5, 55))
        await asyncio.sleep(0)
        await hub.subscribe(room, 2, got_late.append)
        await writer
        for _ in range(50):
            if len(got_late) == 53 and len(got_live) == 50:
                break
            await asyncio.sleep(0.05)
        # no gap, no duplicate, in order
        assert [e["seq"] for e in got_late] == list(range(3, 56))
        assert [e["seq"] for e in got_live] == list(range(6, 56))
        assert [e["n"] for e in got_live] == list(range(5, 55))
    finally:
        await hub.stop()


async def _append_many(room_log: RoomLog, room: str, start: int, end: int) -> None:
    for i in range(start, end):
        await room_log.append(room, {"type": "message", "n": i})
        await asyncio.sleep(0)


async def test_hub_contract_local() -> None:
    await _hub_contract(LocalRoomLog(), "contract")


async def test_hub_contract_redis(redis_prefix: str, server_settings: Settings) -> None:
    room_log = RedisRoomLog(server_settings.redis_url, redis_prefix)
    try:
        await _hub_contract(room_log, "contract")
    finally:
        await room_log.aclose()
