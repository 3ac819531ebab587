"""The WebSocket transport: ``/ws``, a JSON event protocol over rooms.

One connection runs::

    receive loop ──► validate ──► join/leave/typing/message/cancel ──► Rooms (log in Redis)
    room subscriptions (RoomHub) ──► deliver ──► send queue (bounded) ──► sender task ──► socket

Everything a client sees comes from the room logs, in seq order, the same on every instance.
A bad event gets an ``error`` event and the connection stays usable. Disconnect leaves every
room (presence, typing and subscriptions are released); AI replies live on in their room and
are cancelled only when nobody is left to read them. Protocol pings every 20 s come from the
server (uvicorn's ws_ping_interval); ``ping`` → ``pong`` is the application-level heartbeat.
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

from rag_chat.chat import Event
from rag_chat.errors import RagChatError
from rag_chat.rooms import Member
from rag_chat.services import Services

log = logging.getLogger(__name__)
router = APIRouter()

SEND_QUEUE = 4096  # events buffered per connection; a reader this far behind is dropped
MAX_FRAME_CHARS = 64_000
CLOSE_TOO_SLOW = 1013  # "try again later": the client could not keep up

RoomId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
UserName = Annotated[str, Field(min_length=1, max_length=64)]


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JoinIn(_In):
    type: Literal["join"]
    room: RoomId
    last_seq: int | None = Field(default=None, ge=0)
    user: UserName | None = None


class LeaveIn(_In):
    type: Literal["leave"]
    room: RoomId


class MessageIn(_In):
    type: Literal["message"]
    text: str = Field(min_length=1, max_length=8000)
    room: RoomId | None = None
    conversation_id: RoomId | None = None
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    ai: bool = False


class TypingIn(_In):
    type: Literal["typing"]
    room: RoomId
    state: Literal["start", "stop"]


class CancelIn(_In):
    type: Literal["cancel"]
    message_id: str = Field(min_length=1, max_length=128)
    room: RoomId | None = None


class PingIn(_In):
    type: Literal["ping"]


ClientEvent = JoinIn | LeaveIn | MessageIn | TypingIn | CancelIn | PingIn
_client_event: TypeAdapter[ClientEvent] = TypeAdapter(
    Annotated[ClientEvent, Field(discriminator="type")]
)
_TAGS = {"join", "leave", "message", "typing", "cancel", "ping"}


def explain(exc: ValidationError) -> str:
    """The first problem, in one line: ``text: String should have at least 1 character``."""
    err = exc.errors()[0]
    if err["type"] == "union_tag_invalid":
        return f"unknown event type {err['input'].get('type')!r}; expected one of: " + ", ".join(
            sorted(_TAGS)
        )
    if err["type"] == "union_tag_not_found":
        return "every event needs a 'type': one of " + ", ".join(sorted(_TAGS))
    loc = ".".join(str(x) for x in err["loc"][1:])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


class Connection:
    def __init__(self, ws: WebSocket, services: Services) -> None:
        self.ws = ws
        self.services = services
        self.rooms = services.rooms
        self.member = Member(uuid.uuid4().hex, f"guest-{uuid.uuid4().hex[:4]}")
        self.named = False
        self.private_room = uuid.uuid4().hex  # for messages that name no room or conversation
        self.out: asyncio.Queue[Event | None] = asyncio.Queue(SEND_QUEUE)
        self.reply_rooms: dict[str, str] = {}  # AI message_id -> room, to cancel by id alone
        self.too_slow = False
        self._closing: asyncio.Task[None] | None = None

    async def run(self) -> None:
        sender = asyncio.create_task(self._sender())
        try:
            await self._receive_loop()
        finally:
            sender.cancel()
            # leaving (presence, typing, subscriptions) must finish even when this task is
            # being cancelled (server shutdown, a test client closing): shield it
            cleanup = asyncio.ensure_future(self.rooms.leave_all(self.member))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(cleanup)

    def deliver(self, event: Event) -> None:
        if self.too_slow:
            return
        if event.get("type") == "ai.start" and event.get("room"):
            self.reply_rooms[event["message_id"]] = event["room"]
        self.services.metrics.observe("ws", event)
        try:
            self.out.put_nowait(event)
        except asyncio.QueueFull:
            self.too_slow = True
            self._closing = asyncio.create_task(
                self.ws.close(CLOSE_TOO_SLOW, "client too slow to keep up")
            )

    def error(self, code: str, message: str, **extra: Any) -> None:
        self.deliver({"type": "error", "code": code, "message": message, **extra})

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
                self.error("bad_request", "binary frames are not supported; send JSON text")
                continue
            if len(text) > MAX_FRAME_CHARS:
                self.error("bad_request", f"frame larger than {MAX_FRAME_CHARS} characters")
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                self.error("bad_request", f"invalid JSON: {exc.msg} at position {exc.pos}")
                continue
            if not isinstance(raw, dict):
                self.error("bad_request", "every event is a JSON object with a 'type'")
                continue
            try:
                event = _client_event.validate_python(raw)
            except ValidationError as exc:
                self.error("bad_request", explain(exc), event=raw.get("type"))
                continue
            try:
                await self._dispatch(event)
            except RagChatError as exc:
                self.error(exc.code, str(exc), event=event.type)

    async def _join(self, room: str, last_seq: int | None, announce: bool = True) -> None:
        if announce:
            deliver = self.deliver
        else:  # a private conversation joined implicitly: no `joined` event

            def deliver(event: Event) -> None:
                if event.get("type") != "joined":
                    self.deliver(event)

        await self.rooms.join(self.member, room, last_seq, deliver)

    async def _dispatch(self, event: ClientEvent) -> None:
        if isinstance(event, PingIn):
            self.deliver({"type": "pong"})
        elif isinstance(event, JoinIn):
            if event.user and not self.named:
                self.member = Member(self.member.conn, event.user)
                self.named = True
            await self._join(event.room, event.last_seq)
        elif isinstance(event, LeaveIn):
            await self.rooms.leave(self.member, event.room)
            self.deliver({"type": "left", "room": event.room})
        elif isinstance(event, TypingIn):
            if not self.rooms.is_member(self.member, event.room):
                self.error("not_joined", f"join room {event.room!r} first", event="typing")
                return
            await self.rooms.typing(self.member, event.room, event.state)
        elif isinstance(event, CancelIn):
            room = event.room or self.reply_rooms.get(event.message_id)
            if room is None:
                self.error("not_found", f"no reply {event.message_id!r} in your rooms")
                return
            if not self.rooms.is_member(self.member, room):
                self.error("not_joined", f"join room {room!r} first", event="cancel")
                return
            await self.rooms.cancel(self.member, room, event.message_id)
        else:
            if event.room is not None:
                if not self.rooms.is_member(self.member, event.room):
                    self.error("not_joined", f"join room {event.room!r} first", event="message")
                    return
                await self.rooms.post(
                    self.member, event.room, event.text, client_id=event.client_id, ai=event.ai
                )
            else:  # a private conversation with the assistant: a room with one member
                room = event.conversation_id or self.private_room
                if not self.rooms.is_member(self.member, room):
                    await self._join(room, None, announce=False)
                await self.rooms.post(
                    self.member, room, event.text, client_id=event.client_id, ai=True
                )


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
