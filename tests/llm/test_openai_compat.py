"""OpenAICompatLLM against a real OpenAI-compatible server: llama-cpp-python's, serving SmolLM2."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from rag_chat.errors import LLMError, LLMTimeout, LLMUnavailable
from rag_chat.llm import Generation, complete, openai_compat
from rag_chat.llm.llama import default_model_path
from rag_chat.llm.openai_compat import OpenAICompatLLM

STORY = [{"role": "user", "content": "Tell me a long story about a cat and a dog."}]
SERVER_START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str  # the OpenAI base URL, ending in /v1
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(default_model_path()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        # one thread for prompts too: oversubscribed llama.cpp threads crawl on a busy 2-core box
        "--n_threads",
        "1",
        "--n_threads_batch",
        "1",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited ({proc.returncode}):\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/models", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer in time:\n{log.read_text()}")
            time.sleep(0.2)
        yield Server(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_streams_with_the_model_resolved_from_the_server(server: Server) -> None:
    served = httpx.get(f"{server.url}/models").json()["data"][0]["id"]
    llm = OpenAICompatLLM(server.url)
    try:
        gen = llm.stream([{"role": "user", "content": "Say hello in five words."}], max_tokens=16)
        deltas = [d async for d in gen]
        assert llm.model_name == served
        assert len(deltas) >= 3
        assert all(d for d in deltas)
        assert gen.finish_reason in {"stop", "length"}
        # llama-cpp-python's server sends no usage; it is estimated then
        assert gen.usage.prompt_tokens > 0
        assert 0 < gen.usage.completion_tokens <= 16
        assert gen.produced == len(deltas)

        text, reason, usage = await complete(llm, STORY, max_tokens=4)
        assert text.strip()
        assert reason == "length"
        assert usage.completion_tokens == 4
    finally:
        await llm.aclose()


async def test_check_resolves_the_model(server: Server) -> None:
    llm = OpenAICompatLLM(server.url)
    try:
        await llm.check()
        assert llm.model_name.endswith(".gguf")
    finally:
        await llm.aclose()
    named = OpenAICompatLLM(server.url, model="my-model", context_window=4096)
    try:
        await named.check()
        assert named.model_name == "my-model"
        assert named.context_window == 4096
    finally:
        await named.aclose()


async def test_cancel_closes_the_stream(server: Server) -> None:
    llm = OpenAICompatLLM(server.url)
    try:
        gen = llm.stream(STORY, max_tokens=400)
        deltas: list[str] = []

        async def consume() -> None:
            async for delta in gen:
                deltas.append(delta)

        consumer = asyncio.create_task(consume())
        for _ in range(2000):
            if len(deltas) >= 3 or consumer.done():
                break
            await asyncio.sleep(0.005)
        assert len(deltas) >= 3

        disconnects = server.log.read_text().count("Disconnected from client")
        await gen.cancel()
        await asyncio.wait_for(consumer, 5)
        assert gen.finish_reason == "cancelled"
        produced = gen.produced
        assert produced < 400
        await asyncio.sleep(0.3)
        assert gen.produced == produced
        # the server saw the client go away, which is what stops its generation
        for _ in range(100):
            if server.log.read_text().count("Disconnected from client") > disconnects:
                break
            await asyncio.sleep(0.05)
        assert server.log.read_text().count("Disconnected from client") > disconnects

        await gen.cancel()  # idempotent
        _, reason, _ = await complete(llm, STORY, max_tokens=2)
        assert reason == "length"
    finally:
        await llm.aclose()


async def test_cancel_before_iteration(server: Server) -> None:
    llm = OpenAICompatLLM(server.url)
    try:
        gen: Generation = llm.stream(STORY, max_tokens=4)
        await gen.cancel()
        assert gen.finish_reason == "cancelled"
        assert [d async for d in gen] == []
    finally:
        await llm.aclose()


async def test_http_errors_are_llm_errors(server: Server) -> None:
    wrong_path = OpenAICompatLLM(server.url.removesuffix("/v1") + "/nowhere/v1", model="m")
    try:
        with pytest.raises(LLMError, match="404") as err:
            await complete(wrong_path, STORY, max_tokens=2)
        assert type(err.value) is LLMError
        with pytest.raises(LLMUnavailable, match="404"):
            await wrong_path.check()
    finally:
        await wrong_path.aclose()


async def test_a_server_that_is_down_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    llm = OpenAICompatLLM(url)
    try:
        with pytest.raises(LLMUnavailable, match="cannot reach") as err:
            await llm.check()
        assert url in str(err.value)
        assert "\n" not in str(err.value)

        gen = llm.stream(STORY, max_tokens=4)
        with pytest.raises(LLMUnavailable, match="cannot reach"):
            async for _ in gen:
                pass
        assert gen.finish_reason is None
        assert llm.model_name == "unresolved"
    finally:
        await llm.aclose()


class _StubHandler(BaseHTTPRequestHandler):
    """A minimal OpenAI-style server for the corners llama-cpp's server does not show: one that
    rejects ``stream_options`` (strict), one that sends a usage chunk, one that stalls."""

    strict = False
    stall_s = 0.0
    gap_s = 0.0  # a pause after the first event of the stream
    # the event stream with CRLF (or lone CR) line ends, written a few bytes at a time
    line_end = "\n"
    piece = 0
    requests: list[dict[str, object]]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not self.piece and not self.gap_s:
                self.wfile.write(body)
                return
            self.wfile.flush()
            if self.gap_s:  # the first event, then silence, then the rest
                first = body.index(b"\n\n") + 2
                self.wfile.write(body[:first])
                self.wfile.flush()
                time.sleep(self.gap_s)
                self.wfile.write(body[first:])
                return
            for i in range(0, len(body), self.piece):  # each piece its own network read
                self.wfile.write(body[i : i + self.piece])
                self.wfile.flush()
                time.sleep(0.002)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a stall
            pass

    def do_GET(self) -> None:
        self._send(200, b'{"object": "list", "data": [{"id": "stub-model"}]}', "application/json")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(body)
        time.sleep(self.stall_s)
        if self.strict and "stream_options" in body:
            error = {"error": {"message": "Unrecognized request argument: stream_options"}}
            self._send(400, json.dumps(error).encode(), "application/json")
            return
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "stub-model"}
        chunks = [
            {**base, "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        if "stream_options" in body:
            usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
            chunks.append({**base, "choices": [], "usage": usage})
        end = self.line_end
        sse = "".join(f"data: {json.dumps(c)}{end}{end}" for c in chunks) + f"data: [DONE]{end}"
        self._send(200, sse.encode(), "text/event-stream")


@contextlib.contextmanager
def run_stub(
    strict: bool = False,
    stall_s: float = 0.0,
    line_end: str = "\n",
    piece: int = 0,
    gap_s: float = 0.0,
) -> Iterator[tuple[str, list[dict[str, object]]]]:
    requests: list[dict[str, object]] = []

    class Handler(_StubHandler):
        pass

    Handler.strict, Handler.stall_s, Handler.requests = strict, stall_s, requests
    Handler.line_end, Handler.piece, Handler.gap_s = line_end, piece, gap_s
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(params=[False, True], ids=["sends-usage", "rejects-stream-options"])
def stub(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[dict[str, object]]]]:
    with run_stub(strict=request.param) as running:
        yield running


async def test_a_stalled_server_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_compat, "READ_TIMEOUT_S", 0.2)
    with run_stub(stall_s=1.0) as (url, _):
        llm = OpenAICompatLLM(url, model="stub-model", max_retries=0)
        try:
            with pytest.raises(LLMTimeout, match="timed out"):
                await complete(llm, STORY, max_tokens=4)
        finally:
            await llm.aclose()


async def test_a_stream_that_stops_midway_times_out_after_its_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read timeout holds between events too, where the stream is read straight from the
    aiohttp response: the first token arrives, then silence past the timeout."""
    monkeypatch.setattr(openai_compat, "READ_TIMEOUT_S", 0.5)
    with run_stub(gap_s=3.0) as (url, _):
        llm = OpenAICompatLLM(url, model="stub-model", max_retries=0)
        try:
            gen = llm.stream(STORY, max_tokens=4)
            got: list[str] = []
            t0 = time.monotonic()
            with pytest.raises(LLMTimeout, match="timed out"):
                async for delta in gen:
                    got.append(delta)
                    # one timer for every open stream keeps the timeout, not aiohttp's
                    # timer moved at each read
                    (body,) = [entry[2] for entry in llm._idle._streams.values()]
                    assert body.connection.protocol.read_timeout is None
            assert got == ["Hi"]
            assert 0.4 < time.monotonic() - t0 < 2.5  # the timeout, not the server's pause
            assert not llm._idle._streams
        finally:
            await llm.aclose()
    # and a stream with pauses shorter than the timeout is read whole, after the pause
    monkeypatch.setattr(openai_compat, "READ_TIMEOUT_S", 2.0)
    with run_stub(gap_s=0.8) as (url, _):
        llm = OpenAICompatLLM(url, model="stub-model", max_retries=0)
        try:
            assert "".join([d async for d in llm.stream(STORY, max_tokens=4)]) == "Hi!"
        finally:
            await llm.aclose()


