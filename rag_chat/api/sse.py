"""Server-Sent Events for custom clients: ``POST /api/chat`` streams a reply's room events;
``POST /api/conversations/{id}/regenerate`` and ``PATCH …/messages/{message_id}`` (an edited
question) stream the new answer the same way.

Each event goes out as ``event: <type>``, ``id: <seq>`` and ``data: <json>`` (the seq of the
conversation's event log), with a comment heartbeat (``: ping``) every 15 s. The stream ends
after the reply's ``ai.done`` (or ``error``).

Resume: a client that lost the stream sends the same request again with ``Last-Event-ID``
(and the ``conversation_id`` from ``ai.start``): no new message is posted; the events after that
seq are replayed and the answer still streaming continues live. While no client is listening,
the answer keeps running for a grace period (15 s), then it is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse

from rag_chat.api.deps import Caller, ConversationId, MessageId, dumps
from rag_chat.auth import Principal
from rag_chat.errors import BadRequest, Forbidden
from rag_chat.rooms import Member, Rooms
from rag_chat.rooms.log import Event, RoomLog
from rag_chat.services import Services

router = APIRouter()
HEARTBEAT_S = 15
# what the OpenAPI schema says an SSE route answers
_STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "the event stream"}
}


class ChatIn(BaseModel):
    message: str = Field(min_length=1, max_length=8000, description="the question")
    conversation_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="continue a conversation; a new one is started when omitted",
    )
    client_id: str | None = Field(
        default=None, min_length=1, max_length=128, description="idempotency key for the message"
    )


@router.post(
    "/api/chat",
    summary="Ask a question; the answer streams as Server-Sent Events",
    response_class=EventSourceResponse,
    responses=_STREAMED,
)
async def chat_sse(
    body: ChatIn,
    request: Request,
    who: Caller,
    last_event_id: str | None = Header(default=None, description="resume after this seq"),
) -> EventSourceResponse:
    received = time.perf_counter()
    services: Services = request.app.state.services
    rooms = services.rooms
    resume: int | None = None
    if last_event_id is not None:
        if not re.fullmatch(r"[0-9]{1,18}", last_event_id):
            raise BadRequest("Last-Event-ID must be the seq (a number) of the last event received")
        if body.conversation_id is None:
            raise BadRequest("resuming with Last-Event-ID needs the conversation_id")
        resume = int(last_event_id)
    room = body.conversation_id or uuid.uuid4().hex
    # only the owner may continue or resume a conversation (anyone else: 404)
    await services.access.private(who, room, body.message)
    member = Member(uuid.uuid4().hex, who.user if who.authenticated else "sse", who.limit_key)
    queue: asyncio.Queue[Event] = asyncio.Queue()
    if resume is not None:
        await rooms.join(member, room, resume, queue.put_nowait)
        services.metrics.resumes.labels("sse").inc()
    else:
        # The join (subscribe, presence) and the post (limits, retrieval, writes) run side by
        # side, so retrieval starts without waiting for the join's round trips: the stream is
        # subscribed from the seq before the question, so it misses none of the answer's events.
        before = 0 if body.conversation_id is None else await rooms.log.last_seq(room)
        joining = asyncio.ensure_future(rooms.join(member, room, before, queue.put_nowait))
        try:
            msg = await rooms.post(
                member, room, body.message, client_id=body.client_id, ai=True, received=received
            )
            await joining
        except BaseException:
            joining.cancel()
            with contextlib.suppress(BaseException):
                await joining
            await rooms.leave(member, room)
            raise
        if msg is None:  # a re-send of a message already taken: follow what is streaming
            resume = await rooms.log.last_seq(room)
        else:
            services.metrics.messages.labels("sse").inc()
    await queue.get()  # the `joined` event (always first): not part of the SSE stream

    # a resume after the answer ended: replay what was missed, then end (nothing is coming)
    settled = resume is not None and not await _answer_open(rooms.log, room)
    return EventSourceResponse(
        _stream(services, member, room, queue, settled=settled), ping=HEARTBEAT_S
    )


class RegenerateIn(BaseModel):
    message_id: str = Field(
        min_length=1, max_length=128, description="the conversation's latest answer"
    )


@router.post(
    "/api/conversations/{conversation_id}/regenerate",
    summary="Answer the question of a conversation's latest answer once more (SSE)",
    response_class=EventSourceResponse,
    responses=_STREAMED,
)
async def regenerate_sse(
    conversation_id: ConversationId, body: RegenerateIn, request: Request, who: Caller
) -> EventSourceResponse:
    """The new answer streams like ``POST /api/chat``'s (its ``ai.start`` names the answer it
    ``replaces``) and takes that one's place in the conversation once saved. ``409 conflict``
    when ``message_id`` is not the latest answer or an answer is still streaming; a shared
    room's answers are asked for again over the WebSocket."""
    return await _answer_again(
        request,
        who,
        conversation_id,
        "regenerate its answers",
        lambda rooms, member, received: rooms.regenerate(
            member, conversation_id, body.message_id, shared=False, received=received
        ),
    )


