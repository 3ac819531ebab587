"""REST: conversation history, retrieval alone, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from rag_chat.api.deps import (
    Caller,
    ConversationId,
    MessageId,
    SafeJSONResponse,
    client_host,
    principal,
)
from rag_chat.auth import COOKIE
from rag_chat.errors import NotFound, RagChatError
from rag_chat.services import Services

router = APIRouter()


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


# --- auth ---


class AuthState(BaseModel):
    mode: Literal["open", "jwt"]
    user: str | None


class SessionIn(BaseModel):
    token: str = Field(min_length=1, max_length=8192)


class SessionOut(BaseModel):
    user: str
    expires_at: float | None


@router.get("/api/auth", tags=["auth"], response_model=AuthState)
async def auth_state(request: Request) -> AuthState:
    """Whether this server needs a token, and who the caller is (null: not signed in)."""
    s = _services(request)
    if not s.auth.required:
        return AuthState(mode="open", user=None)
    try:
        who = await principal(request)
    except RagChatError:
        return AuthState(mode="jwt", user=None)
    return AuthState(mode="jwt", user=who.user)


@router.post("/api/auth/session", tags=["auth"], response_model=SessionOut)
async def sign_in(body: SessionIn, request: Request, response: Response) -> SessionOut:
    """Check a token and keep it in an HttpOnly, SameSite=Strict cookie for this browser."""
    who = _services(request).auth.verify(body.token, client_host(request))
    max_age = None if who.expires_at is None else max(1, int(who.expires_at - time.time()))
    response.set_cookie(
        COOKIE,
        body.token,
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return SessionOut(user=who.user, expires_at=who.expires_at)


@router.delete("/api/auth/session", tags=["auth"], status_code=204)
async def sign_out() -> Response:
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/")
    return response


# --- conversations ---


class ConversationOut(BaseModel):
    id: str
    title: str
    updated_at: float


class ConversationsOut(BaseModel):
    conversations: list[ConversationOut]
    # pass as ``before`` for the next, older page; null: there is none
    next_before: float | None = None


@router.get("/api/conversations", tags=["conversations"], response_model=ConversationsOut)
async def list_conversations(
    request: Request,
    who: Caller,
    limit: Annotated[int, Query(ge=1, le=200)] = 100,
    before: Annotated[float | None, Query(allow_inf_nan=False)] = None,
) -> ConversationsOut:
    """The caller's private conversations, most recently active first, ``limit`` at a time;
    ``before`` (a ``next_before``) pages to older ones."""
    rows = await _services(request).access.store.conversations(who.owner, limit + 1, before)
    more = len(rows) > limit
    rows = rows[:limit]
    return ConversationsOut(
        conversations=[ConversationOut(**r) for r in rows],
        next_before=rows[-1]["updated_at"] if more else None,
    )


@router.get("/api/conversations/{conversation_id}/messages", tags=["conversations"])
async def get_messages(
    conversation_id: ConversationId, request: Request, who: Caller
) -> dict[str, Any]:
    """A conversation's stored messages, oldest first (assistant turns carry their sources).
    Someone else's private conversation is 404, like one that does not exist."""
    s = _services(request)
    await s.access.read(who, conversation_id)
    messages = await s.memory.history(conversation_id)
    if not messages:
        raise NotFound(f"no conversation {conversation_id!r}")
    return {"conversation_id": conversation_id, "messages": messages}


class FeedbackIn(BaseModel):
    rating: Literal["up", "down"]
    comment: str = Field(default="", max_length=2000, description="kept as one line")


class FeedbackOut(BaseModel):
    message_id: str
    rating: Literal["up", "down"] | None
    comment: str | None = None


@router.put(
    "/api/conversations/{conversation_id}/messages/{message_id}/feedback",
    tags=["conversations"],
    response_model=FeedbackOut,
    response_model_exclude_none=True,
)
async def rate_answer(
    conversation_id: ConversationId,
    message_id: MessageId,
    body: FeedbackIn,
    request: Request,
    who: Caller,
) -> FeedbackOut:
    """Rate an answer of a conversation or room the caller may read: one rating per user
    (a new one replaces theirs), kept with the answer and counted in /metrics."""
    s = _services(request)
    await s.access.read(who, conversation_id)
    kept = await s.rooms.rate(conversation_id, message_id, who.user, body.rating, body.comment)
    return FeedbackOut(message_id=message_id, **kept)


@router.delete(
    "/api/conversations/{conversation_id}/messages/{message_id}/feedback",
    status_code=204,
    tags=["conversations"],
)
async def unrate_answer(
    conversation_id: ConversationId, message_id: MessageId, request: Request, who: Caller
) -> Response:
    """Take the caller's rating of an answer back."""
    s = _services(request)
    await s.access.read(who, conversation_id)
    await s.rooms.rate(conversation_id, message_id, who.user, None)
    return Response(status_code=204)


