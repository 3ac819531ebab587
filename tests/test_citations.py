"""The citation check and the "don't know" reply: the checker on hand-made cases (real
embedder), ai.done and memory through the real WebSocket and SSE endpoints (real retrieval
over the bundled guide, real Redis, a scripted FakeLLM: what the model says is fixed so that
the verdict can be asserted)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rag_chat import citations
from rag_chat.app import create_app
from rag_chat.chat import DONT_KNOW, ChatService
from rag_chat.llm import LLM
from rag_chat.llm.fake import FakeLLM
from rag_chat.memory.local import LocalMemory
from rag_chat.retrieval.embedder import Embedder
from rag_chat.retrieval.store import Hit
from rag_chat.services import Services
from rag_chat.settings import Settings
from tests.conftest import TEST_REDIS_DB

PORT = Hit(
    "port",
    1.0,
    "By default the server listens on **127.0.0.1, port 8000**. You can change this with the "
    "`RAG_HOST` and `RAG_PORT` environment variables.",
    {"title": "Installing rag_chat", "heading": "Which port does the server use?"},
)
PDF = Hit(
    "pdf",
    1.0,
    "PDF files are supported. Each chunk keeps the page number it came from, and answers cite "
    "that page.",
    {"title": "Ingesting documents", "heading": "Ingesting documents > PDFs"},
)
REDIS = Hit(
    "redis",
    1.0,
    "Use one Redis for all instances and give every instance the same RAG_REDIS_URL.",
    {"title": "Deploying several instances", "heading": "Redis"},
)


# --- sentences and markers -------------------------------------------------------------------


def test_claims_attach_markers_to_their_sentence() -> None:
    answer = (
        "The server uses port 8000 [1]. PDF pages are kept. [2]\n"
        "- a list item [3]\n"
        "```\ncode [1]\n```\n"
        "Out of range [9]. Uncited sentence."
    )
    found = citations.claims(answer, 3)
    assert [(c.text, c.cites) for c in found] == [
        ("The server uses port 8000 .", (1,)),
        ("PDF pages are kept.", (2,)),
        ("a list item", (3,)),
    ]
    assert citations.cited(answer, 3) == [1, 2, 3]


def test_a_sentence_citing_two_sources_is_checked_against_each() -> None:
    found = citations.claims("Port 8000 and PDF pages [1][2].", 2)
    assert [c.cites for c in found] == [(1, 2)]


# --- the checker ------------------------------------------------------------------------------


def test_supported_unsupported_and_uncited(embedder: Embedder) -> None:
    answer = (
        "The server listens on port 8000 by default [1]. "
        "Answers cite the page of a PDF [2]. "
        "Chunks are embedded by a GPU cluster in the cloud [2]."
    )
    result = citations.check(answer, [PORT, PDF, REDIS], embedder)
    # [2] backs one of its two sentences: supported
    assert result.as_event() == {"citations": [1, 2], "unsupported": [], "uncited": [3]}
    verdicts = [(p.n, p.supported) for p in result.pairs]
    assert verdicts == [(1, True), (2, True), (2, False)]
    assert all(p.semantic is not None for p in result.pairs)


def test_a_source_cited_only_for_what_it_does_not_say_is_unsupported(embedder: Embedder) -> None:
    answer = "Use one Redis for every instance [3]. Chunks keep their page number [1]."
    result = citations.check(answer, [PORT, PDF, REDIS], embedder)
    assert result.as_event() == {"citations": [3], "unsupported": [1], "uncited": [2]}


def test_a_wrong_number_is_not_supported_however_similar(embedder: Embedder) -> None:
    result = citations.check("The server listens on port 9000 by default [1].", [PORT], embedder)
    pair = result.pairs[0]
    assert pair.lexical >= citations.MIN_LEXICAL and not pair.numbers_ok
    assert result.unsupported == [1] and result.supported == []


def test_filler_that_cites_a_source_is_not_support(embedder: Embedder) -> None:
    result = citations.check("Sure, here is the answer [1].", [PORT], embedder)
    assert result.unsupported == [1]


def test_without_an_embedder_the_check_is_lexical() -> None:
    answer = "The server listens on port 8000 by default [1]. Redis is everywhere [2]."
    result = citations.check(answer, [PORT, PDF])
    assert result.as_event() == {"citations": [1], "unsupported": [2], "uncited": []}
    assert all(p.semantic is None for p in result.pairs)


def test_no_markers_means_every_source_is_uncited(embedder: Embedder) -> None:
    result = citations.check("Port 8000.", [PORT, PDF], embedder)
    assert result.as_event() == {"citations": [], "unsupported": [], "uncited": [1, 2]}


# --- the don't-know gate, deterministic -------------------------------------------------------


def _service(hits: list[Hit], llm: FakeLLM, min_relevance: float | None) -> ChatService:
    return ChatService(llm, LocalMemory(), lambda q, k: hits, min_relevance=min_relevance)


async def _events(chat: ChatService, text: str) -> list[dict[str, Any]]:
    return [e async for e in chat.start(text).events()]


@pytest.mark.parametrize(
    ("relevance", "min_relevance", "asks_llm"),
    [
        ([0.1, 0.2], 0.3, False),  # all under the threshold
        ([0.1, 0.5], 0.3, True),  # the best one decides
        ([None, None], 0.3, True),  # unknown: the LLM decides
        ([], 0.3, False),  # nothing retrieved at all
        ([0.1], None, True),  # the gate is off
    ],
)
async def test_the_gate_uses_the_best_relevance(
    relevance: list[float | None], min_relevance: float | None, asks_llm: bool
) -> None:
    hits = [Hit(f"c{i}", 0.5, "text", {}, r) for i, r in enumerate(relevance)]
    llm = FakeLLM(["An answer."])
    events = await _events(_service(hits, llm, min_relevance), "a question")
    assert bool(llm.calls) is asks_llm
    done = events[-1]
    assert done["type"] == "ai.done" and done["finish_reason"] == "stop"
    assert done.get("no_match", False) is not asks_llm


async def test_the_dont_know_reply_is_complete_and_remembered() -> None:
    llm = FakeLLM()
    memory = LocalMemory()
    chat = ChatService(llm, memory, lambda q, k: [Hit("c", 0.5, "t", {}, 0.05)], min_relevance=0.3)
    reply = chat.start("How do I bake bread?")
    events = [e async for e in reply.events()]
    assert [e["type"] for e in events] == ["ai.start", "ai.sources", "ai.token", "ai.done"]
    assert events[1]["chunks"] == [] and events[2]["delta"] == DONT_KNOW
    done = events[-1]
    assert done["citations"] == done["unsupported"] == done["uncited"] == []
    assert done["no_match"] is True and done["persisted"] is True
    assert done["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}
    assert llm.calls == []
    stored = await memory.history(reply.conversation_id)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] == DONT_KNOW and stored[1]["sources"] == []
    assert stored[1]["no_match"] is True and stored[1]["citations"] == []


# --- through the server -------------------------------------------------------------------------


@pytest.fixture
def app_with(guide_index: Path, redis_prefix: str, embedder: Embedder) -> Callable[[LLM], object]:
    """The real app over the bundled guide with the default RAG_MIN_RELEVANCE."""
    settings = Settings(  # type: ignore[call-arg]
        data_dir=guide_index,
        redis_url=f"redis://127.0.0.1:6379/{TEST_REDIS_DB}",
        redis_prefix=redis_prefix,
        min_relevance=Settings.model_fields["min_relevance"].default,
        _env_file=None,
    )

    def make(llm: LLM) -> object:
        async def factory(s: Settings) -> Services:
            return await Services.open(s, llm=llm, embedder=embedder)

        return create_app(settings, services_factory=factory)

    return make


def _until_done(ws: Any) -> list[dict[str, Any]]:
    events = []
    while True:
        event = ws.receive_json()
        if event["type"].startswith("ai.") or event["type"] == "error":
            events.append(event)
        if event["type"] in ("ai.done", "error"):
            return events


def test_ai_done_carries_the_verdict_and_memory_keeps_it(app_with: Any) -> None:
    llm = FakeLLM()
    llm.enqueue(
        [
            "The server listens on port 8000 by default [1]. ",
            "Chunks are embedded by a GPU cluster in the cloud [2].",
        ]
    )
    with TestClient(app_with(llm)) as client:  # type: ignore[arg-type]
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "message", "text": "Which port does the server listen on?"})
            events = _until_done(ws)
        sources = next(e for e in events if e["type"] == "ai.sources")["chunks"]
        done = events[-1]
        # the premise: the best sources are about the port
        assert "8000" in sources[0]["snippet"] and len(sources) >= 3
        assert done["type"] == "ai.done" and "no_match" not in done
        assert done["citations"] == [1]
        assert done["unsupported"] == [2]
        assert done["uncited"] == list(range(3, len(sources) + 1))
        assert done["timings"]["citation_check_ms"] >= 0
        cid = events[0]["conversation_id"]
        stored = client.get(f"/api/conversations/{cid}/messages").json()["messages"]
        assert stored[1]["citations"] == [1] and stored[1]["unsupported"] == [2]


def test_an_off_topic_question_gets_dont_know_without_the_llm_over_ws(app_with: Any) -> None:
    llm = FakeLLM()
    with TestClient(app_with(llm)) as client:  # type: ignore[arg-type]
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "message", "text": "How do I bake sourdough bread?"})
            events = _until_done(ws)
            # an on-topic question right after is answered by the LLM as usual
            cid = events[0]["conversation_id"]
            ws.send_json(
                {"type": "message", "text": "How do I ingest PDFs?", "conversation_id": cid}
            )
            second = _until_done(ws)
        assert [e["type"] for e in events] == ["ai.start", "ai.sources", "ai.token", "ai.done"]
        assert events[1]["chunks"] == []
        assert events[2]["delta"] == DONT_KNOW
        done = events[-1]
        assert done["no_match"] is True and done["citations"] == [] and done["persisted"] is True
        assert len(llm.calls) == 1  # only the second question reached the model
        assert "no_match" not in second[-1] and second[1]["chunks"]
        stored = client.get(f"/api/conversations/{cid}/messages").json()["messages"]
        assert stored[1]["content"] == DONT_KNOW and stored[1]["no_match"] is True
        assert stored[1]["sources"] == []


def test_an_off_topic_question_gets_dont_know_over_sse(app_with: Any) -> None:
    llm = FakeLLM()
    question = {"message": "Who won the 2018 FIFA World Cup?"}
    with (
        TestClient(app_with(llm)) as client,  # type: ignore[arg-type]
        client.stream("POST", "/api/chat", json=question) as r,
    ):
        assert r.status_code == 200
        body = "".join(r.iter_text())
    events = [
        json.loads(line[len("data: ") :]) for line in body.splitlines() if line.startswith("data: ")
    ]
    done = next(e for e in events if e["type"] == "ai.done")
    assert done["no_match"] is True and done["finish_reason"] == "stop"
    assert "".join(e["delta"] for e in events if e["type"] == "ai.token") == DONT_KNOW
    assert llm.calls == []