async def test_usage_is_read_when_sent_and_stream_options_dropped_when_rejected(
    stub: tuple[str, list[dict[str, object]]],
) -> None:
    url, requests = stub
    llm = OpenAICompatLLM(url)
    try:
        for _ in range(2):
            text, reason, usage = await complete(llm, STORY, max_tokens=8)
            assert (text, reason) == ("Hi!", "stop")
            assert usage.completion_tokens == 2
        assert llm.model_name == "stub-model"
        # the messages reach the server as given (they travel in extra_body)
        assert all(r["messages"] == STORY for r in requests)
        if len(requests) == 2:  # the server took stream_options and reported usage
            assert usage.prompt_tokens == 11
            assert all("stream_options" in r for r in requests)
        else:  # rejected once, then never sent again; usage estimated
            assert ["stream_options" in r for r in requests] == [True, False, False]
            assert usage.prompt_tokens == llm.count_tokens(STORY[0]["content"])
    finally:
        await llm.aclose()


async def test_the_event_stream_is_read_from_the_aiohttp_response() -> None:
    """The fast path (rag_chat.llm.openai_compat._aiohttp_body) finds the aiohttp response
    under the installed SDK's: if an SDK upgrade moves it, this fails rather than the server
    quietly falling back to the SDK's (slower) line iterator."""
    with run_stub() as (url, _):
        llm = OpenAICompatLLM(url, model="stub-model")
        try:
            async with llm._client.chat.completions.with_streaming_response.create(
                model="stub-model", messages=[{"role": "user", "content": "hi"}], stream=True
            ) as response:
                body = openai_compat._aiohttp_body(response)
                assert body is not None
                lines = [line async for line in openai_compat._lines(response)]
            assert lines[0].startswith("data: {") and lines[1] == "" and lines[-1] == ""
            assert "data: [DONE]" in lines
        finally:
            await llm.aclose()


