"""The WebSocket transport: ``/ws``, a JSON event protocol over rooms.

One connection runs::

    handshake: Origin allowed? (else 403) ──► accept ──► token (cookie / subprotocol / header /
        first ``auth`` event; else 4401) ──► connection lease for the user (else 1008)
    receive loop ──► validate ──► join/leave/typing/message/cancel/regenerate/edit/rate ──► Rooms
    room subscriptions (RoomHub) ──► deliver ──► nothing waiting before it and the socket can
        take it: straight out (the server's send_text_now) ──► else Outbox (bounded; tokens
        coalesce) ──► sender task ──► ASGI send (a frame not taken within SEND_TIMEOUT_S, or an
        overflowing queue: 1013)

Everything a client sees comes from the room logs, in seq order, the same on every instance.
A bad event gets an ``error`` event and the connection stays usable; a flood of them closes it
(1008). Replies are JSON with ``<``, ``>``, ``&`` escaped (never live HTML). Disconnect leaves every
room (presence, typing and subscriptions are released); AI replies live on in their room and
are cancelled only when nobody is left to read them. Protocol pings every 20 s come from the
server (uvicorn's ws_ping_interval); ``ping`` → ``pong`` is the application-level heartbeat.

Every log record of a connection carries its id (``conn_id``, rag_chat.logs). With the logger
``rag_chat.ws.trace`` at DEBUG (``RAG_TRACE_WS=true``) every event received and sent is logged:
direction, type, room, seq, size, texts cut to 200 characters (rag_chat.logs.event_summary).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from rag_chat.api.deps import client_host, credential, dumps
from rag_chat.auth import LEEWAY_S, SUBPROTOCOL, Principal, anonymous, token_from_subprotocols
from rag_chat.chat import Event
from rag_chat.errors import RagChatError, RateLimited, TooManyConnections, Unauthorized
from rag_chat.logs import conn_id, event_summary, trace_message
from rag_chat.rooms import Member
from rag_chat.services import Services

log = logging.getLogger(__name__)
trace = logging.getLogger("rag_chat.ws.trace")
router = APIRouter()

SEND_QUEUE = 4096  # events waiting per connection (tokens of one answer coalesce into one)
MAX_PENDING_CHARS = 4_000_000  # characters waiting per connection
COALESCE_AFTER = 64  # events waiting before tokens start to merge
SEND_TIMEOUT_S = 15.0  # one frame not taken by the client in this long: it is hopeless
MAX_FRAME_CHARS = 64_000  # larger text frames get a bad_request error (the connection stays)
MAX_FRAME_BYTES = 1 << 20  # larger frames are refused by the protocol layer (close 1009)
BAD_EVENTS_LIMIT = 30  # more bad events than this within the window: policy close
BAD_EVENTS_WINDOW_S = 10.0
AUTH_TIMEOUT_S = 10.0
CLOSE_POLICY = 1008  # flooding with bad events; too many connections
CLOSE_TOO_SLOW = 1013  # "try again later": the client could not keep up
CLOSE_RESTART = 1012  # the server is restarting: reconnect (to another instance)
CLOSE_UNAUTHORIZED = 4401  # no valid token: sign in
CLOSE_FORBIDDEN = 4403  # an Origin that is not allowed
# the scope extension under which the server (rag_chat.server) offers a synchronous send of a
# text message: ``send(text) -> bool``, False when the ASGI send must be used instead
SEND_TEXT_NOW = "rag_chat.send_text_now"

RoomId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
UserName = Annotated[str, Field(min_length=1, max_length=64)]


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JoinIn(_In):
    type: Literal["join"]
    room: RoomId
    last_seq: int | None = Field(default=None, ge=0)
    user: UserName | None = None
    # the room is (or becomes) the caller's private conversation, not a shared room
    private: bool = False


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


class RegenerateIn(_In):
    """Answer the question of the room's latest answer (``message_id``) once more."""

    type: Literal["regenerate"]
    room: RoomId
    message_id: str = Field(min_length=1, max_length=128)


