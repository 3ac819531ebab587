"""The WebSocket protocol, deterministic: real retrieval and Redis, a scripted FakeLLM."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession

from rag_chat.llm.fake import FakeLLM


def collect(ws: WebSocketTestSession, until: str = "ai.done") -> list[dict[str, Any]]:
    """The AI's events (and errors) up to ``until``; room events (presence, the message echo)
    are checked elsewhere."""
    events = []
    while True:
        event = ws.receive_json()
        if event["type"] in ("presence", "message", "typing", "joined"):
            continue
        events.append(event)
        if event["type"] in (until, "error"):
            return events


def test_a_question_streams_start_sources_tokens_done(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["Run ", "`python -m ingest`", " [1]."])
    with TestClient(make_app(llm)) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "text": "How do I ingest PDF files?"})
        events = collect(ws)
    types = [e["type"] for e in events]
    assert types == ["ai.start", "ai.sources", "ai.token", "ai.token", "ai.token", "ai.done"]
    start, sources, *_, done = events
    assert start["message_id"] and start["conversation_id"]
    assert all(e["message_id"] == start["message_id"] for e in events)
    chunks = sources["chunks"]
    assert [c["n"] for c in chunks] == list(range(1, len(chunks) + 1))
    assert chunks[0]["source"].startswith("data/guide/")
    assert any(c["source"] == "data/guide/ingesting.md" for c in chunks)
    assert {"title", "heading", "snippet", "score", "doc_id", "page"} <= chunks[0].keys()
    assert "".join(e["delta"] for e in events if e["type"] == "ai.token") == (
        "Run `python -m ingest` [1]."
    )
    assert done["finish_reason"] == "stop"
    # [1] is cited; whether it supports the sentence is the checker's (tests/test_citations.py)
    assert sorted(done["citations"] + done["unsupported"]) == [1]
    assert done["usage"]["completion_tokens"] == 3
    assert set(done["timings"]) >= {"retrieval_ms", "ttft_ms", "tokens_per_s", "total_ms"}
    # the prompt carried the numbered sources, fenced, and the question
    prompt = llm.calls[0][-1]["content"]
    assert '<source n="1" ' in prompt and "</source>" in prompt
    assert prompt.endswith("Question: How do I ingest PDF files?")


def test_bad_events_get_errors_and_the_connection_stays_usable(make_app: Any) -> None:
    with TestClient(make_app(FakeLLM())) as client, client.websocket_connect("/ws") as ws:
        cases = [
            ("{not json", "invalid JSON"),
            ("[1, 2]", "every event is a JSON object"),
            (json.dumps({"text": "hi"}), "every event needs a 'type'"),
            (json.dumps({"type": "shout"}), "unknown event type 'shout'"),
            (json.dumps({"type": "message"}), "text: Field required"),
            (json.dumps({"type": "message", "text": 42}), "text: Input should be a valid string"),
            (json.dumps({"type": "message", "text": ""}), "text: String should have at least"),
            (
                json.dumps({"type": "message", "text": "x" * 9000}),
                "text: String should have at most",
            ),
            (json.dumps({"type": "cancel"}), "message_id: Field required"),
            (json.dumps({"type": "message", "text": "x" * 70000}), "frame larger than"),
        ]
        for frame, message in cases:
            ws.send_text(frame)
            event = ws.receive_json()
            assert event["type"] == "error" and event["code"] == "bad_request", (frame, event)
            assert message in event["message"], (frame, event)
        ws.send_bytes(b"\x00\x01")
        event = ws.receive_json()
        assert event["code"] == "bad_request" and "binary frames" in event["message"]
        ws.send_json({"type": "cancel", "message_id": "nope"})
        assert ws.receive_json()["code"] == "not_found"
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}


def test_cancel_stops_the_generation(make_app: Any) -> None:
    llm = FakeLLM(delay=0.05)
    llm.enqueue([f"tok{i} " for i in range(200)])
    with TestClient(make_app(llm)) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "text": "Tell me everything about Redis"})
        while (start := ws.receive_json())["type"] != "ai.start":
            pass
        while ws.receive_json()["type"] != "ai.token":
            pass
        ws.send_json({"type": "cancel", "message_id": start["message_id"]})
        events = collect(ws)
    done = events[-1]
    assert done["type"] == "ai.done" and done["finish_reason"] == "cancelled"
    tokens = sum(e["type"] == "ai.token" for e in events) + 1
    assert tokens < 200


def test_a_resent_client_id_gets_no_second_reply(make_app: Any) -> None:
    llm = FakeLLM()
    with TestClient(make_app(llm)) as client, client.websocket_connect("/ws") as ws:
        msg = {"type": "message", "text": "Which port?", "client_id": "c-1"}
        ws.send_json(msg)
        ws.send_json(msg)
        events = []
        while (event := ws.receive_json())["type"] != "ai.done":
            events.append(event)
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}  # nothing else was queued before it
    messages = [e for e in events if e["type"] == "message"]
    assert len(messages) == 1 and messages[0]["client_id"] == "c-1"
    assert [e["type"] for e in events].count("ai.start") == 1
    assert len(llm.calls) == 1


def test_follow_up_is_rewritten_and_history_is_kept(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["Port 8000 [1]."])
    llm.enqueue(["It is 127.0.0.1."])
    app = make_app(llm)
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "message", "text": "Which port does the server listen on?"})
            first = collect(ws)
            cid = first[0]["conversation_id"]
            ws.send_json({"type": "message", "text": "and its host?", "conversation_id": cid})
            second = collect(ws)
        sources = next(e for e in second if e["type"] == "ai.sources")
        assert sources["query"] == "port server listen on and its host?"
        # the model saw the earlier turn
        assert {"role": "assistant", "content": "Port 8000 [1]."} in llm.calls[1]
        r = client.get(f"/api/conversations/{cid}/messages")
        assert r.status_code == 200
        msgs = r.json()["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
        assert msgs[1]["sources"][0]["source"].startswith("data/guide/")
        assert client.delete(f"/api/conversations/{cid}/messages").status_code == 204
        r = client.get(f"/api/conversations/{cid}/messages")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_the_answer_is_remembered_after_its_question_even_when_that_write_is_slow(
    make_app: Any,
) -> None:
    """The question goes to the conversation's memory (real Redis) while its reply starts;
    the answer is saved after it. With the question's write held back 0.5 s, the reply —
    a quick answer — still lands after it, and the question's way to its reply's start does
    not wait for it."""
    llm = FakeLLM()
    llm.enqueue(["Port 8000 [1]."])
    app = make_app(llm)
    with TestClient(app) as client:
        memory = app.state.services.memory
        real_append = memory.append

        async def slow_question(conversation_id: str, *messages: Any) -> None:
            if messages[0]["role"] == "user":
                await asyncio.sleep(0.5)
            await real_append(conversation_id, *messages)

        memory.append = slow_question
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "message", "text": "Which port does the server listen on?"})
            events = collect(ws)
        done = events[-1]
        assert done["type"] == "ai.done", events
        assert done["timings"]["admit_ms"] < 400  # the 0.5 s write is not in front of it
        cid = done["conversation_id"]
        msgs = client.get(f"/api/conversations/{cid}/messages").json()["messages"]
        assert [(m["role"], m["content"]) for m in msgs] == [
            ("user", "Which port does the server listen on?"),
            ("assistant", "Port 8000 [1]."),
        ]


def test_llm_failure_mid_stream_ends_with_an_error_and_the_next_question_works(
    make_app: Any,
) -> None:
    llm = FakeLLM(fail_after=2)
    llm.enqueue(["one ", "two ", "three"])
    with TestClient(make_app(llm)) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "text": "Explain chunking"})
        events = collect(ws)
        assert [e["type"] for e in events][-1] == "error"
        assert events[-1]["code"] == "llm_error" and events[-1]["partial"] is True
        llm.fail_after = None
        llm.enqueue(["fine now"])
        ws.send_json({"type": "message", "text": "Explain chunking again"})
        assert collect(ws)[-1]["type"] == "ai.done"


def test_a_conversation_survives_a_server_restart(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["Saved answer"])
    with TestClient(make_app(llm)) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "text": "Remember this", "conversation_id": "keep-1"})
        collect(ws)
    # a second app instance over the same Redis
    with TestClient(make_app(FakeLLM())) as client:
        msgs = client.get("/api/conversations/keep-1/messages").json()["messages"]
    assert [m["content"] for m in msgs] == ["Remember this", "Saved answer"]
