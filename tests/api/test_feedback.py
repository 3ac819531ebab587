"""Feedback on answers: 👍/👎 (and a comment) over the WebSocket and HTTP, kept with the answer
in the conversation's memory, counted in /metrics. Real Redis and retrieval; the FakeLLM
answers."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from rag_chat.llm.fake import FakeLLM
from tests.api.wire import until

pytestmark = pytest.mark.timeout(60)


def metric(client: TestClient, rating: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'rag_answer_feedback_total{{rating="{rating}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_rating_is_kept_with_the_answer_counted_and_taken_back(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["Port ", "8000."])
    with TestClient(make_app(llm)) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "conversation_id": "conv-rate", "text": "Which port?"})
        question = until(ws, "message")
        start = until(ws, "ai.start")
        until(ws, "ai.done")
        answer_id = start["message_id"]
        before = {r: metric(client, r) for r in ("up", "down", "cleared")}

        ws.send_json(
            {
                "type": "rate",
                "room": "conv-rate",
                "message_id": answer_id,
                "rating": "down",
                "comment": " wrong\x00port,\n  it is 8080 ",
            }
        )
        rated = until(ws, "rated")
        assert rated == {
            "type": "rated",
            "room": "conv-rate",
            "message_id": answer_id,
            "rating": "down",
            "comment": "wrong port, it is 8080",
        }
        stored = client.get("/api/conversations/conv-rate/messages").json()["messages"]
        (rater,) = stored[1]["feedback"]
        given = stored[1]["feedback"][rater]
        assert (given["rating"], given["comment"]) == ("down", "wrong port, it is 8080")
        assert stored[1]["content"] == "Port 8000."  # the answer itself unchanged

        # a new rating replaces the rater's own; null takes it back
        ws.send_json({"type": "rate", "room": "conv-rate", "message_id": answer_id, "rating": "up"})
        assert until(ws, "rated")["rating"] == "up"
        ws.send_json({"type": "rate", "room": "conv-rate", "message_id": answer_id, "rating": None})
        assert until(ws, "rated")["rating"] is None
        stored = client.get("/api/conversations/conv-rate/messages").json()["messages"]
        assert stored[1]["feedback"] == {}
        assert {r: metric(client, r) - before[r] for r in before} == {
            "up": 1,
            "down": 1,
            "cleared": 1,
        }

        # over HTTP, as the caller (open mode: "guest"), beside the WebSocket user's
        url = f"/api/conversations/conv-rate/messages/{answer_id}/feedback"
        r = client.put(url, json={"rating": "up", "comment": "thanks"})
        assert r.status_code == 200
        assert r.json() == {"message_id": answer_id, "rating": "up", "comment": "thanks"}
        ws.send_json(
            {"type": "rate", "room": "conv-rate", "message_id": answer_id, "rating": "down"}
        )
        until(ws, "rated")
        stored = client.get("/api/conversations/conv-rate/messages").json()["messages"]
        ratings = {k: v["rating"] for k, v in stored[1]["feedback"].items()}
        assert ratings == {"guest": "up", rater: "down"}
        # a rejoin's history carries them
        ws.send_json({"type": "join", "room": "conv-rate", "private": True})
        joined = until(ws, "joined")
        assert {k: v["rating"] for k, v in joined["history"][1]["feedback"].items()} == ratings
        assert client.delete(url).status_code == 204
        stored = client.get("/api/conversations/conv-rate/messages").json()["messages"]
        assert list(stored[1]["feedback"]) == [rater]

        # refusals: one line each, nothing changed, the connection stays usable
        def refused(event: dict[str, Any]) -> dict[str, Any]:
            ws.send_json(event)
            return until(ws, "error", event="rate")

        rate = {"type": "rate", "room": "conv-rate", "rating": "up"}
        assert refused({**rate, "message_id": question["id"]})["code"] == "bad_request"
        assert refused({**rate, "message_id": "nope"})["code"] == "not_found"
        assert refused({**rate, "room": "elsewhere", "message_id": answer_id})["code"] == (
            "not_joined"
        )
        assert refused({**rate, "message_id": answer_id, "rating": "meh"})["code"] == (
            "bad_request"
        )
        assert refused({**rate, "message_id": answer_id, "comment": "x" * 2001})["code"] == (
            "bad_request"
        )
        assert client.put(url, json={"rating": "sideways"}).status_code == 422
        r = client.put(
            f"/api/conversations/conv-rate/messages/{question['id']}/feedback",
            json={"rating": "up"},
        )
        assert r.status_code == 400 and "not an answer" in r.json()["error"]["message"]
        assert (
            client.put(
                "/api/conversations/conv-rate/messages/nope/feedback", json={"rating": "up"}
            ).status_code
            == 404
        )
        assert (
            client.put(
                "/api/conversations/no-such-conv/messages/x/feedback", json={"rating": "up"}
            ).status_code
            == 404
        )
        after = client.get("/api/conversations/conv-rate/messages").json()["messages"]
        assert after == stored
        ws.send_json({"type": "ping"})
        until(ws, "pong")
