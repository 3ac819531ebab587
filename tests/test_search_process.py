"""The chat's searches in a process of their own (rag_chat/retrieval/process.py): the real
retriever (real model, real Chroma) in a real spawned process."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import rag_chat.retrieval.process as process_module
from rag_chat.chat import ChatService
from rag_chat.llm.fake import FakeLLM
from rag_chat.memory import LocalMemory
from rag_chat.retrieval.embedder import Embedder
from rag_chat.retrieval.process import SearchError, SearchProcess
from rag_chat.retrieval.search import Retriever
from rag_chat.retrieval.store import Hit
from rag_chat.settings import Settings
from tests.conftest import ingest_install_guide, run_cli

QUESTIONS = [
    "How do I ingest PDF files?",
    "Which Redis settings are there?",
    "How do rooms show who is typing?",
    "What does the OpenAI-compatible endpoint accept?",
]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def noting(here: Retriever) -> tuple[list[str], Callable[[str, int], list[Hit]]]:
    """A search for the server's threads that notes each query it is given."""
    queries: list[str] = []

    def search(query: str, k: int) -> list[Hit]:
        queries.append(query)
        return here.search(query, k)

    return queries, search


@pytest.fixture
async def proc(guide_index: Path) -> AsyncIterator[SearchProcess]:
    p = SearchProcess(Settings(data_dir=guide_index, _env_file=None))  # type: ignore[call-arg]
    p.start()
    assert await p.wait_ready(120)
    yield p
    await p.aclose()


async def test_it_finds_what_the_server_would_find_itself(
    proc: SearchProcess, guide_index: Path, embedder: Embedder
) -> None:
    here = Retriever(Settings(data_dir=guide_index, _env_file=None), embedder=embedder)  # type: ignore[call-arg]
    results = await asyncio.gather(*(proc.search(q, 5) for q in QUESTIONS * 5))
    for question, hits in zip(QUESTIONS * 5, results, strict=True):
        mine = here.search(question, 5)
        assert [(h.id, h.text, h.metadata) for h in hits] == [
            (h.id, h.text, h.metadata) for h in mine
        ]
        assert [h.relevance for h in hits] == pytest.approx([h.relevance for h in mine], abs=1e-5)
    assert proc.pid is not None and proc.pid != os.getpid()


async def test_a_dead_process_falls_back_to_the_servers_threads_and_comes_back(
    proc: SearchProcess, guide_index: Path, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_module, "RESTART_AFTER_S", 0.2)
    here = Retriever(Settings(data_dir=guide_index, _env_file=None), embedder=embedder)  # type: ignore[call-arg]
    chat = ChatService(
        FakeLLM(["x"]), LocalMemory(), lambda q, k: here.search(q, k), search_async=proc.search
    )
    first = proc.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while proc.ready and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not proc.ready  # noticed: the pipe closed
    with pytest.raises(SearchError):
        await proc.search("anything", 3)
    # the chat still answers, from the server's own worker threads
    hits = await chat.retrieve(QUESTIONS[0])
    assert hits and hits[0].metadata["source"] == "data/guide/ingesting.md"
    # and a new process takes over
    assert await proc.wait_ready(120)
    assert proc.starts == 2 and proc.pid not in (None, first)
    assert [h.id for h in await proc.search(QUESTIONS[0], 5)] == [h.id for h in hits]
    assert not alive(first)


