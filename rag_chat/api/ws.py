"""The WebSocket transport: ``/ws``, a JSON event protocol.

One connection runs three kinds of task::

    receive loop ──► validate event ──► ping → pong
                          │             message → ChatService.start → reply task
                          │             cancel  → Reply.cancel (stops the backend)
    reply tasks  ──► events ──► send queue (bounded) ──► sender task ──► socket

Every send goes through one queue and one sender, so events of concurrent replies never
interleave mid-frame. A bad event gets an ``error`` event and the connection stays usable.
Disconnect cancels every reply of the connection (the backends stop generating). Protocol
pings every 20 s come from the server (uvicorn's ws_ping_interval); ``ping`` → ``pong`` is the
application-level heartbeat for browsers, which cannot see protocol pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from rag_chat.chat import Event, Reply
from rag_chat.errors import RagChatError
from rag_chat.services import Services

log = logging.getLogger(__name__)
router = APIRouter()

SEND_QUEUE = 2048  # events buffered per connection before the sender applies back-pressure
MAX_FRAME_CHARS = 64_000


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class MessageIn(_In):
    type: Literal["message"]
    text: str = Field(min_length=1, max_length=8000)
    conversation_id: str | None = Field(default=None, min_length=1, max_length=128)
    client_id: str | None = Field(default=None, min_length=1, max_length=128)


class CancelIn(_In):
    type: Literal["cancel"]
    message_id: str = Field(min_length=1, max_length=128)


class PingIn(_In):
    type: Literal["ping"]


ClientEvent = Annotated[MessageIn | CancelIn | PingIn, Field(discriminator="type")]
_client_event: TypeAdapter[MessageIn | CancelIn | PingIn] = TypeAdapter(ClientEvent)


def explain(exc: ValidationError) -> str:
    """The first problem, in one line: ``text: String should have at least 1 character``."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and x in _TAGS))
    if err["type"] == "union_tag_invalid":
        return f"unknown event type {err['input'].get('type')!r}; expected one of: " + ", ".join(
            sorted(_TAGS)
        )
    if err["type"] == "union_tag_not_found":
        return "every event needs a 'type': one of " + ", ".join(sorted(_TAGS))
    return f"{loc}: {err['msg']}" if loc else err["msg"]


_TAGS = {"message", "cancel", "ping"}


class Connection:
    def __init__(self, ws: WebSocket, services: Services) -> None:
        self.ws = ws
        self.services = services
        self.conversation_id = uuid.uuid4().hex  # default for messages that name none
        self.out: asyncio.Queue[Event | None] = asyncio.Queue(SEND_QUEUE)
        self.replies: dict[str, tuple[Reply, asyncio.Task[None]]] = {}
        self.client_ids: dict[str, str] = {}  # client_id -> message_id: idempotent sends

    async def run(self) -> None:
        sender = asyncio.create_task(self._sender())
        try:
            await self._receive_loop()
        finally:
            for reply, task in list(self.replies.values()):
                await reply.cancel()
                task.cancel()
            for _, task in list(self.replies.values()):
                with contextlib.suppress(BaseException):
                    await task
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender

    async def send(self, event: Event) -> None:
        self.services.metrics.observe("ws", event)
        await self.out.put(event)

    async def error(self, code: str, message: str, **extra: Any) -> None:
        await self.send({"type": "error", "code": code, "message": message, **extra})

    async def _sender(self) -> None:
        while (event := await self.out.get()) is not None:
            await self.ws.send_text(json.dumps(event, ensure_ascii=False))

    async def _receive_loop(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is None:
                await self.error("bad_request", "binary frames are not supported; send JSON text")
                continue
            if len(text) > MAX_FRAME_CHARS:
                await self.error("bad_request", f"frame larger than {MAX_FRAME_CHARS} characters")
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                await self.error("bad_request", f"invalid JSON: {exc.msg} at position {exc.pos}")
                continue
            if not isinstance(raw, dict):
                await self.error("bad_request", "every event is a JSON object with a 'type'")
                continue
            try:
                event = _client_event.validate_python(raw)
            except ValidationError as exc:
                await self.error("bad_request", explain(exc), event=raw.get("type"))
                continue
            await self._dispatch(event)

    async def _dispatch(self, event: MessageIn | CancelIn | PingIn) -> None:
        if isinstance(event, PingIn):
            await self.send({"type": "pong"})
        elif isinstance(event, CancelIn):
            entry = self.replies.get(event.message_id)
            if entry is None:
                await self.error(
                    "not_found", f"no reply {event.message_id!r} is streaming on this connection"
                )
            else:
                await entry[0].cancel()
        else:
            if event.client_id and event.client_id in self.client_ids:
                return  # a re-send of a message we already took: no second reply
            try:
                reply = self.services.chat.start(
                    event.text, event.conversation_id or self.conversation_id
                )
            except RagChatError as exc:
                await self.error(exc.code, str(exc))
                return
            if event.client_id:
                self.client_ids[event.client_id] = reply.message_id
            task = asyncio.create_task(self._stream(reply, event.client_id))
            self.replies[reply.message_id] = (reply, task)

    async def _stream(self, reply: Reply, client_id: str | None) -> None:
        metrics = self.services.metrics
        metrics.replies_in_flight.inc()
        try:
            async for event in reply.events():
                if client_id and event["type"] == "ai.start":
                    event = {**event, "client_id": client_id}
                await self.send(event)
        except Exception:
            log.exception("reply %s failed", reply.message_id)
            await self.error("internal_error", "the reply failed", message_id=reply.message_id)
        finally:
            metrics.replies_in_flight.dec()
            self.replies.pop(reply.message_id, None)


@router.websocket("/ws")
async def websocket_endpoint(ws: WebSocket) -> None:
    services: Services = ws.app.state.services
    await ws.accept()
    services.metrics.connections.inc()
    try:
        await Connection(ws, services).run()
    except WebSocketDisconnect:
        pass
    finally:
        services.metrics.connections.dec()