class EditIn(_In):
    """Change the text of one's latest message; one that asks the AI is answered again."""

    type: Literal["edit"]
    room: RoomId
    message_id: str = Field(min_length=1, max_length=128)
    text: str = Field(min_length=1, max_length=8000)
    ai: bool = False


class RateIn(_In):
    """Rate an answer (``up`` / ``down``, an optional comment); ``rating: null`` takes it back."""

    type: Literal["rate"]
    room: RoomId
    message_id: str = Field(min_length=1, max_length=128)
    rating: Literal["up", "down"] | None
    comment: str = Field(default="", max_length=2000)


class PingIn(_In):
    type: Literal["ping"]


class AuthIn(_In):
    type: Literal["auth"]
    token: str = Field(min_length=1, max_length=8192)


ClientEvent = (
    JoinIn
    | LeaveIn
    | MessageIn
    | TypingIn
    | CancelIn
    | RegenerateIn
    | EditIn
    | RateIn
    | PingIn
    | AuthIn
)
_client_event: TypeAdapter[ClientEvent] = TypeAdapter(
    Annotated[ClientEvent, Field(discriminator="type")]
)
_TAGS = {
    "join",
    "leave",
    "message",
    "typing",
    "cancel",
    "regenerate",
    "edit",
    "rate",
    "ping",
    "auth",
}


def explain(exc: ValidationError) -> str:
    """The first problem, in one line: ``text: String should have at least 1 character``."""
    err = exc.errors()[0]
    if err["type"] == "union_tag_invalid":
        kind = repr(err["input"].get("type"))
        kind = kind if len(kind) <= 40 else kind[:37] + "..."
        return f"unknown event type {kind}; expected one of: " + ", ".join(sorted(_TAGS))
    if err["type"] == "union_tag_not_found":
        return "every event needs a 'type': one of " + ", ".join(sorted(_TAGS))
    loc = ".".join(str(x) for x in err["loc"][1:])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]", re.ASCII)  # only an escape can make one


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _size(event: Event) -> int:
    """What an event weighs in a send queue, roughly in characters."""
    return 200 + len(event.get("delta") or "") + len(event.get("text") or "")


class Outbox:
    """A connection's send queue, bounded in events and characters.

    While the client keeps up, every event goes out as it is. When it falls behind (more than
    ``coalesce_after`` events waiting), tokens of the same answer waiting next to each other
    are merged into one ``ai.token`` (its ``delta``
    their concatenation, its ``seq`` the newest), so a slow reader gets the same text in fewer
    frames instead of a queue that grows with every token. ``put`` returns False once the
    queue is past its bounds even so: the reader is hopeless and is disconnected.
    """

    def __init__(
        self,
        max_events: int = SEND_QUEUE,
        max_chars: int = MAX_PENDING_CHARS,
        coalesce_after: int = COALESCE_AFTER,
    ) -> None:
        self.max_events = max_events
        self.coalesce_after = coalesce_after
        self.max_chars = max_chars
        self._items: deque[tuple[Event, int]] = deque()
        self._chars = 0
        self._ready = asyncio.Event()
        self._closed = False
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def chars(self) -> int:
        return self._chars

    def put(self, event: Event) -> bool:
        if event.get("type") == "ai.token" and len(self._items) > self.coalesce_after:
            last, size = self._items[-1]
            if (
                last.get("type") == "ai.token"
                and last.get("message_id") == event.get("message_id")
                and last.get("room") == event.get("room")
            ):
                merged = {**event, "delta": last["delta"] + event["delta"]}
                self._items[-1] = (merged, size + len(event["delta"]))
                self._chars += len(event["delta"])
                self.coalesced += 1
                return self._chars <= self.max_chars
        size = _size(event)
        self._items.append((event, size))
        self._chars += size
        self._ready.set()
        return len(self._items) <= self.max_events and self._chars <= self.max_chars

    def close(self) -> None:
        """No more events: ``get`` returns None once the queue is empty."""
        self._closed = True
        self._ready.set()

    async def get(self) -> Event | None:
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        event, size = self._items.popleft()
        self._chars -= size
        return event


