"""SSE, the OpenAI-compatible API (through the official SDK), REST, health and metrics."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from rag_chat.llm.fake import FakeLLM


def sse_events(client: TestClient, body: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    with client.stream("POST", "/api/chat", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        event = ident = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("id: "):
                ident = line[4:]
            elif line.startswith("data: "):
                out.append((event or "", ident or "", json.loads(line[6:])))
    return out


def test_sse_streams_the_same_events(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["Use ", "`--dry-run` [1]"])
    with TestClient(make_app(llm)) as client:
        events = sse_events(client, {"message": "How do I preview an ingest?"})
    # the stream's own presence join is written beside the question (the join and the post run
    # side by side), so it may come before or after the message; the rest is in order
    assert [e for e, _, _ in events].count("presence") == 1
    assert [e for e, _, _ in events if e != "presence"] == [
        "message",
        "ai.start",
        "ai.sources",
        "ai.token",
        "ai.token",
        "ai.done",
    ]
    # ids are the conversation log's seqs: what Last-Event-ID resumes from
    assert [i for _, i, _ in events] == ["1", "2", "3", "4", "5", "6", "7"]
    assert all(e == d["type"] for e, _, d in events)
    assert events[-1][2]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "message: Field required"),
        ({"message": ""}, "message: String should have at least 1 character"),
        ({"message": "hi", "conversation_id": "bad id!"}, "conversation_id: String should match"),
    ],
)
def test_sse_rejects_bad_bodies_in_one_line(
    make_app: Any, body: dict[str, Any], message: str
) -> None:
    with TestClient(make_app(FakeLLM())) as client:
        r = client.post("/api/chat", json=body)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "bad_request"
    assert message in r.json()["error"]["message"]


def test_openai_sdk_non_streaming_and_streaming(make_app: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(["Port ", "8000 [1]."])
    llm.enqueue(["Port ", "8000 [1]."])
    with TestClient(make_app(llm)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        assert [m.id for m in client.models.list().data] == ["rag_chat"]
        completion = client.chat.completions.create(
            model="rag_chat", messages=[{"role": "user", "content": "Which port?"}]
        )
        assert completion.choices[0].message.content == "Port 8000 [1]."
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None and completion.usage.completion_tokens == 2
        sources = completion.model_extra["sources"]
        assert sources[0]["source"].startswith("data/guide/")

        stream = client.chat.completions.create(
            model="rag_chat",
            messages=[
                {"role": "user", "content": "What does rag_chat do?"},
                {"role": "assistant", "content": "It answers questions."},
                {"role": "user", "content": "Which port?"},
            ],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert chunks[0].model_extra["sources"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Port 8000 [1]."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
    # the client-side history reached the model
    assert {"role": "assistant", "content": "It answers questions."} in llm.calls[1]


def test_openai_errors_come_back_in_openai_shape(make_app: Any) -> None:
    with TestClient(make_app(FakeLLM())) as http:
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0
        )
        with pytest.raises(openai.BadRequestError, match="messages must contain a user message"):
            client.chat.completions.create(
                model="rag_chat", messages=[{"role": "system", "content": "be brief"}]
            )
        with pytest.raises(openai.UnprocessableEntityError):
            client.chat.completions.create(model="rag_chat", messages=[])


def test_search_returns_ranked_chunks_with_metadata(make_app: Any) -> None:
    with TestClient(make_app(FakeLLM())) as client:
        r = client.post("/api/search", json={"query": "exit status 75 lock", "k": 100})
        assert r.status_code == 200
        results = r.json()["results"]
        assert 20 < len(results) <= 100
        scores = [h["score"] for h in results]
        assert scores == sorted(scores, reverse=True)
        top = results[0]
        assert {"id", "score", "text", "source", "doc_id", "metadata"} <= top.keys()
        assert top["source"].startswith("data/guide/") and top["doc_id"] == top["source"]
        assert "75" in " ".join(h["text"] for h in results[:5])
        for mode in ("dense", "bm25"):
            r = client.post("/api/search", json={"query": "Redis", "k": 3, "mode": mode})
            assert r.status_code == 200 and r.json()["mode"] == mode
        r = client.post("/api/search", json={"query": "x", "k": 0})
        assert (
            r.status_code == 422
            and "k: Input should be greater than or equal to 1" in (r.json()["error"]["message"])
        )


def test_health_readiness_metrics_and_openapi(make_app: Any) -> None:
    with TestClient(make_app(FakeLLM())) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.json()
        checks = ready.json()["checks"]
        assert checks["memory"] == {"ok": True, "kind": "redis"}
        assert checks["vector_store"]["ok"] and checks["vector_store"]["chunks"] > 20
        assert checks["llm"] == {"ok": True, "model": "fake"}
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        # the React UI (make builds it into frontend/dist), under a strict CSP
        assert '<div id="root">' in page.text and "/assets/" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        script = page.text.split('src="', 1)[1].split('"', 1)[0]
        assert client.get(script).status_code == 200
        metrics = client.get("/metrics").text
        assert "rag_ws_connections" in metrics and "rag_replies_total" in metrics
        paths = client.get("/openapi.json").json()["paths"]
        for path in (
            "/api/chat",
            "/api/search",
            "/v1/chat/completions",
            "/v1/models",
            "/api/conversations/{conversation_id}/messages",
            "/healthz",
            "/readyz",
        ):
            assert path in paths
