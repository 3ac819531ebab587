"""Time to first token and tokens/s: through the server vs. the raw embedded model, one run.

    .venv/bin/python benchmarks/chat_latency.py [--runs 5]

1. Ingests data/ into a temporary data dir and starts ``python -m rag_chat`` on a free port
   (Redis DB 13, its own key prefix); the client asks a question over the WebSocket (another
   each round: QUESTIONS), each time in a new conversation, and measures send → first
   ``ai.token`` and tokens/s over the stream.
2. Beside it, in this process: exactly the prompt the server sends (same retrieval, same
   prompt builder), streamed straight from llama-cpp-python (same GGUF, same context size,
   threads — the prompt on the cores idle at its start, as the server decides — max_tokens
   and temperature).
The two alternate, RUNS times each (the order swapped every other round), so that the
machine's drift in speed falls on both sides; the idle server costs nothing while the raw
model runs.
Prints medians and the ratios server/raw: tokens/s over whole answers, and over the first K
tokens of every answer (K the shortest answer), since answers of different lengths decode at
different speeds and sampling makes the two sides' lengths differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from benchmarks._bench import search_process_answers  # noqa: E402
from ingest.pipeline import Pipeline  # noqa: E402
from rag_chat.chat import ANSWER_TOKENS, build_prompt  # noqa: E402
from rag_chat.evalsets import load  # noqa: E402
from rag_chat.llm.llama import LlamaCppLLM, _cpu_times  # noqa: E402
from rag_chat.retrieval.search import Retriever  # noqa: E402
from rag_chat.settings import Settings  # noqa: E402

# a new question each round (the guide's), so that no prompt repeats the one before it
QUESTIONS = [
    "How do I ingest PDF files, and what happens to files that fail?",
    *(q["question"] for q in load("answers.jsonl")),
]
TEMPERATURE = 0.2  # what the server's backends use by default
Row = tuple[float, float, int, list[float]]  # ttft ms, tokens/s, tokens, token times
Rows = list[Row]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def through_server(
    url: str, conversation: str, question: str, count: Callable[[str], int]
) -> tuple[Row, int, int]:
    """One answer through the server, in a new conversation; also (frames, frames that
    carried several tokens)."""
    with connect(url.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        t0 = time.perf_counter()
        ws.send(json.dumps({"type": "message", "text": question, "conversation_id": conversation}))
        frames: list[tuple[float, str]] = []
        while True:
            event = json.loads(ws.recv(timeout=300))
            if event["type"] == "ai.token":
                frames.append((time.perf_counter(), event["delta"]))
            elif event["type"] in ("ai.done", "error"):
                assert event["type"] == "ai.done", event
                n = int(event["usage"]["completion_tokens"])
                break
    # The server merges the tokens of an answer that wait side by side into one frame (a
    # fast model's tokens can come two in one pass of the event loop): such a frame's tokens
    # are counted by tokenising its text, all arriving with it; the last frame takes up any
    # difference from the server's own count, so the answer has exactly its n tokens
    if len(frames) == n:
        counts = [1] * n
    else:
        counts = [max(1, count(text)) for _, text in frames]
        counts[-1] = max(1, counts[-1] + n - sum(counts))
    times = [t for (t, _), c in zip(frames, counts, strict=True) for _ in range(c)]
    assert len(times) >= n, (len(times), n)
    return row(t0, times[:n]), len(frames), sum(c > 1 for c in counts)


def row(t0: float, times: list[float]) -> Row:
    """(TTFT ms, tokens/s over the whole answer, tokens, each token's time since the first)."""
    assert times
    n, first = len(times), times[0]
    rate = (n - 1) / (times[-1] - first) if n > 1 else 0.0
    return (first - t0) * 1000, rate, n, [t - first for t in times]


def prefix_rate(rows: Rows, k: int) -> float:
    """Median tokens/s over each answer's first ``k`` tokens: answers of different lengths
    (sampling, other questions) decode at different speeds, since every
    token attends to all before it."""
    return statistics.median((k - 1) / r[3][k - 1] for r in rows)


def raw(messages: list[dict[str, str]], llm: LlamaCppLLM) -> Row:
    """One answer straight from llama-cpp-python."""
    llama = llm._load_sync()
    # llama.cpp reuses the KV cache of the previous prompt's common prefix: both sides get the
    # same prompts in the same order, a new question each round, so they reuse the same (the
    # system prompt), as a server does from one question to the next
    # its prompt on as many threads as the server would give it (the cores idle now)
    llm._set_prompt_threads(llama, (time.monotonic(), _cpu_times()))
    t0 = time.perf_counter()
    times: list[float] = []
    for chunk in llama.create_chat_completion(
        messages,  # type: ignore[arg-type]
        stream=True,
        max_tokens=ANSWER_TOKENS,
        temperature=TEMPERATURE,
    ):
        if chunk["choices"][0]["delta"].get("content"):  # type: ignore[index]
            times.append(time.perf_counter())
    return row(t0, times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "state", _env_file=None)  # type: ignore[call-arg]
        report = Pipeline(settings, progress=False).run([ROOT / "data"])
        assert report.ok, report.errors
        port, prefix = free_port(), f"bench:{os.getpid()}:"
        env = {**os.environ, "RAG_DATA_DIR": str(settings.data_dir), "RAG_REDIS_PREFIX": prefix,
               "RAG_REDIS_URL": "redis://127.0.0.1:6379/13"}  # fmt: skip
        env.pop("RAG_LLM_BASE_URL", None)
        server = subprocess.Popen(
            [sys.executable, "-m", "rag_chat", "--port", str(port), "--log-level", "warning"],
            cwd=ROOT,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            # ready answers before the search process has loaded its model and index: the
            # first question would find a core busy with that start (its prompt then goes on
            # one thread, ~1.5 s later), which the raw side, loaded beforehand, never meets
            if not search_process_answers(url, time.monotonic() + 120):
                raise RuntimeError("the server's search process did not become ready")
            retriever = Retriever(settings)
            llm = LlamaCppLLM()
            asyncio.run(llm.load())
            served: Rows = []
            direct: Rows = []
            tokens: list[int] = []
            frames = merged = 0
            llama = llm._load_sync()

            def count(text: str) -> int:
                return len(llama.tokenize(text.encode(), add_bos=False, special=True))

            for i in range(args.runs):
                question = QUESTIONS[i % len(QUESTIONS)]
                hits = retriever.search(question, settings.top_k, "hybrid")
                prompt = build_prompt(llm, question, hits, [], ANSWER_TOKENS)
                tokens.append(prompt.tokens)
                if i % 2:  # every other round the raw model goes first
                    direct.append(raw(prompt.messages, llm))
                answer, n_frames, n_merged = through_server(url, f"b{i}", question, count)
                served.append(answer)
                frames, merged = frames + n_frames, merged + n_merged
                if not i % 2:
                    direct.append(raw(prompt.messages, llm))
        finally:
            server.terminate()
            server.wait(timeout=30)
            r = redis.Redis.from_url("redis://127.0.0.1:6379/13")
            keys = list(r.scan_iter(f"{prefix}*"))
            if keys:
                r.delete(*keys)

    def med(rows: Rows, i: int) -> float:
        return statistics.median(float(r[i]) for r in rows)  # type: ignore[arg-type]

    asked = QUESTIONS[: min(args.runs, len(QUESTIONS))]
    print(f"questions, one a round: {asked}; prompts {min(tokens)}-{max(tokens)} tokens")
    print(
        f"through rag_chat: {frames} ai.token frames, {merged} of them carrying several tokens "
        "(merged by the server while they waited side by side; their tokens counted by "
        "tokenising the frame's text, arriving with it)"
    )
    print(f"{'':22}{'TTFT ms (median)':>18}{'tokens/s (median)':>19}{'tokens':>8}")
    for name, rows in (("through rag_chat (WS)", served), ("raw llama-cpp-python", direct)):
        print(f"{name:22}{med(rows, 0):18.0f}{med(rows, 1):19.1f}{med(rows, 2):8.0f}")
    k = min(r[2] for r in (*served, *direct))
    through, alone = prefix_rate(served, k), prefix_rate(direct, k)
    print(
        f"server/raw: TTFT {med(served, 0) / med(direct, 0):.2f}x "
        f"({med(served, 0) - med(direct, 0):+.0f} ms: retrieval, prompt building, transport), "
        f"tokens/s over whole answers {med(served, 1) / med(direct, 1):.2f}"
    )
    print(
        f"tokens/s over the first {k} tokens of every answer (the same positions): "
        f"{through:.1f} through rag_chat vs {alone:.1f} raw: {through / alone:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