class Flood:
    """Counts a connection's bad events in a sliding window; too many means a policy close."""

    def __init__(self, limit: int = BAD_EVENTS_LIMIT, window_s: float = BAD_EVENTS_WINDOW_S):
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()

    def bad(self) -> bool:
        """Record one; True when the connection has now sent too many."""
        now = time.monotonic()
        self._times.append(now)
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
        return len(self._times) > self.limit


class Hopeless(Exception):
    """The connection must end now (too slow, flooding, or its token expired)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Connection:
    def __init__(self, ws: WebSocket, services: Services, who: Principal) -> None:
        self.ws = ws
        self.services = services
        self.rooms = services.rooms
        self.who = who
        conn = uuid.uuid4().hex
        self.member = Member(conn, who.user, key=who.limit_key)
        self.named = who.authenticated  # a token's subject is the name; guests may pick one
        self.private_room = uuid.uuid4().hex  # for messages that name no room or conversation
        self.out = Outbox()
        self.flood = Flood()
        self.reply_rooms: dict[str, str] = {}  # AI message_id -> room, to cancel by id alone
        self.ending: Hopeless | None = None
        self._task: asyncio.Task[None] | None = None
        self._send_started: float | None = None  # loop time the frame being sent was handed over
        self._send_timer: asyncio.TimerHandle | None = None
        # the server's synchronous send (rag_chat.server), where it offers one
        extensions = ws.scope.get("extensions") or {}
        self._send_now: Callable[[str], bool] | None = extensions.get(SEND_TEXT_NOW)

    @property
    def conn_id(self) -> str:
        return self.member.conn

    async def run(self) -> None:
        self._task = task = asyncio.current_task()
        sender = asyncio.create_task(self._sender())
        try:
            await self._receive_loop()
        except asyncio.CancelledError:
            if self.ending is None or task is None:
                raise
            task.uncancel()  # cancelled by end(): this connection closes itself below
        finally:
            if self.ending is not None and self.ending.code != CLOSE_TOO_SLOW:
                # the last events (an error, ai.done) go out before the close frame: the
                # sender drains the queue and stops (cancelling it could drop a frame)
                self.out.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(sender), 5)
            sender.cancel()
            # leaving (presence, typing, subscriptions) must finish even when this task is
            # being cancelled (server shutdown, a test client closing): shield it
            cleanup = asyncio.ensure_future(self.rooms.leave_all(self.member))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(cleanup)
        if self.ending is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(self.ending.code, self.ending.reason), 2)

    def _trace(self, direction: str, summary: dict[str, Any], size: int) -> None:
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug(
                trace_message(direction, summary, size),
                extra={"direction": direction, "size": size, "event": summary},
            )

    def _trace_received(self, msg: Mapping[str, Any]) -> None:
        text = msg.get("text")
        if text is None:
            summary: dict[str, Any] = {"type": "(binary frame)"}
            size = len(msg.get("bytes") or b"")
        else:
            size = len(text)
            try:
                raw = json.loads(text) if size <= MAX_FRAME_CHARS else None
            except (ValueError, RecursionError):  # bad JSON, an int over 4300 digits, ...
                raw = None
            summary = event_summary(raw) if isinstance(raw, dict) else {"type": "(not an event)"}
        self._trace("recv", summary, size)

    async def shutdown(self, wait_s: float) -> None:
        """Server shutdown: let the queue drain (final events included), then close 1012."""
        deadline = time.monotonic() + wait_s
        while len(self.out) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.end(CLOSE_RESTART, "server restarting: reconnect")

    def end(self, code: int, reason: str) -> None:
        """Close the connection from anywhere (a delivery callback, the sender)."""
        if self.ending is not None:
            return
        self.ending = Hopeless(code, reason)
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("close %d %s", code, reason, extra={"direction": "close", "code": code})
        if code == CLOSE_TOO_SLOW:
            self.services.metrics.errors.labels("too_slow").inc()
            self.services.metrics.slow_consumers.inc()
        # from another task (the sender, a room's delivery): stop the receive loop now;
        # from the receive loop itself, it ends at the top of its next turn
        if self._task is not None and asyncio.current_task() is not self._task:
            self._task.cancel()

    def deliver(self, event: Event) -> None:
        if self.ending is not None:
            return
        if event.get("type") == "ai.start" and event.get("room"):
            self.reply_rooms[event["message_id"]] = event["room"]
        self.services.metrics.observe("ws", event)
        send_now = self._send_now
        if send_now is not None and not self.out and self._send_started is None:
            # nothing waiting before it: straight to the socket, where the server can take
            # it now (waking the sender task for every token, and the ASGI send's wrappers,
            # were a fifth of the cost of relaying one with hundreds of answers streaming)
            frame = dumps(event)
            if send_now(frame):
                if trace.isEnabledFor(logging.DEBUG):
                    self._trace("send", event_summary(event), len(frame))
                return
        if not self.out.put(event):
            self.end(CLOSE_TOO_SLOW, "client too slow to keep up")

    def error(self, code: str, message: str, **extra: Any) -> None:
        self.deliver({"type": "error", "code": code, "message": message, **extra})

    async def _sender(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (event := await self.out.get()) is not None:
                frame = dumps(event)
                self._send_started = loop.time()
                if self._send_timer is None:
                    self._send_timer = loop.call_at(
                        self._send_started + SEND_TIMEOUT_S, self._check_send
                    )
                try:
                    await self.ws.send_text(frame)
                except Exception as exc:  # the socket is gone: the receive loop sees it too
                    log.debug("send failed, connection gone: %r", exc)
                    return
                finally:
                    self._send_started = None
                if trace.isEnabledFor(logging.DEBUG):
                    self._trace("send", event_summary(event), len(frame))
        finally:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

    def _check_send(self) -> None:
        """A frame must be taken within SEND_TIMEOUT_S. One timer per connection, armed by the
        first send and re-armed here only while a send is on its way: a timeout around every
        frame (a timer started and cancelled per token) was 3% of the event loop with 500
        answers streaming."""
        self._send_timer = None
        started = self._send_started
        if started is None or self.ending is not None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - started >= SEND_TIMEOUT_S:
            self.end(CLOSE_TOO_SLOW, "client too slow to keep up")
        else:
            self._send_timer = loop.call_at(started + SEND_TIMEOUT_S, self._check_send)

    def _bad(self, message: str, **extra: Any) -> None:
        self.error("bad_request", message, **extra)
        if self.flood.bad():
            self.end(CLOSE_POLICY, "too many bad events")

    async def _receive_loop(self) -> None:
        while self.ending is None:
            msg = await self.ws.receive()
            received = time.perf_counter()
            if msg["type"] == "websocket.disconnect":
                if trace.isEnabledFor(logging.DEBUG):
                    trace.debug("disconnected by the client, code %s", msg.get("code"))
                return
            if trace.isEnabledFor(logging.DEBUG):
                self._trace_received(msg)
            expires = self.who.expires_at
            if expires is not None and time.time() > expires + LEEWAY_S:
                self.error("unauthorized", "token expired: sign in again")
                self.end(CLOSE_UNAUTHORIZED, "token expired")
                return
            text = msg.get("text")
            if text is None:
                self._bad("binary frames are not supported; send JSON text")
                continue
            if len(text) > MAX_FRAME_CHARS:
                self._bad(f"frame larger than {MAX_FRAME_CHARS} characters")
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                self._bad(f"invalid JSON: {exc.msg} at position {exc.pos}")
                continue
            except RecursionError:
                self._bad("invalid JSON: nested too deeply")
                continue
            except ValueError as exc:  # e.g. an integer of more than 4300 digits
                self._bad(f"invalid JSON: {str(exc).splitlines()[0][:120]}")
                continue
            if _SURROGATE.search(text) and not _encodable(raw):
                self._bad("invalid text: a lone UTF-16 surrogate (\\ud800-\\udfff) is not Unicode")
                continue
            if not isinstance(raw, dict):
                self._bad("every event is a JSON object with a 'type'")
                continue
            try:
                event = _client_event.validate_python(raw)
            except ValidationError as exc:
                kind = raw.get("type")
                self._bad(explain(exc), event=kind if isinstance(kind, str) else None)
                continue
            try:
                await self._dispatch(event, received)
            except RagChatError as exc:
                # say what the error is about, so a client can match it to what it sent
                about = {
                    k: v
                    for k in ("room", "conversation_id", "client_id", "message_id")
                    if (v := getattr(event, k, None)) is not None
                }
                if isinstance(exc, RateLimited):
                    about["retry_after"] = exc.retry_after
                self.error(exc.code, str(exc), event=event.type, **about)

    async def _join(self, room: str, last_seq: int | None, announce: bool = True) -> None:
        if announce:
            deliver = self.deliver
        else:  # a private conversation joined implicitly: no `joined` event

            def deliver(event: Event) -> None:
                if event.get("type") != "joined":
                    self.deliver(event)

        await self.rooms.join(self.member, room, last_seq, deliver)

    def _joined(self, *, room: str, event: str) -> bool:
        """Whether this connection is in ``room``; if not, a ``not_joined`` error says so."""
        if self.rooms.is_member(self.member, room):
            return True
        self.error("not_joined", f"join room {room!r} first", event=event)
        return False

    async def _dispatch(self, event: ClientEvent, received: float | None = None) -> None:
        access = self.services.access
        if isinstance(event, PingIn):
            self.deliver({"type": "pong"})
        elif isinstance(event, AuthIn):
            self.error("bad_request", "already signed in", event="auth")
        elif isinstance(event, JoinIn):
            if event.user and not self.named:
                self.member = Member(self.member.conn, event.user, key=self.member.key)
                self.named = True
            if event.private:
                await access.private(self.who, event.room)
            else:
                await access.join(self.who, event.room)
            await self._join(event.room, event.last_seq)
            if event.last_seq is not None:
                self.services.metrics.resumes.labels("ws").inc()
        elif isinstance(event, LeaveIn):
            await self.rooms.leave(self.member, event.room)
            self.deliver({"type": "left", "room": event.room})
        elif isinstance(event, TypingIn):
            if not self._joined(room=event.room, event="typing"):
                return
            await self.rooms.typing(self.member, event.room, event.state)
        elif isinstance(event, CancelIn):
            room = event.room or self.reply_rooms.get(event.message_id)
            if room is None:
                self.error("not_found", f"no reply {event.message_id!r} in your rooms")
                return
            if not self._joined(room=room, event="cancel"):
                return
            await self.rooms.cancel(self.member, room, event.message_id)
        elif isinstance(event, RateIn):
            if not self._joined(room=event.room, event="rate"):
                return
            kept = await self.rooms.rate(
                event.room, event.message_id, self.member.user, event.rating, event.comment
            )
            self.deliver(
                {"type": "rated", "room": event.room, "message_id": event.message_id, **kept}
            )
        elif isinstance(event, RegenerateIn):
            if not self._joined(room=event.room, event="regenerate"):
                return
            kind = await access.read(self.who, event.room)
            await self.rooms.regenerate(
                self.member,
                event.room,
                event.message_id,
                shared=kind != "private",
                received=received,
            )
            self.services.metrics.messages.labels("ws").inc()
        elif isinstance(event, EditIn):
            if not self._joined(room=event.room, event="edit"):
                return
            private = await access.read(self.who, event.room) == "private"
            await self.rooms.edit(
                self.member,
                event.room,
                event.message_id,
                event.text,
                shared=not private,
                ai=event.ai or private,  # a private conversation's messages always ask
                received=received,
            )
            self.services.metrics.messages.labels("ws").inc()
        else:
            if event.room is not None:
                if not self._joined(room=event.room, event="message"):
                    return
                posted = await self.rooms.post(
                    self.member,
                    event.room,
                    event.text,
                    client_id=event.client_id,
                    ai=event.ai,
                    received=received,
                )
            else:  # a private conversation with the assistant: a room with one member
                room = event.conversation_id or self.private_room
                if not self.rooms.is_member(self.member, room):
                    await access.private(self.who, room, event.text)
                    await self._join(room, None, announce=False)
                posted = await self.rooms.post(
                    self.member,
                    room,
                    event.text,
                    client_id=event.client_id,
                    ai=True,
                    received=received,
                )
            if posted is not None:  # None: a re-sent client_id, not a new message
                self.services.metrics.messages.labels("ws").inc()


def origin_allowed(headers: Mapping[str, str], allowed: list[str]) -> bool:
    """Browsers always send Origin on a WebSocket upgrade: it must be the page's own origin
    (the Host it connects to) or one listed in RAG_ALLOWED_ORIGINS. Clients that are not
    browsers send none and are let through (they still need a token when auth is on)."""
    origin = headers.get("origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed or origin in {o.lower() for o in allowed}:
        return True
    parts = urlsplit(origin)
    host = (headers.get("host") or "").lower()
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host


async def _authenticate(ws: WebSocket, services: Services) -> Principal:
    """From the handshake (cookie, ``bearer.<token>`` subprotocol, Authorization header), else
    from a first ``auth`` event within AUTH_TIMEOUT_S."""
    auth = services.auth
    host = client_host(ws)
    if not auth.required:
        return anonymous(f"guest-{uuid.uuid4().hex[:4]}", host)
    token = token_from_subprotocols(ws.scope.get("subprotocols", [])) or credential(ws)
    if token:
        return auth.verify(token, host)
    try:
        msg = await asyncio.wait_for(ws.receive(), AUTH_TIMEOUT_S)
    except TimeoutError:
        raise Unauthorized(f"sign in: send an 'auth' event within {AUTH_TIMEOUT_S:.0f} s") from None
    if msg["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(msg.get("code", 1000))
    try:
        first = json.loads(msg.get("text") or "")
    except (ValueError, RecursionError):  # bad JSON, or an int of more than 4300 digits
        first = None
    if not isinstance(first, dict) or first.get("type") != "auth":
        raise Unauthorized("sign in: the first event must be {'type': 'auth', 'token': ...}")
    token = first.get("token")
    if not isinstance(token, str):
        raise Unauthorized("sign in: 'token' must be a string")
    return auth.verify(token, host)


@router.websocket("/ws")
async def websocket_endpoint(ws: WebSocket) -> None:
    services: Services = ws.app.state.services
    settings = services.settings
    if not origin_allowed(ws.headers, settings.allowed_origins):
        # refused before the upgrade (HTTP 403): a page on another site cannot ride on the
        # user's cookies (cross-site WebSocket hijacking)
        services.metrics.errors.labels("forbidden_origin").inc()
        await ws.close(code=CLOSE_FORBIDDEN)
        return
    offered = ws.scope.get("subprotocols", [])
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)

    async def refuse(code: str, message: str, close: int, **extra: Any) -> None:
        services.metrics.errors.labels(code).inc()
        with contextlib.suppress(Exception):
            event = {"type": "error", "code": code, "message": message, **extra}
            await ws.send_text(dumps(event))
            await ws.close(close, message[:120])

    try:
        who = await _authenticate(ws, services)
    except Unauthorized as exc:
        await refuse(exc.code, str(exc), CLOSE_UNAUTHORIZED)
        return
    except WebSocketDisconnect:
        return
    connection = Connection(ws, services, who)
    # every log record of this connection (and of the replies it starts) carries its id; this
    # task is the connection's own, so the id ends with it
    conn_id.set(connection.conn_id)
    if trace.isEnabledFor(logging.DEBUG):
        trace.debug("open user=%r client=%s", who.user, client_host(ws))
    try:
        await services.limits.connect(who.limit_key, connection.conn_id)
    except TooManyConnections as exc:
        await refuse(exc.code, str(exc), CLOSE_POLICY, retry_after=exc.retry_after)
        return
    services.metrics.connections.inc()
    connections: set[Connection] = ws.app.state.connections
    connections.add(connection)
    try:
        await connection.run()
    except WebSocketDisconnect:
        pass
    finally:
        connections.discard(connection)
        services.metrics.connections.dec()
        await services.limits.disconnect(who.limit_key, connection.conn_id)
