"""The WebSocket send the app makes from plain code (``send_text_now``, rag_chat.server), on a
real uvicorn with rag_chat's protocol and a real WebSocket client; and the connection's use of
it, which must keep every event in order when it falls back to the ASGI send."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

from rag_chat.api.ws import SEND_TEXT_NOW, Connection
from rag_chat.auth import anonymous
from rag_chat.server import _text_header, ws_protocol

BIG = "x" * 60_000  # a few of these fill the socket's buffers of a client that does not read


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class App:
    """Accepts, sends what ``plan`` says through ``send_text_now``, and records each answer."""

    def __init__(self) -> None:
        self.extension: Any = None
        self.answers: list[bool] = []
        self.go = asyncio.Event()
        self.done = asyncio.Event()
        self.frames = 0  # messages to send; 0: fill the client's buffers until refused
        self.plan: list[str] = []  # or these messages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "websocket"
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        self.extension = scope.get("extensions", {}).get(SEND_TEXT_NOW)
        await self.go.wait()
        if self.plan:
            for text in self.plan:
                self.answers.append(self.extension(text))
        elif self.frames:
            for i in range(self.frames):
                self.answers.append(self.extension(f"m{i}"))
        else:
            for _ in range(2_000):  # 120 MB at most: far more than any buffer here
                sent = self.extension(BIG)
                self.answers.append(sent)
                if not sent:
                    break
                await asyncio.sleep(0)  # let the transport write what it can
        self.done.set()
        while (await receive())["type"] != "websocket.disconnect":
            pass
        # after the client is gone: refused, not raised
        self.answers.append(self.extension("late"))


@pytest.fixture
async def server() -> AsyncIterator[tuple[App, str]]:
    app = App()
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, ws=ws_protocol(), lifespan="off", log_level="warning"
    )
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve())
    for _ in range(500):
        if srv.started:
            break
        await asyncio.sleep(0.01)
    assert srv.started
    try:
        yield app, f"ws://127.0.0.1:{port}/"
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_the_server_offers_a_send_that_goes_out_at_once(server: tuple[App, str]) -> None:
    app, url = server
    app.frames = 5
    async with connect(url) as ws:
        app.go.set()
        await asyncio.wait_for(app.done.wait(), 5)
        assert app.answers == [True] * 5
        assert [await asyncio.wait_for(ws.recv(), 5) for _ in range(5)] == [
            f"m{i}" for i in range(5)
        ]
    for _ in range(200):
        if len(app.answers) == 6:
            break
        await asyncio.sleep(0.01)
    assert app.answers[5] is False  # the client went: the ASGI send reports it


@pytest.mark.parametrize("compression", ["deflate", None])
async def test_frames_of_every_header_size_arrive_whole(
    server: tuple[App, str], compression: str | None
) -> None:
    """Plain frames are written by rag_chat (7-bit and 16-bit lengths); longer messages, and
    those of 256 bytes or more where deflate was negotiated, go through websockets."""
    app, url = server
    sizes = [0, 1, 125, 126, 255, 256, 300, 65_535, 65_536, 70_000]
    texts = ["é" * (n // 2) + "x" * (n % 2) for n in sizes]  # n bytes of UTF-8 each
    app.plan = texts
    async with connect(url, compression=compression, max_size=None) as ws:
        app.go.set()
        await asyncio.wait_for(app.done.wait(), 5)
        assert app.answers == [True] * len(texts)
        assert [await asyncio.wait_for(ws.recv(), 5) for _ in texts] == texts


def test_a_plain_frame_is_what_websockets_would_write() -> None:
    for n in [0, 1, 125, 126, 127, 255, 256, 4_096, 65_535]:
        data = b"x" * n
        assert _text_header(n) + data == Frame(Opcode.TEXT, data).serialize(
            mask=False, extensions=[]
        )


async def test_a_client_that_does_not_read_is_refused_not_buffered(
    server: tuple[App, str],
) -> None:
    app, url = server
    # the client reads nothing: once its socket and the server's write buffer are full, the
    # server stops taking frames (the app then waits in the ASGI send, or gives up on it)
    async with connect(url, max_queue=1, max_size=None, compression=None) as ws:
        app.go.set()
        await asyncio.wait_for(app.done.wait(), 30)
        assert app.answers[-1] is False
        sent = len(app.answers) - 1
        assert sent >= 1
        # every frame it took arrives whole and in order
        for _ in range(sent):
            assert await asyncio.wait_for(ws.recv(), 10) == BIG


class FakeWebSocket:
    """Takes frames from the fast path while ``open`` is set, and through the ASGI send
    always (waiting for ``flowing`` first, as a full socket makes it wait)."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.open = True
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.fast = 0
        self.scope = {"extensions": {SEND_TEXT_NOW: self.send_now}}

    def send_now(self, text: str) -> bool:
        if not self.open:
            return False
        self.fast += 1
        self.frames.append(text)
        return True

    async def send_text(self, text: str) -> None:
        await self.flowing.wait()
        self.frames.append(text)


async def test_events_keep_their_order_across_the_fast_and_queued_sends() -> None:
    ws = FakeWebSocket()
    services = SimpleNamespace(rooms=None, metrics=SimpleNamespace(observe=lambda *a: None))
    conn = Connection(ws, services, anonymous())  # type: ignore[arg-type]
    sender = asyncio.create_task(conn._sender())

    def token(i: int) -> dict[str, Any]:
        return {"type": "ai.token", "message_id": "m", "delta": f"t{i} "}

    try:
        for i in range(3):  # straight out
            conn.deliver(token(i))
        assert ws.fast == 3
        ws.open = False  # the socket's buffer is full: queued
        ws.flowing.clear()
        for i in range(3, 6):
            conn.deliver(token(i))
        await asyncio.sleep(0.01)  # the sender takes one and waits in the ASGI send
        ws.open = True  # room again: but a frame is on its way and others wait, so queue
        for i in range(6, 9):
            conn.deliver(token(i))
        assert ws.fast == 3
        ws.flowing.set()
        for _ in range(100):
            if len(ws.frames) == 9:
                break
            await asyncio.sleep(0.01)
        conn.deliver(token(9))  # all sent: straight out again
        assert ws.fast == 4
        assert [f.split('"delta":"')[1].split('"')[0] for f in ws.frames] == [
            f"t{i} " for i in range(10)
        ]
    finally:
        sender.cancel()
