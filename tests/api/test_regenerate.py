"""Regenerate: the latest answer asked for once more over the WebSocket. Real Redis (room log,
memory, limits) and real retrieval; the FakeLLM scripts the answers and records the prompts."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from rag_chat.llm.fake import FakeLLM
from rag_chat.settings import Settings
from tests.api.wire import answer, fail_next_retrieval, sse, until

pytestmark = pytest.mark.timeout(60)


def regen(room: str, message_id: str) -> dict[str, Any]:
    return {"type": "regenerate", "room": room, "message_id": message_id}


def test_the_new_answer_takes_the_old_ones_place(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["The server ", "listens on 8000."])
    llm.enqueue(["Port ", "8000 [1]."])
    llm.enqueue(["Yes."])
    with TestClient(make_app(llm)) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "conversation_id": "conv-regen", "text": "Which port?"})
        question = until(ws, "message")
        first, text, done = answer(ws)
        assert (text, done["persisted"]) == ("The server listens on 8000.", True)

        ws.send_json(regen("conv-regen", first["message_id"]))
        second, text, done = answer(ws)
        assert second["replaces"] == first["message_id"]
        assert second["reply_to"] == question["id"]
        assert second["message_id"] != first["message_id"]
        assert (text, done["type"], done["persisted"]) == ("Port 8000 [1].", "ai.done", True)
        # written from the same prompt as the first: the history before the question
        assert llm.calls[1] == llm.calls[0]

        # the conversation keeps the new answer alone, in the old one's place
        stored = client.get("/api/conversations/conv-regen/messages").json()["messages"]
        assert [(m["role"], m["content"]) for m in stored] == [
            ("user", "Which port?"),
            ("assistant", "Port 8000 [1]."),
        ]
        assert (stored[1]["id"], stored[1]["reply_to"]) == (second["message_id"], question["id"])

        # the old answer is no longer the latest: refused, nothing else changes
        ws.send_json(regen("conv-regen", first["message_id"]))
        error = until(ws, "error")
        assert (error["code"], error["event"], error["message_id"]) == (
            "conflict",
            "regenerate",
            first["message_id"],
        )
        assert "not the latest answer" in error["message"]

        # a follow-up reads the new answer, not the one it replaced
        ws.send_json({"type": "message", "conversation_id": "conv-regen", "text": "Sure?"})
        answer(ws)
        prompt = " ".join(m["content"] for m in llm.calls[2])
        assert "Port 8000 [1]." in prompt and "listens on 8000" not in prompt

        # a rejoin's history holds the new answer alone
        ws.send_json({"type": "join", "room": "conv-regen", "private": True})
        joined = until(ws, "joined")
        assert [m["content"] for m in joined["history"]] == [
            "Which port?",
            "Port 8000 [1].",
            "Sure?",
            "Yes.",
        ]
    assert len(llm.calls) == 3


def test_only_the_asker_and_only_the_latest_answer_when_nothing_streams(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["Port 8000."])
    with (
        TestClient(make_app(llm)) as client,
        client.websocket_connect("/ws") as alice,
        client.websocket_connect("/ws") as bob,
    ):
        for ws, name in ((alice, "alice"), (bob, "bob")):
            ws.send_json({"type": "join", "room": "regen-room", "user": name})
            until(ws, "joined")
        bob.send_json({"type": "regenerate", "room": "elsewhere", "message_id": "x"})
        assert until(bob, "error")["code"] == "not_joined"

        alice.send_json({"type": "message", "room": "regen-room", "text": "@ai which port?"})
        start, _, _ = answer(alice)
        answer(bob)
        regen = {"type": "regenerate", "room": "regen-room", "message_id": start["message_id"]}

        bob.send_json(regen)
        error = until(bob, "error")
        assert (error["code"], error["event"]) == ("forbidden", "regenerate")

        # asked again while the new answer still streams: refused
        llm.delay = 0.05
        llm.enqueue([f"t{i} " for i in range(40)])
        alice.send_json(regen)
        second = until(alice, "ai.start")
        alice.send_json(
            {"type": "regenerate", "room": "regen-room", "message_id": second["message_id"]}
        )
        assert until(alice, "error", event="regenerate")["code"] == "conflict"
        until(alice, "ai.done", message_id=second["message_id"])

        # someone wrote since: the answer is no longer the latest
        bob.send_json({"type": "message", "room": "regen-room", "text": "thanks"})
        until(alice, "message", user="bob")
        alice.send_json({**regen, "message_id": second["message_id"]})
        error = until(alice, "error", event="regenerate")
        assert error["code"] == "conflict"
        assert "not the latest answer" in error["message"]

        # bad input: one line each, the connection stays usable
        alice.send_json({"type": "regenerate", "room": "regen-room"})
        assert "message_id" in until(alice, "error")["message"]
        alice.send_json({"type": "ping"})
        until(alice, "pong")
    assert len(llm.calls) == 2


def test_regenerating_counts_as_a_question(make_app: Any, server_settings: Settings) -> None:
    settings = server_settings.model_copy(update={"rate_limit_per_minute": 2})
    llm = FakeLLM()
    with TestClient(make_app(llm, settings)) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "conversation_id": "conv-limit", "text": "Which port?"})
        first, _, _ = answer(ws)
        ws.send_json(regen("conv-limit", first["message_id"]))
        second, _, _ = answer(ws)
        ws.send_json(regen("conv-limit", second["message_id"]))
        error = until(ws, "error")
        assert (error["code"], error["event"]) == ("rate_limited", "regenerate")
        assert error["retry_after"] > 0
    assert len(llm.calls) == 2


def test_over_sse_the_answer_streams_and_replaces_the_old_one(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["First."])
    llm.enqueue(["Second ", "answer."])
    with TestClient(make_app(llm)) as client:
        first = sse(client, "/api/chat", {"message": "Which port?"})
        start = next(e for e in first if e["type"] == "ai.start")
        conv = start["conversation_id"]
        url = f"/api/conversations/{conv}/regenerate"
        events = sse(client, url, {"message_id": start["message_id"]})
        kinds = [e["type"] for e in events if e["type"] != "presence"]
        assert kinds == ["ai.start", "ai.sources", "ai.token", "ai.token", "ai.done"]
        assert events[-1]["type"] == "ai.done" and events[-1]["persisted"] is True
        new = next(e for e in events if e["type"] == "ai.start")
        assert new["replaces"] == start["message_id"]
        stored = client.get(f"/api/conversations/{conv}/messages").json()["messages"]
        assert [m["content"] for m in stored] == ["Which port?", "Second answer."]

        # refusals: one line each, nothing streamed, nothing changed
        stale = client.post(url, json={"message_id": start["message_id"]})
        assert stale.status_code == 409 and stale.json()["error"]["code"] == "conflict"
        assert client.post(url, json={}).status_code == 422
        missing = client.post("/api/conversations/nobody-here/regenerate", json={"message_id": "x"})
        assert missing.status_code == 404
        stored_after = client.get(f"/api/conversations/{conv}/messages").json()["messages"]
        assert stored_after == stored
    assert len(llm.calls) == 2


def test_an_answer_that_failed_before_it_was_saved_can_be_asked_again(
    make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = FakeLLM()
    llm.enqueue(["Port 8000."])
    with TestClient(make_app(llm)) as client, client.websocket_connect("/ws") as ws:
        fail_next_retrieval(client, monkeypatch)
        ws.send_json({"type": "message", "conversation_id": "conv-failed", "text": "Which port?"})
        question = until(ws, "message")
        first = until(ws, "ai.start")
        error = until(ws, "error", message_id=first["message_id"])
        assert error["code"] == "retrieval_error"
        stored = client.get("/api/conversations/conv-failed/messages").json()["messages"]
        assert [m["id"] for m in stored] == [question["id"]]  # nothing of the answer saved

        ws.send_json(regen("conv-failed", first["message_id"]))
        second, text, done = answer(ws)
        assert (second["replaces"], second["reply_to"]) == (first["message_id"], question["id"])
        assert (text, done["type"], done["persisted"]) == ("Port 8000.", "ai.done", True)
        stored = client.get("/api/conversations/conv-failed/messages").json()["messages"]
        assert [(m["role"], m["content"]) for m in stored] == [
            ("user", "Which port?"),
            ("assistant", "Port 8000."),
        ]
        # an id that never answered anything here is still refused
        ws.send_json(regen("conv-failed", "never-an-answer"))
        assert until(ws, "error", event="regenerate")["code"] == "conflict"