@pytest.mark.parametrize("line_end", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("piece", [0, 1, 5], ids=["whole", "bytewise", "5-byte-pieces"])
async def test_line_ends_and_events_cut_across_reads(line_end: str, piece: int) -> None:
    """Events whose lines end in LF, CRLF or a lone CR, arriving whole or a few bytes per read
    (a CRLF cut between two reads included), give the same answer and usage."""
    with run_stub(line_end=line_end, piece=piece) as (url, _):
        llm = OpenAICompatLLM(url, model="stub-model")
        try:
            text, reason, usage = await complete(llm, STORY, max_tokens=8)
            assert (text, reason) == ("Hi!", "stop")
            assert (usage.prompt_tokens, usage.completion_tokens) == (11, 2)
        finally:
            await llm.aclose()


async def test_the_reader_is_told_when_a_read_has_more_lines() -> None:
    """``_Read.more`` (whether the pump yields to the loop after a token): True between the
    lines of one network read, False at its last line: an event that came alone (a paced
    model's token) costs no extra turn of the loop, events that came together are still handed
    on one by one."""
    with run_stub(gap_s=0.3) as (url, _):  # the first event, a pause, then the rest at once
        llm = OpenAICompatLLM(url, model="stub-model")
        try:
            async with llm._client.chat.completions.with_streaming_response.create(
                model="stub-model", messages=[{"role": "user", "content": "hi"}], stream=True
            ) as response:
                read = openai_compat._Read()
                seen = [(line, read.more) async for line in openai_compat._lines(response, read)]
        finally:
            await llm.aclose()
    blanks = [more for line, more in seen if line == ""]
    # the first event's blank line ends its read; the next two blank lines have more of the
    # second read after them; the last line is the end of the body
    assert seen[0][0].startswith("data: {") and seen[0][1] is True
    assert blanks[0] is False and blanks[1] is True and blanks[2] is True
    assert seen[-2] == ("data: [DONE]", False)
    assert seen[-1] == ("", True)


async def test_the_stream_is_told_when_a_read_has_more_chunks() -> None:
    """The same for the chunks the stream is parsed into, a network read at a time: the
    first chunk came alone in its read; of the second read's chunks all but the last have
    more after them."""
    with run_stub(gap_s=0.3) as (url, _):
        llm = OpenAICompatLLM(url, model="stub-model")
        try:
            async with llm._client.chat.completions.with_streaming_response.create(
                model="stub-model",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            ) as response:
                read = openai_compat._Read()
                seen = [
                    (chunk.get("usage") is not None, read.more)
                    async for chunk in openai_compat._chunks(response, url, read)
                ]
        finally:
            await llm.aclose()
    assert seen == [(False, False), (False, True), (False, True), (True, True)]
    assert read.reads >= 2
