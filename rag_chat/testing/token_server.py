"""A synthetic OpenAI-compatible chat server whose answers are known in advance.

    python -m rag_chat.testing.token_server --port 8100 --tokens 64 --rate 50

Serves ``GET /v1/models`` and ``POST /v1/chat/completions`` (streaming or not, the OpenAI chunk
format, ``stream_options.include_usage`` honoured). The answer is ``n = min(tokens,
max_tokens)`` tokens, token ``i`` being ``f"t{i} "`` (:func:`token_text` gives the whole text),
sent at ``rate`` tokens per second (0: as fast as possible); ``finish_reason`` is ``"length"``
when ``max_tokens < tokens``, else ``"stop"``. A request may override the server's ``tokens``
and ``rate`` with ``[[tokens=N rate=R]]`` (either key) in its last message: one long, slow
answer from a server set up for short, fast ones. ``delay=S`` in the same brackets holds the
response (its status line and headers too) for S seconds: a backend that does not answer.

A client that disconnects stops the production at once (the stream is cancelled, not drained),
which ``GET /stats`` proves: ``{"requests", "tokens_sent", "active", "cancelled", "completed"}``
(``?recent=K`` adds the last K requests: planned and sent tokens, state). ``DELETE /stats``
resets the counters.

Built for benchmarks with thousands of concurrent streams: the bytes of every chunk are a
per-request prefix and suffix around a pre-encoded token, tokens that fell due together go out
in one write, a paced stream's chunks are written from timer callbacks under uvicorn (no task
woken per token), and nothing is logged per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import sys
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

MAX_TOKENS = 1_000_000  # the most tokens one answer may have
FAST_BATCH = 64  # tokens per write at rate 0 (the loop is yielded to between writes)
MIN_SLEEP_S = 0.001
RECENT = 1024  # requests kept for ``/stats?recent=K``
_OVERRIDE = re.compile(r"\[\[((?:\s*(?:tokens|rate|delay)=[0-9.]+)+)\s*\]\]")

State = Literal["active", "done", "cancelled"]

_token_bytes: list[bytes] = []


def _tokens(n: int) -> list[bytes]:
    """The first ``n`` tokens, encoded once per process."""
    while len(_token_bytes) < n:
        _token_bytes.append(f"t{len(_token_bytes)} ".encode())
    return _token_bytes


def token_text(n: int) -> str:
    """The whole answer of ``n`` tokens: ``"t0 t1 … t{n-1} "``."""
    return "".join(f"t{i} " for i in range(n))


def parse_overrides(text: str) -> dict[str, float]:
    """``{"tokens": N, "rate": R, "delay": S}`` from the last ``[[tokens=N rate=R delay=S]]``
    in ``text`` (any of the keys)."""
    found: dict[str, float] = {}
    matches = _OVERRIDE.findall(text)
    if matches:
        for pair in matches[-1].split():
            key, _, value = pair.partition("=")
            with contextlib.suppress(ValueError):
                found[key] = float(value)
    return found


@dataclass(slots=True)
class Record:
    id: int
    stream: bool
    planned: int
    max_tokens: int | None
    rate: float
    delay: float = 0.0
    sent: int = 0
    state: State = "active"


@dataclass
class Stats:
    requests: int = 0
    tokens_sent: int = 0
    active: int = 0
    cancelled: int = 0
    completed: int = 0
    recent: deque[Record] = field(default_factory=lambda: deque(maxlen=RECENT))

    def view(self, recent: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "tokens_sent": self.tokens_sent,
            "active": self.active,
            "cancelled": self.cancelled,
            "completed": self.completed,
        }
        if recent > 0:
            out["recent"] = [asdict(r) for r in list(self.recent)[-recent:]]
        return out


def _error(message: str, status: int = 400) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return JSONResponse(body, status_code=status)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


class _Completion(Response):
    """One completion: produced by a task that a client disconnect cancels."""

    def __init__(
        self,
        stats: Stats,
        record: Record,
        *,
        model: str,
        finish: str,
        prompt_tokens: int,
        include_usage: bool,
    ) -> None:
        self.stats = stats
        self.record = record
        self.model = model
        self.finish = finish
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.cid = f"chatcmpl-{record.id}"
        self.created = int(time.time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stats, record = self.stats, self.record
        stats.active += 1
        produce = self._delayed(self._stream(send) if record.stream else self._whole(send))
        producer = asyncio.ensure_future(produce)
        watcher = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (producer, watcher):
                if not task.done():
                    task.cancel()
            for task in (producer, watcher):
                with contextlib.suppress(BaseException):
                    await task
            stats.active -= 1
            if record.state == "done":
                stats.completed += 1
            else:
                record.state = "cancelled"
                stats.cancelled += 1
        # a disconnect is not an error (uvicorn's send() to a gone client returns quietly), a
        # failing producer is: let the server log it
        if not producer.cancelled() and (error := producer.exception()) is not None:
            raise error

    async def _delayed(self, produce: Coroutine[Any, Any, None]) -> None:
        try:
            if self.record.delay > 0:
                await asyncio.sleep(self.record.delay)
        except BaseException:
            produce.close()  # never started: no "never awaited" warning
            raise
        await produce

    def _usage(self) -> dict[str, int]:
        sent = self.record.sent
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": sent,
            "total_tokens": self.prompt_tokens + sent,
        }

    async def _stream(self, send: Send) -> None:
        record, stats = self.record, self.stats
        meta = {"id": self.cid, "object": "chat.completion.chunk", "created": self.created}
        head = json.dumps(meta, separators=(",", ":"))[:-1]
        model = json.dumps(self.model)
        prefix = f'data: {head},"model":{model},"choices":[{{"index":0,"delta":'.encode()
        open_content = prefix + b'{"content":"'
        suffix = b'"},"finish_reason":null}]}\n\n'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        first = prefix + b'{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
        await send({"type": "http.response.body", "body": first, "more_body": True})
        n, rate = record.planned, record.rate
        tokens = _tokens(n)
        loop = asyncio.get_running_loop()
        start = loop.time()
        cycle = _direct(send) if rate > 0 else None
        i = 0
        while i < n:
            if cycle is not None and _writable(cycle):
                # paced, and the connection takes writes now: the tokens go out from timer
                # callbacks; this task wakes when they are all out or the socket is full
                paced = _Paced(
                    cycle, stats, record, open_content, tokens, suffix, i, n, rate, start
                )
                i = await paced.run()
                if i < n:  # the socket is full: wait for it the ASGI way, then on
                    cycle = None
                continue
            if rate > 0:
                due = min(n, int((loop.time() - start) * rate) + 1)
                if due <= i:
                    await asyncio.sleep(max(start + i / rate - loop.time(), MIN_SLEEP_S))
                    continue
            else:
                due = min(n, i + FAST_BATCH)
            body = b"".join([open_content + t + suffix for t in tokens[i:due]])
            await send({"type": "http.response.body", "body": body, "more_body": True})
            stats.tokens_sent += due - i
            record.sent = i = due
            if rate <= 0:
                await asyncio.sleep(0)  # let other streams and the disconnect watcher run
        end = prefix + b'{},"finish_reason":"' + self.finish.encode() + b'"}]}\n\n'
        if self.include_usage:
            usage = json.dumps({"usage": self._usage()}, separators=(",", ":"))[1:]
            end += f'data: {head},"model":{model},"choices":[],{usage}\n\n'.encode()
        end += b"data: [DONE]\n\n"
        record.state = "done"
        await send({"type": "http.response.body", "body": end, "more_body": False})

    async def _whole(self, send: Send) -> None:
        record, stats = self.record, self.stats
        if record.rate > 0 and record.planned:
            await asyncio.sleep(record.planned / record.rate)
        record.sent = record.planned
        stats.tokens_sent += record.planned
        body = {
            "id": self.cid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": token_text(record.planned)},
                    "finish_reason": self.finish,
                }
            ],
            "usage": self._usage(),
        }
        raw = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode()),
                ],
            }
        )
        record.state = "done"
        await send({"type": "http.response.body", "body": raw, "more_body": False})


def _direct(send: Send) -> Any:
    """uvicorn's HTTP cycle (httptools) behind ``send`` when the app was handed uvicorn's own
    send, and its response body goes out chunked: the paced path writes chunks to its
    transport itself. None otherwise (another server, a wrapped send): the ASGI send."""
    cycle = getattr(send, "__self__", None)
    needed = ("transport", "flow", "chunked_encoding", "disconnected", "response_complete")
    if cycle is None or not all(hasattr(cycle, name) for name in needed):
        return None
    return cycle if cycle.chunked_encoding else None


def _writable(cycle: Any) -> bool:
    return not (
        cycle.disconnected
        or cycle.response_complete
        or cycle.flow.write_paused
        or cycle.transport.is_closing()
    )


class _Paced:
    """One paced stream's tokens written from timer callbacks, the way uvicorn writes a
    chunk of a chunked body, with no task woken per token: with a thousand streams paced
    at 20 tokens/s, a sleep and an ASGI send per token (through two middleware wrappers)
    took the token server a third of a core, beside the server it feeds on the same two
    cores. ``run`` returns the tokens sent: all, or fewer when the socket filled up (the
    caller goes on through the ASGI send, which waits for it) or the client went."""

    def __init__(
        self,
        cycle: Any,
        stats: Stats,
        record: Record,
        head: bytes,
        tokens: list[bytes],
        tail: bytes,
        i: int,
        n: int,
        rate: float,
        start: float,
    ) -> None:
        self.cycle, self.stats, self.record = cycle, stats, record
        self.head, self.tokens, self.tail = head, tokens, tail  # a chunk: head + token + tail
        self.i, self.n, self.rate, self.start = i, n, rate, start
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.timer: asyncio.TimerHandle | None = None

    async def run(self) -> int:
        self.timer = self.loop.call_at(self.start + self.i / self.rate, self._emit)
        try:
            await self.done
        finally:  # cancelled (the client went): no more writes
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        return self.i

    def _emit(self) -> None:
        self.timer = None
        if self.done.done():
            return
        if not _writable(self.cycle):
            self.done.set_result(None)
            return
        i = self.i
        now = self.loop.time()
        due = min(self.n, int((now - self.start) * self.rate) + 1)
        if due > i:
            body = b"".join([self.head + t + self.tail for t in self.tokens[i:due]])
            self.cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
            self.stats.tokens_sent += due - i
            self.record.sent = self.i = due
        if self.i >= self.n:
            self.done.set_result(None)
        else:
            # a timer may fire a little early (libuv counts milliseconds): never again at
            # once, or it would spin until the token is due
            at = max(self.start + self.i / self.rate, now + MIN_SLEEP_S)
            self.timer = self.loop.call_at(at, self._emit)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(tokens: int = 64, rate: float = 0.0, model: str = "token-server") -> ASGIApp:
    """The token server's ASGI app: ``tokens`` per answer at ``rate`` tokens/s (0: at once)."""
    stats = Stats()
    ids = itertools.count(1)

    async def models(request: Request) -> JSONResponse:
        card = {"id": model, "object": "model", "created": 0, "owned_by": "rag_chat"}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return _error(f"invalid JSON body: {exc}")
        if not isinstance(body, dict):
            return _error("the body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error("'messages' must be a non-empty list")
        if not all(isinstance(m, dict) for m in messages):
            return _error("every message must be an object")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            return _error("'max_tokens' must be a positive integer")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            return _error("'stream_options' must be an object")
        texts = [_text(m.get("content")) for m in messages]
        overrides = parse_overrides(texts[-1])
        want = int(min(overrides.get("tokens", tokens), MAX_TOKENS))
        planned = want if limit is None else min(want, limit)
        finish = "length" if limit is not None and limit < want else "stop"
        record = Record(
            id=next(ids),
            stream=bool(body.get("stream")),
            planned=planned,
            max_tokens=limit,
            rate=max(0.0, overrides.get("rate", rate)),
            delay=max(0.0, overrides.get("delay", 0.0)),
        )
        stats.requests += 1
        stats.recent.append(record)
        return _Completion(
            stats,
            record,
            model=str(body.get("model") or model),
            finish=finish,
            prompt_tokens=sum(len(t.split()) for t in texts),
            include_usage=bool(options.get("include_usage")),
        )

    async def get_stats(request: Request) -> JSONResponse:
        try:
            recent = int(request.query_params.get("recent", "0"))
        except ValueError:
            return _error("'recent' must be an integer")
        return JSONResponse(stats.view(recent))

    async def reset_stats(request: Request) -> JSONResponse:
        stats.requests = stats.tokens_sent = stats.cancelled = stats.completed = 0
        stats.recent.clear()
        return JSONResponse(stats.view())

    app = Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/stats", get_stats, methods=["GET"]),
            Route("/stats", reset_stats, methods=["DELETE"]),
        ]
    )

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        # a completion gets the server's own send, unwrapped by Starlette's middleware (what
        # lets a paced stream write its chunks itself); everything else goes through Starlette
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].rstrip("/") == "/v1/chat/completions"
        ):
            response = await completions(Request(scope, receive))
            await response(scope, receive, send)
            return
        await app(scope, receive, send)

    return serve


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rag_chat.testing.token_server",
        description="A synthetic OpenAI-compatible server: token i of every answer is 't{i} '.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer (default 64)")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="tokens per second per stream; 0: at once"
    )
    parser.add_argument("--model", default="token-server", help="the model id it lists")
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    if not 0 <= args.tokens <= MAX_TOKENS:
        parser.error(f"--tokens must be 0-{MAX_TOKENS}")
    if args.rate < 0:
        parser.error("--rate must be >= 0")

    import uvicorn

    uvicorn.run(
        create_app(args.tokens, args.rate, args.model),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        backlog=4096,
        timeout_keep_alive=30,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
