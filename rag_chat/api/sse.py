"""Server-Sent Events for custom clients: ``POST /api/chat`` streams the WebSocket events.

Each event goes out as ``event: <type>``, ``id: <n>`` and ``data: <json>``, with a comment
heartbeat (``: ping``) every 15 s so proxies keep the stream open. When the client goes away,
sse-starlette cancels the generator and the reply's generation is cancelled with it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse

from rag_chat.services import Services

router = APIRouter()
HEARTBEAT_S = 15


class ChatIn(BaseModel):
    message: str = Field(min_length=1, max_length=8000, description="the question")
    conversation_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="continue a conversation; a new one is started when omitted",
    )


@router.post(
    "/api/chat",
    summary="Ask a question; the answer streams as Server-Sent Events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "the event stream"}},
)
async def chat_sse(body: ChatIn, request: Request) -> EventSourceResponse:
    services: Services = request.app.state.services
    reply = services.chat.start(body.message, body.conversation_id)  # BadRequest → 400

    async def stream() -> AsyncIterator[dict[str, Any]]:
        services.metrics.replies_in_flight.inc()
        try:
            async for n, event in _numbered(reply.events()):
                services.metrics.observe("sse", event)
                yield {"event": event["type"], "id": str(n), "data": json.dumps(event)}
        finally:
            services.metrics.replies_in_flight.dec()
            if not reply.cancelled:
                await reply.cancel()  # client gone (or done: cancel is then a no-op)

    return EventSourceResponse(stream(), ping=HEARTBEAT_S)


async def _numbered(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[tuple[int, Any]]:
    n = 0
    async for event in events:
        n += 1
        yield n, event
