"""Follow-up rewriting and its evaluation over the bundled guide (real embedder, real index)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_chat.chat import is_follow_up, rewrite_query
from rag_chat.eval_followups import evaluate, first_relevant, history_of, main, scores
from rag_chat.evalsets import load
from rag_chat.retrieval.embedder import Embedder
from rag_chat.retrieval.search import Retriever
from rag_chat.retrieval.store import Hit
from rag_chat.settings import Settings


@pytest.mark.parametrize(
    ("text", "follow_up"),
    [
        ("and its host?", True),
        ("what about the port?", True),
        ("what exit status does ingest return then?", True),
        ("what do the other exit codes mean?", True),
        ("anything else?", True),
        ("PDFs?", True),  # very short
        ("Which Python version does rag_chat require?", False),
        ("How are documents split into chunks?", False),
    ],
)
def test_what_counts_as_a_follow_up(text: str, follow_up: bool) -> None:
    assert is_follow_up(text) is follow_up


def test_the_rewrite_carries_the_previous_topic_not_its_phrasing() -> None:
    history = history_of("What is the SSE endpoint?")
    assert rewrite_query(history, "how do I resume it?") == "SSE endpoint how do I resume it?"
    # the latest user question counts, not the answer
    history += history_of("Which embedding model does rag_chat use?")
    assert rewrite_query(history, "and its dimensions?") == (
        "embedding model rag_chat use and its dimensions?"
    )
    # a standalone question, or no history: unchanged
    assert rewrite_query(history, "How are documents chunked?") == "How are documents chunked?"
    assert rewrite_query([], "and its port?") == "and its port?"
    # a previous question of filler words only adds nothing
    assert rewrite_query(history_of("What is it?"), "and then?") == "it and then?"


def test_scores_and_ranks() -> None:
    hits = [
        Hit("a", 1, "", {"source": "data/guide/faq.rst", "heading": "FAQ > Which port"}),
        Hit("b", 1, "", {"source": "data/guide/installing.md", "heading": "Installing > Port"}),
    ]
    assert first_relevant(hits, [{"source": "data/guide/installing.md"}]) == 2
    assert first_relevant(hits, [{"source": "data/guide/faq.rst", "section": "port"}]) == 1
    assert first_relevant(hits, [{"source": "data/guide/faq.rst", "section": "PDF"}]) is None
    s = scores([1, 2, None, 7])
    assert s["R@1"] == 0.25 and s["R@3"] == 0.5 and s["R@10"] == 0.75
    assert s["MRR@10"] == pytest.approx((1 + 0.5 + 1 / 7) / 4)


def test_the_evaluation_on_a_few_pairs(guide_index: Path, embedder: Embedder) -> None:
    retriever = Retriever(Settings(data_dir=guide_index, _env_file=None), embedder=embedder)  # type: ignore[call-arg]
    pairs = load("followups.jsonl", 6)
    result = evaluate(lambda q, k: retriever.search(q, k, "hybrid"), pairs)
    assert result["pairs"] == 6
    assert set(result["results"]) == {"standalone", "raw", "rewritten", "rewritten-v1"}
    row = result["per_pair"][0]
    assert row["rewritten_query"] == "ingest PDFs and do answers cite the page?"
    table = result["results"]
    # the standalone questions find their section; the rewrite does not lose to them here
    assert table["standalone"]["R@5"] == 1.0
    assert table["rewritten"]["R@5"] >= table["raw"]["R@5"]


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m rag_chat.eval_followups`: ingests the guide itself, prints the table."""
    assert main(["--limit", "3", "--data-dir", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 3
    assert all(0 <= r["MRR@10"] <= 1 for r in result["results"].values())


# --- retrieval prefetched while the question is written ------------------------------------------


async def test_a_standalone_question_is_retrieved_once_by_its_prefetch() -> None:
    import asyncio

    from rag_chat.chat import ChatService
    from rag_chat.llm.fake import FakeLLM
    from rag_chat.memory.local import LocalMemory
    from rag_chat.retrieval.store import Hit

    asked: list[str] = []

    def search(query: str, k: int) -> list[Hit]:
        asked.append(query)
        return [Hit("c", 0.5, "Port 8000 [1].", {"source": "a.md"}, 0.9)]

    memory = LocalMemory()
    chat = ChatService(FakeLLM(["An answer."]), memory, search)
    # a follow-up's query depends on the history: never prefetched
    assert chat.prefetch("and its port?") is None
    task = chat.prefetch("Which port does the server listen on?")
    assert task is not None
    await asyncio.sleep(0.05)  # the retrieval ran while "the message was being written"
    assert asked == ["Which port does the server listen on?"]
    reply = chat.start("Which port does the server listen on?", prefetched=task)
    events = [e async for e in reply.events()]
    assert events[-1]["type"] == "ai.done" and events[-1]["timings"]["retrieval_ms"] >= 0
    assert asked == ["Which port does the server listen on?"]  # not retrieved a second time
    # a prefetch whose text the reply does not use is cancelled, and the reply retrieves itself
    await memory.append("conv", {"id": "q1", "role": "user", "content": "How do I ingest PDFs?"})
    stale = chat.prefetch("Which port does the server listen on?")
    reply = chat.start("and its size limit?", "conv", prefetched=stale)
    events = [e async for e in reply.events()]
    assert asked[-1].endswith("and its size limit?")
    assert asked[-1] != "and its size limit?"  # rewritten with the earlier question's topic
    assert stale is not None and (stale.cancelled() or stale.done())


async def test_the_history_read_beside_the_question_is_the_one_the_reply_uses() -> None:
    """Rooms.post starts reading the history while it writes the question: the reply uses that
    read (one Redis round trip fewer before its first token), earlier turns included, and
    leaves the question out whether or not the read saw it."""
    from rag_chat.chat import ChatService
    from rag_chat.llm.fake import FakeLLM
    from rag_chat.memory.base import StoredMessage
    from rag_chat.memory.local import LocalMemory

    class CountingMemory(LocalMemory):
        reads = 0

        async def history(
            self, conversation_id: str, limit: int | None = None
        ) -> list[StoredMessage]:
            self.reads += 1
            return await super().history(conversation_id, limit)

    asked: list[str] = []

    def search(query: str, k: int) -> list[Hit]:
        asked.append(query)
        return [Hit("c", 0.5, "Files up to 50 MB [1].", {"source": "a.md"}, 0.9)]

    memory = CountingMemory()
    llm = FakeLLM(["Up to 50 MB [1]."])
    chat = ChatService(llm, memory, search)
    await memory.append(
        "conv",
        {"id": "q0", "role": "user", "content": "How do I ingest PDFs?"},
        {"id": "a0", "role": "assistant", "content": "Run python -m ingest."},
    )
    read = chat.prefetch_history("conv")
    await memory.append("conv", {"id": "q1", "role": "user", "content": "and its size limit?"})
    reply = chat.start("and its size limit?", "conv", question_id="q1", history_read=read)
    events = [e async for e in reply.events()]
    assert events[-1]["type"] == "ai.done"
    assert memory.reads == 1  # the reply did not read the history again
    assert asked == ["ingest PDFs and its size limit?"]  # the earlier turn, from that read
    prompt = [m["content"] for m in llm.calls[-1]]
    assert "Run python -m ingest." in prompt
    assert sum("and its size limit?" in m for m in prompt) == 1  # the question once, not twice