async def test_what_a_busy_process_cannot_take_is_searched_in_the_servers_threads(
    guide_index: Path, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process owes at most MAX_PENDING searches at once (its pipe never fills); the
    overflow runs in the server's threads, and every search gets the same hits."""
    monkeypatch.setattr(process_module, "MAX_PENDING", 2)
    p = SearchProcess(Settings(data_dir=guide_index, _env_file=None))  # type: ignore[call-arg]
    p.start()
    try:
        assert await p.wait_ready(120)
        here = Retriever(Settings(data_dir=guide_index, _env_file=None), embedder=embedder)  # type: ignore[call-arg]
        in_threads, thread_search = noting(here)
        chat = ChatService(FakeLLM(["x"]), LocalMemory(), thread_search, search_async=p.search)
        owed: list[int] = []
        questions = QUESTIONS * 10

        async def watch() -> None:
            while True:
                owed.append(len(p._pending))
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        try:
            results = await asyncio.gather(*(chat.retrieve(q) for q in questions))
        finally:
            watcher.cancel()
        assert max(owed) == 2  # the limit, reached and kept
        assert 0 < len(in_threads) < len(questions)  # the overflow, and only that
        for question, hits in zip(questions, results, strict=True):
            assert [h.id for h in hits] == [h.id for h in here.search(question, chat.top_k)]
    finally:
        await p.aclose()


async def test_a_process_that_hangs_is_replaced_and_its_searches_run_in_the_server(
    proc: SearchProcess, guide_index: Path, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_module, "STUCK_S", 0.5)
    monkeypatch.setattr(process_module, "RESTART_AFTER_S", 0.2)
    here = Retriever(Settings(data_dir=guide_index, _env_file=None), embedder=embedder)  # type: ignore[call-arg]
    in_threads, thread_search = noting(here)
    chat = ChatService(FakeLLM(["x"]), LocalMemory(), thread_search, search_async=proc.search)
    hung = proc.pid
    assert hung is not None
    os.kill(hung, signal.SIGSTOP)  # alive, answering nothing
    started = time.monotonic()
    hits = await chat.retrieve(QUESTIONS[0])
    assert in_threads == [QUESTIONS[0]]  # after the process owed it STUCK_S without a word
    assert 0.5 <= time.monotonic() - started < 10
    assert hits[0].metadata["source"] == "data/guide/ingesting.md"
    # the hung process is killed and another takes over
    assert await proc.wait_ready(120)
    assert proc.starts == 2 and proc.pid not in (None, hung)
    assert [h.id for h in await proc.search(QUESTIONS[0], 5)] == [
        h.id for h in here.search(QUESTIONS[0], 5)
    ]
    deadline = time.monotonic() + 10
    while alive(hung) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not alive(hung)


async def test_it_sees_what_an_ingest_adds_meanwhile(tmp_path: Path) -> None:
    docs, data = ingest_install_guide(tmp_path)
    p = SearchProcess(Settings(data_dir=data, _env_file=None))  # type: ignore[call-arg]
    p.start()
    try:
        assert await p.wait_ready(120)
        question = "Which animal guards the lighthouse at night?"
        assert {h.metadata["source"] for h in await p.search(question, 5)} == {
            str(docs / "install.md")
        }
        (docs / "owl.md").write_text("# The lighthouse owl\nAn owl guards the lighthouse.")
        assert run_cli(["-m", "ingest", str(docs), "-q"], data).returncode == 0
        assert (await p.search(question, 5))[0].metadata["source"] == str(docs / "owl.md")
    finally:
        await p.aclose()


async def test_a_process_that_cannot_start_leaves_searches_in_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a Chroma server URL where nothing listens: the process reports why and exits
    bad = Settings(data_dir=tmp_path, chroma_url="http://127.0.0.1:9/", _env_file=None)  # type: ignore[call-arg]
    p = SearchProcess(bad)
    p.start()
    try:
        assert not await p.wait_ready(120)
        assert not p.ready and "search process did not start" in caplog.text
        with pytest.raises(SearchError):
            await p.search("x", 1)
    finally:
        await p.aclose()


async def test_it_runs_second_to_the_server_when_the_cpu_is_short(
    proc: SearchProcess, guide_index: Path
) -> None:
    """By default the process is niced 5 above the server (Settings.search_nice); 0 keeps
    the server's niceness."""
    assert proc.pid is not None
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, proc.pid) == min(mine + 5, 19)
    same = SearchProcess(Settings(data_dir=guide_index, search_nice=0, _env_file=None))  # type: ignore[call-arg]
    same.start()
    try:
        assert await same.wait_ready(120)
        assert same.pid is not None
        assert os.getpriority(os.PRIO_PROCESS, same.pid) == mine
        assert await same.search(QUESTIONS[0], 3)
    finally:
        await same.aclose()


async def test_closing_stops_the_process(guide_index: Path) -> None:
    p = SearchProcess(Settings(data_dir=guide_index, _env_file=None))  # type: ignore[call-arg]
    p.start()
    assert await p.wait_ready(120)
    pid = p.pid
    assert pid is not None and alive(pid)
    await p.aclose()
    assert not alive(pid)
    with pytest.raises(SearchError):
        await p.search("x", 1)


async def test_a_server_stopped_while_its_search_process_starts_leaves_no_traceback(
    guide_index: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    p = SearchProcess(Settings(data_dir=guide_index, _env_file=None))  # type: ignore[call-arg]
    p.start()
    await asyncio.sleep(0.5)  # spawned, still importing
    await p.aclose()
    assert p.pid is None and not p.ready
    await asyncio.sleep(3)  # long enough for a child that outlived its server to say so
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


def test_a_search_that_fails_a_batch_fails_alone(guide_index: Path, embedder: Embedder) -> None:
    """The process answers queued searches together; one that raises gets its own error and
    the others their hits, as if each had been asked alone."""
    here = Retriever(Settings(data_dir=guide_index, _env_file=None), embedder=embedder)  # type: ignore[call-arg]
    requests = [(1, QUESTIONS[0], 5), (2, None, 5), (3, QUESTIONS[1], 3)]
    replies = process_module._answer(here, requests)  # type: ignore[arg-type]
    assert [(rid, ok) for rid, ok, _ in replies] == [(1, True), (2, False), (3, True)]
    assert replies[1][2].startswith(("TypeError", "AttributeError"))
    for (_, question, k), (_, _, hits) in zip(
        [requests[0], requests[2]], [replies[0], replies[2]], strict=True
    ):
        assert [h[0] for h in hits] == [h.id for h in here.search(question, k)]
