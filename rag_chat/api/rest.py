"""REST: conversation history, retrieval alone, health, readiness and metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from rag_chat.errors import NotFound, RagChatError
from rag_chat.services import Services

router = APIRouter()
ConversationId = Annotated[
    str, PathParam(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
]


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@router.get("/api/conversations/{conversation_id}/messages", tags=["conversations"])
async def get_messages(conversation_id: ConversationId, request: Request) -> dict[str, Any]:
    """A conversation's stored messages, oldest first (assistant turns carry their sources)."""
    messages = await _services(request).memory.history(conversation_id)
    if not messages:
        raise NotFound(f"no conversation {conversation_id!r}")
    return {"conversation_id": conversation_id, "messages": messages}


@router.delete(
    "/api/conversations/{conversation_id}/messages", status_code=204, tags=["conversations"]
)
async def delete_messages(conversation_id: ConversationId, request: Request) -> Response:
    if not await _services(request).memory.delete(conversation_id):
        raise NotFound(f"no conversation {conversation_id!r}")
    return Response(status_code=204)


class SearchIn(BaseModel):
    query: str = Field(min_length=1, max_length=8000)
    k: int = Field(default=5, ge=1, le=200)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"


class SearchHit(BaseModel):
    id: str
    score: float
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


@router.post("/api/search", tags=["retrieval"], response_model=SearchOut)
async def search(body: SearchIn, request: Request) -> SearchOut:
    """Retrieval alone: the ranked chunks for a query, best first."""
    retriever = _services(request).retriever
    hits = await asyncio.to_thread(retriever.search, body.query, body.k, body.mode)
    return SearchOut(
        query=body.query,
        mode=body.mode,
        results=[
            SearchHit(
                id=h.id,
                score=h.score,
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


_INDEX = Path(__file__).resolve().parent.parent / "static" / "index.html"


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """A minimal browser client of the WebSocket protocol."""
    return FileResponse(_INDEX, media_type="text/html")


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"])
async def readyz(request: Request) -> JSONResponse:
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
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", tags=["ops"])
async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(_services(request).metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