class RenameIn(BaseModel):
    title: str = Field(
        min_length=1, max_length=1000, description="one line; at most 80 characters kept"
    )


class RenamedOut(BaseModel):
    id: str
    title: str


@router.patch(
    "/api/conversations/{conversation_id}", tags=["conversations"], response_model=RenamedOut
)
async def rename_conversation(
    conversation_id: ConversationId, body: RenameIn, request: Request, who: Caller
) -> RenamedOut:
    """Give one of the caller's private conversations a title (whitespace collapsed to single
    spaces). Someone else's is 404, like one that does not exist."""
    title = await _services(request).access.rename(who, conversation_id, body.title)
    return RenamedOut(id=conversation_id, title=title)


@router.delete(
    "/api/conversations/{conversation_id}/messages", status_code=204, tags=["conversations"]
)
async def delete_messages(
    conversation_id: ConversationId, request: Request, who: Caller
) -> Response:
    s = _services(request)
    await s.access.delete(who, conversation_id)
    if not await s.memory.delete(conversation_id):
        raise NotFound(f"no conversation {conversation_id!r}")
    return Response(status_code=204)


class SearchIn(BaseModel):
    query: str = Field(min_length=1, max_length=8000)
    k: int = Field(default=5, ge=1, le=200)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"


class SearchHit(BaseModel):
    id: str
    score: float  # the ranker's: fused (hybrid), cosine (dense) or BM25
    # cosine similarity of query and chunk, comparable across modes and queries
    relevance: float | None = None
    text: str
    source: str | None
    doc_id: str | None
    title: str | None = None
    heading: str | None = None
    page: int | None = None
    metadata: dict[str, Any]


class SearchOut(BaseModel):
    query: str
    mode: str
    results: list[SearchHit]


@router.post(
    "/api/search",
    tags=["retrieval"],
    response_model=SearchOut,
    dependencies=[Depends(principal)],
)
async def search(body: SearchIn, request: Request) -> SearchOut:
    """Retrieval alone: the ranked chunks for a query, best first."""
    services = _services(request)
    retriever = services.retriever
    with services.metrics.retrieval.time():
        hits = await asyncio.to_thread(retriever.search, body.query, body.k, body.mode)
    return SearchOut(
        query=body.query,
        mode=body.mode,
        results=[
            SearchHit(
                id=h.id,
                score=h.score,
                relevance=h.relevance,
                text=h.text,
                source=_str(h.metadata.get("source")),
                doc_id=_str(h.metadata.get("doc_id")),
                title=_str(h.metadata.get("title")),
                heading=_str(h.metadata.get("heading")) or None,
                page=int(p) if isinstance(p := h.metadata.get("page"), int) else None,
                metadata=dict(h.metadata),
            )
            for h in hits
        ],
    )


def _str(value: object) -> str | None:
    return None if value is None else str(value)


# the React UI built by `make run` (npm run build); the bare protocol page when it is not built
UI_DIST = Path(__file__).resolve().parents[2] / "frontend" / "dist"
_FALLBACK = Path(__file__).resolve().parent.parent / "static" / "index.html"
UI_CSP = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The browser UI. Its own scripts only (a strict CSP): no markup from a model or a
    document can run even if it got into the page."""
    built = UI_DIST / "index.html"
    page = built if built.is_file() else _FALLBACK
    headers = {"Cache-Control": "no-cache"}
    if page is built:
        headers["Content-Security-Policy"] = UI_CSP
    return FileResponse(page, media_type="text/html", headers=headers)


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"])
async def readyz(request: Request) -> SafeJSONResponse:
    """Ready: Redis (or the in-process store), the vector store and the LLM all answer."""
    s = _services(request)
    checks: dict[str, Any] = {}

    async def check(name: str, probe: Any) -> None:
        try:
            result = await asyncio.wait_for(probe, timeout=5)
            checks[name] = {"ok": True, **(result or {})}
        except (RagChatError, TimeoutError, OSError, RuntimeError, ValueError) as exc:
            checks[name] = {"ok": False, "error": str(exc) or type(exc).__name__}

    async def store() -> dict[str, Any]:
        return {"chunks": await asyncio.to_thread(s.retriever.store.count)}

    async def memory() -> dict[str, Any]:
        await s.memory.ping()
        return {"kind": s.memory.kind}

    async def llm() -> dict[str, Any]:
        await s.llm.check()
        return {"model": s.llm.model_name}

    await asyncio.gather(
        check("memory", memory()), check("vector_store", store()), check("llm", llm())
    )
    ready = all(c["ok"] for c in checks.values())
    return SafeJSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", tags=["ops"])
async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(_services(request).metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
