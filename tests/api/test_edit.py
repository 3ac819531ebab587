"""Edit: one's latest message changed, and a question answered again, over the WebSocket and
over HTTP. Real Redis (room log, memory, limits) and real retrieval; the FakeLLM scripts the
answers and records the prompts."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from rag_chat.llm.fake import FakeLLM
from rag_chat.settings import Settings
from tests.api.wire import answer, fail_next_retrieval, sse, until

pytestmark = pytest.mark.timeout(60)


def edit(room: str, message_id: str, text: str, **more: Any) -> dict[str, Any]:
    return {"type": "edit", "room": room, "message_id": message_id, "text": text, **more}


def prompt_text(call: list[dict[str, Any]]) -> str:
    return " ".join(m["content"] for m in call)


def test_an_edited_question_is_answered_again_in_place(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["The server ", "listens on 8000."])
    llm.enqueue(["Redis ", "runs on 6379."])
    llm.enqueue(["Yes."])
    with TestClient(make_app(llm)) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "conversation_id": "conv-edit", "text": "Which port?"})
        question = until(ws, "message")
        first, _, _ = answer(ws)

        ws.send_json(edit("conv-edit", question["id"], "Which port does Redis use?"))
        edited = until(ws, "message.edited")
        assert (edited["id"], edited["text"], edited["ai"]) == (
            question["id"],
            "Which port does Redis use?",
            True,
        )
        assert edited["seq"] > first["seq"]
        second, text, done = answer(ws)
        assert (second["replaces"], second["reply_to"]) == (first["message_id"], question["id"])
        assert (text, done["type"], done["persisted"]) == ("Redis runs on 6379.", "ai.done", True)
        # written from the new text and the history before the question: nothing of the old
        # question or its answer
        assert "Which port does Redis use?" in llm.calls[1][-1]["content"]
        assert "Which port?" not in prompt_text(llm.calls[1])
        assert "listens on 8000" not in prompt_text(llm.calls[1])
        assert len(llm.calls[1]) == len(llm.calls[0])

        # the conversation keeps the new text and the new answer alone
        stored = client.get("/api/conversations/conv-edit/messages").json()["messages"]
        assert [(m["role"], m["content"]) for m in stored] == [
            ("user", "Which port does Redis use?"),
            ("assistant", "Redis runs on 6379."),
        ]
        assert stored[0]["id"] == question["id"] and stored[0]["edited_at"] >= question["ts"]
        assert stored[1]["id"] == second["message_id"]

        # a follow-up reads the edited question and its answer, not what they replaced
        ws.send_json({"type": "message", "conversation_id": "conv-edit", "text": "Sure?"})
        answer(ws)
        prompt = prompt_text(llm.calls[2])
        assert "Which port does Redis use?" in prompt and "listens on 8000" not in prompt

        # an earlier question is no longer the latest: refused, nothing changes
        ws.send_json(edit("conv-edit", question["id"], "Something else?"))
        error = until(ws, "error", event="edit")
        assert (error["code"], error["message_id"]) == ("conflict", question["id"])
        assert "only the latest message" in error["message"]

        # a rejoin's history shows the edit
        ws.send_json({"type": "join", "room": "conv-edit", "private": True})
        history = until(ws, "joined")["history"]
        assert [m["content"] for m in history] == [
            "Which port does Redis use?",
            "Redis runs on 6379.",
            "Sure?",
            "Yes.",
        ]
        assert "edited_at" in history[0] and "edited_at" not in history[2]
    assert len(llm.calls) == 3


def test_in_a_room_only_the_author_edits_and_only_a_question_is_answered(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["Port 8000."])
    llm.enqueue(["Port 6379."])
    with (
        TestClient(make_app(llm)) as client,
        client.websocket_connect("/ws") as alice,
        client.websocket_connect("/ws") as bob,
    ):
        for ws, name in ((alice, "alice"), (bob, "bob")):
            ws.send_json({"type": "join", "room": "edit-room", "user": name})
            until(ws, "joined")
        bob.send_json(edit("elsewhere", "x", "hi"))
        assert until(bob, "error")["code"] == "not_joined"

        # a message that asks nothing: everyone sees the new text, no answer
        alice.send_json({"type": "message", "room": "edit-room", "text": "helo all"})
        hello = until(alice, "message")
        alice.send_json(edit("edit-room", hello["id"], "hello all"))
        for ws in (alice, bob):
            edited = until(ws, "message.edited")
            assert (edited["id"], edited["user"], edited["text"], edited["ai"]) == (
                hello["id"],
                "alice",
                "hello all",
                False,
            )
        bob.send_json(edit("edit-room", hello["id"], "bob was here"))
        error = until(bob, "error", event="edit")
        assert (error["code"], error["message_id"]) == ("forbidden", hello["id"])

        # a question: bob's reply after it does not stop alice editing it (no answer replies
        # to bob's), and the new answer replaces the old for both
        alice.send_json({"type": "message", "room": "edit-room", "text": "@ai which port?"})
        asked = until(alice, "message")
        first, _, _ = answer(alice)
        answer(bob)
        bob.send_json({"type": "message", "room": "edit-room", "text": "good question"})
        until(alice, "message", user="bob")
        alice.send_json(edit("edit-room", asked["id"], "@ai which port does Redis use?"))
        for ws in (alice, bob):
            assert until(ws, "message.edited")["ai"] is True
            second, text, _ = answer(ws)
            assert (second["replaces"], text) == (first["message_id"], "Port 6379.")

        # alice's first message is no longer her latest; an answer is not a message to edit
        alice.send_json(edit("edit-room", hello["id"], "hi"))
        assert until(alice, "error", event="edit")["code"] == "conflict"
        alice.send_json(edit("edit-room", second["message_id"], "hi"))
        error = until(alice, "error", event="edit")
        assert error["code"] == "bad_request" and "regenerate" in error["message"]
        alice.send_json(edit("edit-room", "no-such-message", "hi"))
        assert until(alice, "error", event="edit")["code"] == "not_found"

        # edited again while its new answer streams: refused
        llm.delay = 0.05
        llm.enqueue([f"t{i} " for i in range(40)])
        alice.send_json(edit("edit-room", asked["id"], "@ai and Postgres?"))
        third = until(alice, "ai.start")
        alice.send_json(edit("edit-room", asked["id"], "@ai and MariaDB?"))
        assert until(alice, "error", event="edit")["code"] == "conflict"
        until(alice, "ai.done", message_id=third["message_id"])

        # bad input: one line each, the connection stays usable
        alice.send_json({"type": "edit", "room": "edit-room", "message_id": asked["id"]})
        assert "text" in until(alice, "error")["message"]
        alice.send_json(edit("edit-room", asked["id"], "x" * 8001))
        assert "text" in until(alice, "error")["message"]
        alice.send_json(edit("edit-room", asked["id"], " \n "))
        error = until(alice, "error", event="edit")
        assert (error["code"], error["message"]) == ("bad_request", "text must not be empty")
        alice.send_json({"type": "ping"})
        until(alice, "pong")

        stored = client.get("/api/conversations/edit-room/messages").json()["messages"]
        # the new answer where the first one was, before bob's reply
        assert [(m["role"], m["content"]) for m in stored] == [
            ("user", "hello all"),
            ("user", "@ai and Postgres?"),
            ("assistant", "".join(f"t{i} " for i in range(40))),
            ("user", "good question"),
        ]
    assert len(llm.calls) == 3


def test_an_edit_that_asks_counts_as_a_question(make_app: Any, server_settings: Settings) -> None:
    settings = server_settings.model_copy(update={"rate_limit_per_minute": 2})
    llm = FakeLLM()
    with TestClient(make_app(llm, settings)) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "conversation_id": "conv-limit", "text": "Which port?"})
        question = until(ws, "message")
        answer(ws)
        ws.send_json(edit("conv-limit", question["id"], "Which host?"))
        answer(ws)
        ws.send_json(edit("conv-limit", question["id"], "Which user?"))
        error = until(ws, "error", event="edit")
        assert error["code"] == "rate_limited" and error["retry_after"] > 0
        # refused before anything was written: the text is the last accepted edit
        stored = client.get("/api/conversations/conv-limit/messages").json()["messages"]
        assert stored[0]["content"] == "Which host?"
    assert len(llm.calls) == 2


def test_over_http_the_edit_and_its_answer_stream(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["First."])
    llm.enqueue(["Second."])
    llm.enqueue(["Edited ", "answer."])
    with TestClient(make_app(llm)) as client:
        first = next(
            e
            for e in sse(client, "/api/chat", {"message": "Which port?"})
            if e["type"] == "ai.start"
        )
        conv = first["conversation_id"]
        body = {"message": "And Redis?", "conversation_id": conv}
        old_answer = next(e for e in sse(client, "/api/chat", body) if e["type"] == "ai.start")
        latest = {"id": old_answer["reply_to"]}

        url = f"/api/conversations/{conv}/messages/{latest['id']}"
        events = sse(client, url, {"message": "And Postgres?"}, method="PATCH")
        kinds = [e["type"] for e in events if e["type"] != "presence"]
        assert kinds == [
            "message.edited",
            "ai.start",
            "ai.sources",
            "ai.token",
            "ai.token",
            "ai.done",
        ]
        edited = next(e for e in events if e["type"] == "message.edited")
        assert (edited["id"], edited["text"], edited["ai"]) == (latest["id"], "And Postgres?", True)
        new = next(e for e in events if e["type"] == "ai.start")
        assert new["replaces"] == old_answer["message_id"]
        stored = client.get(f"/api/conversations/{conv}/messages").json()["messages"]
        assert [m["content"] for m in stored] == [
            "Which port?",
            "First.",
            "And Postgres?",
            "Edited answer.",
        ]

        # refusals: one line each, nothing streamed, nothing changed
        older = client.patch(
            f"/api/conversations/{conv}/messages/{first['reply_to']}", json={"message": "x"}
        )
        assert older.status_code == 409 and older.json()["error"]["code"] == "conflict"
        assert client.patch(url, json={}).status_code == 422
        assert client.patch(url, json={"message": ""}).status_code == 422
        blank = client.patch(url, json={"message": "  "})
        assert blank.status_code == 400 and blank.json()["error"]["code"] == "bad_request"
        surrogate = client.patch(
            url,
            content=b'{"message": "hi \\ud800"}',
            headers={"content-type": "application/json"},
        )
        assert surrogate.status_code == 422, surrogate.text
        assert "unicode" in surrogate.json()["error"]["message"]
        missing = client.patch("/api/conversations/nobody-here/messages/x", json={"message": "x"})
        assert missing.status_code == 404
        assert client.get(f"/api/conversations/{conv}/messages").json()["messages"] == stored
    assert len(llm.calls) == 3


def test_a_question_whose_answer_failed_is_answered_in_the_failed_ones_place(
    make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = FakeLLM()
    llm.enqueue(["Port 8000."])
    with TestClient(make_app(llm)) as client, client.websocket_connect("/ws") as ws:
        fail_next_retrieval(client, monkeypatch)
        ws.send_json({"type": "message", "conversation_id": "conv-failed", "text": "Wich port?"})
        question = until(ws, "message")
        first = until(ws, "ai.start")
        assert until(ws, "error", message_id=first["message_id"])["code"] == "retrieval_error"

        ws.send_json(edit("conv-failed", question["id"], "Which port?"))
        second, text, done = answer(ws)
        assert (second["replaces"], second["reply_to"]) == (first["message_id"], question["id"])
        assert (text, done["persisted"]) == ("Port 8000.", True)
        stored = client.get("/api/conversations/conv-failed/messages").json()["messages"]
        assert [(m["role"], m["content"]) for m in stored] == [
            ("user", "Which port?"),
            ("assistant", "Port 8000."),
        ]
