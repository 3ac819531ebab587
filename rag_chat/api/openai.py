"""OpenAI-compatible API: ``POST /v1/chat/completions`` (streaming or not) and ``GET /v1/models``.

It only adapts: the last user message is the question, earlier user/assistant messages are
the history (the client owns the conversation, as with OpenAI), and the reply comes from the
same ChatService as every other transport. The retrieved sources travel as an extra top-level
field ``sources`` (on the response, or on the first chunk of a stream); the official SDK keeps
unknown fields, so ``completion.sources`` / ``completion.model_extra["sources"]`` reads them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from rag_chat.api.deps import Caller, SafeJSONResponse, dumps, principal
from rag_chat.errors import BadRequest
from rag_chat.memory import StoredMessage
from rag_chat.services import Services

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(principal)])
MODEL_ID = "rag_chat"


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = MODEL_ID
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream_options: StreamOptions | None = None


def _split(messages: list[ChatMessage]) -> tuple[str, list[StoredMessage]]:
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None:
        raise BadRequest("messages must contain a user message")
    history: list[StoredMessage] = [
        {"role": m.role, "content": m.text()}
        for m in messages[:last_user]
        if m.role in ("user", "assistant") and m.text()
    ]
    return messages[last_user].text(), history


@router.get("/models", summary="The model this server answers as")
async def models(request: Request) -> dict[str, Any]:
    services: Services = request.app.state.services
    return {
        "object": "list",
        "data": [
            {
                "id": MODEL_ID,
                "object": "model",
                "created": 0,
                "owned_by": "rag_chat",
                "backend": services.llm.model_name,
            }
        ],
    }


@router.post("/chat/completions", summary="RAG answers in the OpenAI chat-completions format")
async def chat_completions(body: CompletionIn, request: Request, who: Caller) -> Any:
    received = time.perf_counter()
    services: Services = request.app.state.services
    question, history = _split(body.messages)
    limits, lease = services.limits, uuid.uuid4().hex
    await limits.ask(who.limit_key, lease)
    try:
        reply = services.chat.start(
            question,
            history=history,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            received=received,
        )
    except BaseException:
        await limits.reply_finished(who.limit_key, lease)
        raise
    services.metrics.messages.labels("openai").inc()
    created = int(time.time())
    cid = f"chatcmpl-{reply.message_id}"
    base = {"id": cid, "created": created, "model": body.model}

    if not body.stream:
        text: list[str] = []
        sources: list[dict[str, Any]] = []
        done: dict[str, Any] = {}
        try:
            async for event in reply.events():
                services.metrics.observe("openai", event)
                if event["type"] == "ai.sources":
                    sources = event["chunks"]
                elif event["type"] == "ai.token":
                    text.append(event["delta"])
                elif event["type"] == "ai.done":
                    done = event
                elif event["type"] == "error":
                    return _error(event)
        finally:
            await reply.cancel()  # a no-op when it finished; stops it when the client left
            await limits.reply_finished(who.limit_key, lease)
        usage = done.get("usage", {})
        return {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(text)},
                    "finish_reason": _finish(done.get("finish_reason")),
                }
            ],
            "usage": _usage(usage),
            "sources": sources,
        }

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def stream() -> AsyncIterator[str]:
        chunk = {**base, "object": "chat.completion.chunk"}
        try:
            async for event in reply.events():
                services.metrics.observe("openai", event)
                kind = event["type"]
                if kind == "ai.sources":
                    first = {
                        **chunk,
                        "choices": [_choice({"role": "assistant", "content": ""})],
                        "sources": event["chunks"],
                    }
                    yield _data(first)
                elif kind == "ai.token":
                    yield _data({**chunk, "choices": [_choice({"content": event["delta"]})]})
                elif kind == "ai.done":
                    finish = _finish(event.get("finish_reason"))
                    yield _data({**chunk, "choices": [_choice({}, finish)]})
                    if include_usage:
                        yield _data({**chunk, "choices": [], "usage": _usage(event["usage"])})
                elif kind == "error":
                    yield _data(
                        {
                            "error": {
                                "message": event["message"],
                                "type": event["code"],
                                "code": event["code"],
                            }
                        }
                    )
                    return
            yield "data: [DONE]\n\n"
        finally:
            await reply.cancel()  # client gone mid-stream: stop the generation
            await limits.reply_finished(who.limit_key, lease)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "finish_reason": finish}


def _data(obj: dict[str, Any]) -> str:
    return f"data: {dumps(obj)}\n\n"


def _finish(reason: Any) -> str:
    return "length" if reason == "length" else "stop"


def _usage(usage: dict[str, Any]) -> dict[str, int]:
    p, c = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _error(event: dict[str, Any]) -> SafeJSONResponse:
    status = {"llm_unavailable": 503, "llm_timeout": 504, "bad_request": 400}.get(
        event["code"], 502
    )
    return SafeJSONResponse(
        {"error": {"message": event["message"], "type": event["code"], "code": event["code"]}},
        status_code=status,
    )