class EditIn(BaseModel):
    message: str = Field(min_length=1, max_length=8000, description="the question's new text")


@router.patch(
    "/api/conversations/{conversation_id}/messages/{message_id}",
    summary="Edit a conversation's latest question; its new answer streams as SSE",
    response_class=EventSourceResponse,
    responses=_STREAMED,
)
async def edit_sse(
    conversation_id: ConversationId,
    message_id: MessageId,
    body: EditIn,
    request: Request,
    who: Caller,
) -> EventSourceResponse:
    """The stream starts with ``message.edited`` (the new text, kept in the conversation),
    then the new answer's events as ``POST /api/chat``'s (its ``ai.start`` names the answer it
    ``replaces``). ``409 conflict`` when ``message_id`` is not the latest question or an
    answer is still streaming; a shared room's messages are edited over the WebSocket."""
    return await _answer_again(
        request,
        who,
        conversation_id,
        "edit its messages",
        lambda rooms, member, received: rooms.edit(
            member,
            conversation_id,
            message_id,
            body.message,
            shared=False,
            ai=True,
            received=received,
        ),
    )


async def _answer_again(
    request: Request,
    who: Principal,
    room: str,
    what: str,
    start: Callable[[Rooms, Member, float], Awaitable[Any]],
) -> EventSourceResponse:
    """The events of the answer ``start`` begins in the private conversation ``room``, from
    a subscription taken before it (a shared room's are asked for over the WebSocket)."""
    received = time.perf_counter()
    services: Services = request.app.state.services
    rooms = services.rooms
    if await services.access.read(who, room) != "private":
        raise Forbidden(f"{room!r} is a shared room: {what} over the WebSocket")
    member = Member(uuid.uuid4().hex, who.user if who.authenticated else "sse", who.limit_key)
    queue: asyncio.Queue[Event] = asyncio.Queue()
    await rooms.join(member, room, await rooms.log.last_seq(room), queue.put_nowait)
    try:
        await start(rooms, member, received)
    except BaseException:
        await rooms.leave(member, room)
        raise
    services.metrics.messages.labels("sse").inc()
    await queue.get()  # `joined`
    return EventSourceResponse(_stream(services, member, room, queue), ping=HEARTBEAT_S)


async def _stream(
    services: Services,
    member: Member,
    room: str,
    queue: asyncio.Queue[Event],
    *,
    settled: bool = False,
) -> AsyncIterator[dict[str, Any]]:
    """The room's events as SSE, up to the end of the first answer that starts (or, when
    ``settled``, up to what was queued); the member leaves the room when it stops."""
    reply_id: str | None = None
    try:
        while True:
            if settled and queue.empty():
                return
            event = await queue.get()
            services.metrics.observe("sse", event)
            yield {"event": event["type"], "id": str(event["seq"]), "data": dumps(event)}
            if event["type"] == "ai.start" and reply_id is None:
                reply_id = event["message_id"]
            if event["type"] in ("ai.done", "error") and (
                reply_id is None or event.get("message_id") in (reply_id, None)
            ):
                return
    finally:
        await services.rooms.leave(member, room)


async def _answer_open(log: RoomLog, room: str, window: int = 2000) -> bool:
    """Whether an answer in ``room`` is still coming: a question for the AI, or an
    ``ai.start``, with no final event after it (among the last ``window`` events)."""
    head = await log.last_seq(room)
    pending: set[str] = set()
    for event in await log.since(room, max(0, head - window)):
        kind = event.get("type")
        if kind in ("message", "message.edited") and event.get("ai"):
            pending.add(str(event.get("id")))
        elif kind == "ai.start":
            pending.discard(str(event.get("reply_to")))
            pending.add(str(event.get("message_id")))
        elif kind in ("ai.done", "error") and event.get("message_id"):
            pending.discard(str(event["message_id"]))
    return bool(pending)
