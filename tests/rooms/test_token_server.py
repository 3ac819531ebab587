"""The synthetic token server (``python -m rag_chat.testing.token_server``) through the official
``openai`` SDK: deterministic answers, streaming and not, usage, ``/stats``, and a client that
goes away stops the production."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from rag_chat.llm.openai_compat import OpenAICompatLLM
from rag_chat.testing.token_server import parse_overrides, token_text
from tests.rooms.conftest import TokenServer, start_token_server

N = 40
RATE = 400.0
ASK = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def ts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    server = start_token_server(tmp_path_factory.mktemp("ts"), tokens=N, rate=RATE)
    try:
        yield server
    finally:
        server.proc.stop()


@pytest.fixture
def client(ts: TokenServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=ts.v1, api_key="unused", max_retries=0) as c:
        yield c


def ask(text: str) -> Any:
    return [{"role": "user", "content": text}]


def test_token_text_and_overrides() -> None:
    assert token_text(3) == "t0 t1 t2 "
    assert token_text(0) == ""
    assert parse_overrides("hi [[tokens=7 rate=2.5]]") == {"tokens": 7, "rate": 2.5}
    assert parse_overrides("[[tokens=1]] then [[rate=9]]") == {"rate": 9}
    assert parse_overrides("no [[directive]] here") == {}


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["token-server"]


def test_stream_is_deterministic_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="m", messages=ASK, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices]
    assert deltas[0] == ""  # the role chunk
    assert deltas[1:-1] == [f"t{i} " for i in range(N)]  # one token per chunk
    assert "".join(d or "" for d in deltas) == token_text(N)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert (usage.prompt_tokens, usage.completion_tokens) == (2, N)
    assert all(c.model == "m" and c.id == chunks[0].id for c in chunks)


def test_stream_max_tokens_is_length_and_no_usage_unless_asked(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model="m", messages=ASK, stream=True, max_tokens=5)
    )
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == token_text(5)
    assert chunks[-1].choices[0].finish_reason == "length"
    # max_tokens == the answer's length is not a cut: "stop"
    chunks = list(
        client.chat.completions.create(model="m", messages=ASK, stream=True, max_tokens=N)
    )
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_non_stream(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(model="m", messages=ASK)
    assert done.choices[0].message.content == token_text(N)
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == N
    cut = client.chat.completions.create(model="m", messages=ASK, max_completion_tokens=3)
    assert cut.choices[0].message.content == token_text(3)
    assert cut.choices[0].finish_reason == "length"


def test_per_request_override_and_rate(client: openai.OpenAI) -> None:
    t0 = time.monotonic()
    stream = client.chat.completions.create(
        model="m", messages=ask("long one please [[tokens=30 rate=100]]"), stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    took = time.monotonic() - t0
    assert text == token_text(30)
    assert took >= 0.25  # 30 tokens at 100/s: the first at once, the last after 0.29 s
    t0 = time.monotonic()
    fast = client.chat.completions.create(model="m", messages=ask("[[tokens=20000 rate=0]]"))
    assert fast.choices[0].message.content == token_text(20000)
    assert time.monotonic() - t0 < 5


def test_stats_count_requests_and_tokens(ts: TokenServer, client: openai.OpenAI) -> None:
    before = ts.wait_idle()
    list(client.chat.completions.create(model="m", messages=ASK, stream=True))
    client.chat.completions.create(model="m", messages=ASK, max_tokens=7)
    after = ts.wait_idle()
    assert after["requests"] - before["requests"] == 2
    assert after["completed"] - before["completed"] == 2
    assert after["tokens_sent"] - before["tokens_sent"] == N + 7
    assert after["cancelled"] == before["cancelled"] and after["active"] == 0
    recent = ts.stats(recent=2)["recent"]
    assert [(r["stream"], r["planned"], r["sent"], r["state"]) for r in recent] == [
        (True, N, N, "done"),
        (False, 7, 7, "done"),
    ]


def test_bad_requests_get_openai_errors(ts: TokenServer, client: openai.OpenAI) -> None:
    r = httpx.post(f"{ts.v1}/chat/completions", json={"model": "m"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{ts.v1}/chat/completions", content=b"{nope")
    assert r.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=ASK, max_tokens=0)


def test_a_client_that_disconnects_stops_the_stream(ts: TokenServer, client: openai.OpenAI) -> None:
    before = ts.wait_idle()
    stream = client.chat.completions.create(
        model="m", messages=ask("[[tokens=100000 rate=50]]"), stream=True
    )
    got = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got.append(chunk.choices[0].delta.content)
        if len(got) == 5:
            break
    assert ts.stats()["active"] == before["active"] + 1
    stream.close()  # drops the connection
    after = ts.wait_idle(5)
    assert after["active"] == 0
    assert after["cancelled"] == before["cancelled"] + 1
    record = ts.stats(recent=1)["recent"][0]
    assert record["state"] == "cancelled" and record["planned"] == 100000
    assert 5 <= record["sent"] < 50, record
    time.sleep(0.3)  # and nothing more is produced
    assert ts.stats()["tokens_sent"] == after["tokens_sent"]


def test_a_client_that_gives_up_stops_a_non_stream_answer(ts: TokenServer) -> None:
    before = ts.wait_idle()
    with (
        openai.OpenAI(base_url=ts.v1, api_key="x", max_retries=0, timeout=0.5) as impatient,
        pytest.raises(openai.APITimeoutError),
    ):
        impatient.chat.completions.create(model="m", messages=ask("[[tokens=1000 rate=100]]"))
    after = ts.wait_idle(5)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens_sent"] == before["tokens_sent"]
    assert ts.stats(recent=1)["recent"][0]["state"] == "cancelled"


async def test_rag_chat_backend_cancel_stops_the_token_server(
    ts: TokenServer, tmp_path: Path
) -> None:
    """rag_chat's own OpenAI-compatible backend: cancel() closes the stream in the backend."""
    llm = OpenAICompatLLM(ts.v1)
    try:
        before = ts.wait_idle()
        gen = llm.stream(ask("[[tokens=5000 rate=100]]"), max_tokens=4000)
        got = []
        async for delta in gen:
            got.append(delta)
            if len(got) == 3:
                await gen.cancel()
        assert gen.finish_reason == "cancelled"
        assert got[:3] == ["t0 ", "t1 ", "t2 "]
        after = ts.wait_idle(5)
        assert after["cancelled"] == before["cancelled"] + 1
        record = ts.stats(recent=1)["recent"][0]
        assert record["max_tokens"] == 4000 and record["sent"] < 40, record
        # and a whole answer through the same backend, with usage from the server
        gen = llm.stream(ask("short"), max_tokens=10)
        assert "".join([d async for d in gen]) == token_text(10)
        assert gen.finish_reason == "length" and gen.usage.completion_tokens == 10
    finally:
        await llm.aclose()


async def test_paced_tokens_are_written_by_timer_callbacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under uvicorn (httptools), a paced stream's chunks are written to the transport from
    timer callbacks rather than sent by its task through ASGI: the same bytes, read here by
    the official SDK; a stream that has no uvicorn send behind it takes the ASGI way."""
    import asyncio
    import socket

    import uvicorn

    from rag_chat.testing import token_server

    runs: list[int] = []
    real_run = token_server._Paced.run

    async def counting_run(self: token_server._Paced) -> int:
        sent = await real_run(self)
        runs.append(sent)
        return sent

    monkeypatch.setattr(token_server._Paced, "run", counting_run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        token_server.create_app(tokens=25, rate=500.0),
        port=port,
        http="httptools",
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
        ) as client:
            stream = await client.chat.completions.create(model="m", messages=ASK, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == token_text(25)
        assert runs == [25]  # every token through the callbacks
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
    assert token_server._direct(lambda message: None) is None  # type: ignore[arg-type, return-value]
