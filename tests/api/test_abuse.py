"""Abuse limits and hostile input on the real app (real Redis, real retrieval, FakeLLM):
per-user rate limits shared by two app instances, caps on connections and on concurrent
answers, floods of bad events, oversize frames, HTML in every field, and the send queue that
coalesces tokens for a slow reader."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from rag_chat.api.deps import dumps
from rag_chat.api.ws import BAD_EVENTS_LIMIT, CLOSE_POLICY, Flood, Outbox
from rag_chat.llm.fake import FakeLLM
from rag_chat.settings import Settings


def until(ws: WebSocketTestSession, *types: str) -> dict[str, Any]:
    while True:
        event: dict[str, Any] = ws.receive_json()
        if event["type"] in (*types, "error"):
            return event


def test_rate_limit_is_per_user_shared_by_instances_and_loses_nothing(
    make_app: Any, server_settings: Settings
) -> None:
    settings = server_settings.model_copy(update={"rate_limit_per_minute": 3})
    llm = FakeLLM()
    # two app instances over one Redis: the budget is the user's, not the instance's
    with (
        TestClient(make_app(llm, settings)) as one,
        TestClient(make_app(llm, settings)) as two,
        one.websocket_connect("/ws") as ws,
    ):
        ws.send_json({"type": "join", "room": "limits"})
        until(ws, "joined")
        for i in range(2):
            ws.send_json({"type": "message", "room": "limits", "text": f"hello {i}"})
            assert until(ws, "message")["text"] == f"hello {i}"
        r = two.post("/api/search", json={"query": "x"})  # not a message: not counted
        assert r.status_code == 200
        llm.enqueue(["ok"])
        r = two.post("/api/chat", json={"message": "third, on the other instance"})
        assert r.status_code == 200
        ws.send_json({"type": "message", "room": "limits", "text": "fourth", "client_id": "c4"})
        event = until(ws, "message")
        assert event["code"] == "rate_limited" and event["event"] == "message"
        assert 0 < event["retry_after"] <= 60 and "at most 3" in event["message"]
        r = two.post("/api/chat", json={"message": "fifth"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        r = two.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "6"}]})
        assert r.status_code == 429 and "retry-after" in r.headers
        # the refused message was not posted and its client_id was not taken: nothing lost
        ws.send_json({"type": "ping"})
        assert until(ws, "pong", "message")["type"] == "pong"
        history = one.get("/api/conversations/limits/messages").json()["messages"]
        assert [m["content"] for m in history] == ["hello 0", "hello 1"]


def test_refused_message_can_be_resent_with_the_same_client_id(
    make_app: Any, server_settings: Settings
) -> None:
    settings = server_settings.model_copy(update={"max_replies_per_user": 1})
    llm = FakeLLM(delay=0.02)
    with TestClient(make_app(llm, settings)) as client, client.websocket_connect("/ws") as ws:
        llm.enqueue(["tok "] * 60)
        ws.send_json({"type": "message", "text": "first", "conversation_id": "conv-a"})
        first = until(ws, "ai.start")
        assert first["type"] == "ai.start"
        # a second answer at the same time is one too many for this user
        ws.send_json(
            {"type": "message", "text": "second", "conversation_id": "conv-b", "client_id": "k2"}
        )
        event = until(ws, "ai.start")
        assert event["code"] == "too_many_replies" and event["retry_after"] > 0
        assert until(ws, "ai.done")["message_id"] == first["message_id"]
        # once the first finished, the very same send (same client_id) goes through
        llm.enqueue(["second answer"])
        ws.send_json(
            {"type": "message", "text": "second", "conversation_id": "conv-b", "client_id": "k2"}
        )
        start = until(ws, "ai.start")
        assert start["type"] == "ai.start" and start["conversation_id"] == "conv-b"
        assert until(ws, "ai.done")["finish_reason"] == "stop"


def test_connections_per_user_are_capped(make_app: Any, server_settings: Settings) -> None:
    settings = server_settings.model_copy(update={"max_connections_per_user": 2})
    with TestClient(make_app(FakeLLM(), settings)) as client:
        with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
            for ws in (a, b):  # a pong means the connection holds its lease
                ws.send_json({"type": "ping"})
                assert ws.receive_json() == {"type": "pong"}
            with client.websocket_connect("/ws") as c:
                event = c.receive_json()
                assert event["code"] == "too_many_connections"
                with pytest.raises(WebSocketDisconnect) as info:
                    c.receive_json()
                assert info.value.code == CLOSE_POLICY
            for ws in (a, b):  # the others are untouched
                ws.send_json({"type": "ping"})
                assert ws.receive_json() == {"type": "pong"}
        with client.websocket_connect("/ws") as d:  # closed ones gave their slots back
            d.send_json({"type": "ping"})
            assert d.receive_json() == {"type": "pong"}


def test_a_flood_of_bad_events_is_closed_with_a_policy_code(make_app: Any) -> None:
    with TestClient(make_app(FakeLLM())) as client:
        with client.websocket_connect("/ws") as ws:
            errors = 0
            with pytest.raises(WebSocketDisconnect) as info:
                for _ in range(BAD_EVENTS_LIMIT * 3):
                    ws.send_text("{not json")
                for _ in range(BAD_EVENTS_LIMIT * 3):
                    assert ws.receive_json()["code"] == "bad_request"
                    errors += 1
            assert info.value.code == CLOSE_POLICY
            assert errors == BAD_EVENTS_LIMIT + 1  # every bad event before the close was answered
        # a few bad events are fine: the connection stays
        with client.websocket_connect("/ws") as ws:
            for _ in range(BAD_EVENTS_LIMIT):
                ws.send_text("[]")
                assert ws.receive_json()["code"] == "bad_request"
            ws.send_json({"type": "ping"})
            assert ws.receive_json() == {"type": "pong"}


def test_no_unescaped_html_leaves_the_server(make_app: Any) -> None:
    evil = "<script>alert(1)</script><img src=x onerror=alert(1)>&amp;"
    llm = FakeLLM()
    with TestClient(make_app(llm)) as client:
        with client.websocket_connect("/ws") as ws:
            frames = []
            llm.enqueue([evil])
            ws.send_json({"type": "message", "text": evil, "client_id": evil[:100]})
            ws.send_json({"type": evil})
            ws.send_json({"type": "join", "room": evil})
            while len(frames) < 50:
                frame = ws.receive_text()
                frames.append(frame)
                if '"ai.done"' in frame:
                    break
            ws.send_json({"type": "ping"})
            while (frame := ws.receive_text()) != '{"type":"pong"}':
                frames.append(frame)
        assert any("ai.token" in f for f in frames)
        decoded = [json.loads(f) for f in frames]
        assert any(e.get("delta") == evil for e in decoded)  # the same text, as data
        assert any(e.get("text") == evil for e in decoded)
        for frame in frames:
            assert "<" not in frame and ">" not in frame, frame
        responses = [
            client.post("/api/search", json={"query": evil}),
            client.post("/api/search", json={"query": evil, "k": evil}),
            client.get(f"/api/conversations/{evil}/messages"),
            client.post("/api/chat", content=evil, headers={"content-type": "application/json"}),
            client.get("/no/such/<script>"),
        ]
        llm.enqueue([evil])
        responses.append(
            client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": evil}]}
            )
        )
        llm.enqueue([evil])
        responses.append(client.post("/api/chat", json={"message": evil}))
        for r in responses:
            assert "<script" not in r.text and "<img" not in r.text, (r.request.url, r.text[:300])
            assert r.headers.get_list("x-content-type-options") == ["nosniff"]
            assert r.headers.get_list("referrer-policy") == ["no-referrer"]
            assert not r.headers["content-type"].startswith("text/html")


def test_dumps_escapes_markup_but_keeps_the_value() -> None:
    value = {"t": "<b>&</b>", "u": "ünï"}
    text = dumps(value)
    assert "<" not in text and "&" not in text and "ünï" in text
    assert json.loads(text) == value


# --- the send queue ---


def token(n: int, message_id: str = "m1", delta: str = "x") -> dict[str, Any]:
    return {"type": "ai.token", "message_id": message_id, "delta": delta, "room": "r", "seq": n}


async def test_outbox_sends_every_token_while_the_reader_keeps_up() -> None:
    out = Outbox()
    for n in range(1, 40):
        assert out.put(token(n))
    assert len(out) == 39 and out.coalesced == 0


async def test_outbox_coalesces_tokens_waiting_side_by_side() -> None:
    out = Outbox(max_events=10, max_chars=100_000, coalesce_after=0)
    assert out.put({"type": "ai.start", "message_id": "m1", "room": "r", "seq": 1})
    for n in range(2, 1002):  # 1,000 tokens while the reader is away
        assert out.put(token(n, delta=f"{n} "))
    assert out.put(token(1002, message_id="m2", delta="other"))
    assert out.put({"type": "typing", "room": "r", "seq": 1003})
    assert out.put(token(1004, delta="after"))
    assert len(out) == 5 and out.coalesced == 999
    start = await out.get()
    merged = await out.get()
    assert start is not None and merged is not None
    assert start["type"] == "ai.start"
    assert merged["delta"] == "".join(f"{n} " for n in range(2, 1002))
    assert merged["seq"] == 1001  # the newest: resume from it misses nothing
    assert (await out.get())["delta"] == "other"  # other answers are never mixed in
    assert (await out.get())["type"] == "typing"
    assert (await out.get())["delta"] == "after"  # order is kept
    assert len(out) == 0 and out.chars == 0


def test_outbox_says_when_a_reader_is_hopeless() -> None:
    out = Outbox(max_events=3, max_chars=10_000, coalesce_after=0)
    assert all(out.put({"type": "typing", "seq": n}) for n in range(3))
    assert not out.put({"type": "typing", "seq": 4})  # too many events
    out = Outbox(max_events=100, max_chars=2_000, coalesce_after=0)
    assert out.put(token(1))
    assert not out.put(token(2, delta="y" * 2_000))  # too many characters, even coalesced


def test_flood_window_forgets_old_bad_events(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr("rag_chat.api.ws.time.monotonic", lambda: now[0])
    flood = Flood(limit=3, window_s=10)
    assert not any(flood.bad() for _ in range(3))
    now[0] = 11.0
    assert not any(flood.bad() for _ in range(3))
    assert flood.bad()
