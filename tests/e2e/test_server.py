"""End to end: a real `python -m rag_chat` process with the real embedded SmolLM2 model,
real retrieval over the bundled guide and real Redis; clients as a user would run them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from websockets.sync.client import connect

from tests.conftest import ROOT, TEST_REDIS_DB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, guide_index: Path) -> Iterator[str]:
    port = free_port()
    prefix = f"test:e2e:{os.getpid()}:{port}:"
    env = {
        **os.environ,
        "RAG_DATA_DIR": str(guide_index),
        "RAG_REDIS_PREFIX": prefix,
        "RAG_REDIS_URL": f"redis://127.0.0.1:6379/{TEST_REDIS_DB}",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("RAG_LLM_BASE_URL", None)
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rag_chat", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        import redis

        r = redis.Redis.from_url(f"redis://127.0.0.1:6379/{TEST_REDIS_DB}")
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)
        r.close()


QUESTION = "How do I ingest PDF files with python -m ingest?"


def ws_ask(url: str, text: str, **extra: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with connect(url.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "message", "text": text, **extra}))
        while True:
            event = json.loads(ws.recv(timeout=120))
            event["_t"] = time.monotonic()
            events.append(event)
            if event["type"] in ("ai.done", "error"):
                return events


def test_websocket_answer_streams_with_sources_from_the_guide(server: str) -> None:
    events = [e for e in ws_ask(server, QUESTION) if e["type"].startswith(("ai.", "error"))]
    types = [e["type"] for e in events]
    assert types[:2] == ["ai.start", "ai.sources"] and types[-1] == "ai.done", events[-1]
    sources = events[1]["chunks"]
    assert any(c["source"] == "data/guide/ingesting.md" for c in sources[:3])
    tokens = [e for e in events if e["type"] == "ai.token"]
    assert len(tokens) > 3 and "".join(t["delta"] for t in tokens).strip()
    # streamed: the first token arrived well before the answer was complete
    assert tokens[0]["_t"] < events[-1]["_t"]
    done = events[-1]
    assert done["finish_reason"] in ("stop", "length")
    assert done["usage"]["completion_tokens"] >= len(tokens) - 1
    assert done["timings"]["ttft_ms"] > 0 and done["timings"]["tokens_per_s"] > 0
    assert done["timings"]["admit_ms"] > 0  # the question's arrival to the reply's start


def test_websocket_cancel_with_the_real_model(server: str) -> None:
    with connect(server.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "message", "text": "Explain every configuration setting."}))
        while (start := json.loads(ws.recv(timeout=60)))["type"] != "ai.start":
            pass
        while json.loads(ws.recv(timeout=60))["type"] != "ai.token":
            pass
        ws.send(json.dumps({"type": "cancel", "message_id": start["message_id"]}))
        while (event := json.loads(ws.recv(timeout=60)))["type"] != "ai.done":
            pass
    assert event["finish_reason"] == "cancelled"


def metric(url: str, line_start: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_searches_run_in_the_search_process(server: str) -> None:
    deadline = time.monotonic() + 120
    while metric(server, "rag_search_process_ready ") != 1.0:
        assert time.monotonic() < deadline, "the search process never became ready"
        time.sleep(0.5)
    before = metric(server, 'rag_searches_total{where="process"}')
    events = ws_ask(server, "Which Redis settings are there?")
    assert events[-1]["type"] == "ai.done"
    assert metric(server, 'rag_searches_total{where="process"}') == before + 1


def test_the_server_froze_what_it_loaded_at_start(server: str) -> None:
    """Full garbage collections would scan the loaded models and index again and again with
    the GIL held (up to 230 ms each under load): the server exempts them once started."""
    assert metric(server, "rag_gc_frozen_objects ") > 50_000


def test_sse_with_a_plain_http_client(server: str) -> None:
    seen: list[str] = []
    with httpx.stream("POST", f"{server}/api/chat", json={"message": QUESTION}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                seen.append(line[7:])
    # the stream's presence join is written beside the question: before or after the message
    assert seen.count("presence") == 1
    rest = [e for e in seen if e != "presence"]
    assert rest[:3] == ["message", "ai.start", "ai.sources"] and rest[-1] == "ai.done"
    assert seen.count("ai.token") > 3


def test_openai_sdk_streaming_and_not(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    completion = client.chat.completions.create(
        model="rag_chat", messages=[{"role": "user", "content": QUESTION}], max_tokens=64
    )
    assert completion.choices[0].message.content
    assert any(s["source"] == "data/guide/ingesting.md" for s in completion.model_extra["sources"])
    stream = client.chat.completions.create(
        model="rag_chat", messages=[{"role": "user", "content": QUESTION}], stream=True
    )
    chunks = list(stream)
    assert chunks[0].model_extra["sources"]
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(deltas) > 3


def test_conversation_memory_over_rest(server: str) -> None:
    events = ws_ask(server, "Which port does the server use?", conversation_id="e2e-conv")
    assert events[-1]["type"] == "ai.done"
    msgs = httpx.get(f"{server}/api/conversations/e2e-conv/messages").json()["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[1]["content"] == "".join(e["delta"] for e in events if e["type"] == "ai.token")
