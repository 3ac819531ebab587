"""The FastAPI app: ``create_app(settings)`` builds the services in the lifespan.

Errors from the one hierarchy (rag_chat.errors) become ``{"error": {"code", "message"}}`` with
the error's HTTP status (429s also carry ``Retry-After`` and ``retry_after``); request
validation failures become one-line ``bad_request`` errors. Tracebacks never reach clients.
Every response carries ``X-Content-Type-Options: nosniff``; CORS follows RAG_ALLOWED_ORIGINS.
Every request has an id (``X-Request-ID``, in and out; rag_chat.logs) that its log records carry;
the lifespan also runs the event-loop lag probe (rag_chat.metrics.watch_loop_lag) and, with
RAG_GC_METRICS, the garbage-collector pause watch (rag_chat.metrics.watch_gc).

Graceful shutdown (:func:`drain`, run by ``python -m rag_chat`` before uvicorn closes
connections): replies in flight are cancelled and end with their ``ai.done``
(``cancel_reason: "server_shutdown"``), every WebSocket gets what was queued for it and then
close code 1012 (service restart: reconnect, with ``last_seq``, to any instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rag_chat import __version__
from rag_chat.api import documents, openai, rest, sse, ws
from rag_chat.api.deps import SafeJSONResponse
from rag_chat.errors import RagChatError, RateLimited
from rag_chat.logs import (
    REQUEST_ID_HEADER,
    RequestIdMiddleware,
    SecurityHeadersMiddleware,
    enable_ws_trace,
)
from rag_chat.metrics import watch_gc, watch_loop_lag
from rag_chat.services import Services
from rag_chat.settings import Settings, get_settings

log = logging.getLogger(__name__)

ServicesFactory = Callable[[Settings], Awaitable[Services]]


class ErrorBody(BaseModel):
    code: str
    message: str = Field(description="one line")
    type: str
    retry_after: float | None = Field(default=None, description="seconds (429)")


class ErrorOut(BaseModel):
    error: ErrorBody


def create_app(
    settings: Settings | None = None, services_factory: ServicesFactory | None = None
) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await (services_factory or Services.open)(settings)
        app.state.services = services
        lag = asyncio.create_task(watch_loop_lag(services.metrics.loop_lag), name="loop-lag")
        stop_gc_watch = watch_gc(services.metrics.gc_pause) if settings.gc_metrics else None
        try:
            yield
        finally:
            if stop_gc_watch is not None:
                stop_gc_watch()
            lag.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag
            await drain(app)
            await services.aclose()

    if settings.trace_ws:
        enable_ws_trace()

    app = FastAPI(
        title="rag_chat",
        version=__version__,
        summary="Real-time chat that answers questions over your own documents.",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
        # what every error really looks like (FastAPI would document its own 422 shape)
        responses={
            "4XX": {"model": ErrorOut, "description": "the request was refused"},
            "5XX": {"model": ErrorOut, "description": "a part of the server failed"},
        },
    )
    app.state.connections = set()
    app.state.drained = False

    # One error body for every HTTP route; it is also the shape OpenAI clients parse.
    def error(
        code: str, message: str, status: int, headers: dict[str, str] | None = None, **extra: object
    ) -> SafeJSONResponse:
        body = {"code": code, "message": message, "type": code, **extra}
        return SafeJSONResponse({"error": body}, status_code=status, headers=headers)

    @app.exception_handler(RagChatError)
    async def _rag_error(request: Request, exc: RagChatError) -> SafeJSONResponse:
        if isinstance(exc, RateLimited):
            return error(
                exc.code,
                str(exc),
                exc.status,
                {"Retry-After": str(exc.retry_after_s)},
                retry_after=exc.retry_after,
            )
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error(exc.code, str(exc), exc.status, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error("bad_request", f"{loc}: {first['msg']}" if loc else str(first["msg"]), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return error(code, str(exc.detail), exc.status_code, dict(exc.headers or {}))

    app.add_middleware(SecurityHeadersMiddleware)

    if settings.allowed_origins:
        wildcard = "*" in settings.allowed_origins
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_credentials=not wildcard,  # cookies never go to "any origin"
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", REQUEST_ID_HEADER],
            expose_headers=["Retry-After", REQUEST_ID_HEADER],
            max_age=600,
        )

    # outermost: the id is set before anything else runs, and is there for the access log
    app.add_middleware(RequestIdMiddleware)

    for module in (ws, sse, openai, documents, rest):
        app.include_router(module.router)
    assets = rest.UI_DIST / "assets"
    if assets.is_dir():  # hashed file names: cacheable for good
        app.mount("/assets", StaticFiles(directory=assets), name="assets")
    return app


async def drain(app: FastAPI, wait_s: float = 5.0) -> None:
    """End what is in flight with a final event and a proper close code (once)."""
    if app.state.drained or not hasattr(app.state, "services"):
        return
    app.state.drained = True
    services: Services = app.state.services
    rooms = services.rooms
    await rooms.stop_replies("server_shutdown", wait_s)
    # the final events are in the room logs: let the hub fan them out to this instance's
    # connections before closing them
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            behind = [
                room
                for room, seen in list(rooms.hub.cursors.items())
                if seen < await rooms.log.last_seq(room)
            ]
        except RagChatError:
            break
        if not behind:
            break
        await asyncio.sleep(0.05)
    connections: set[ws.Connection] = app.state.connections
    with contextlib.suppress(Exception):
        await asyncio.gather(*(c.shutdown(2.0) for c in list(connections)))
    # let each connection flush and send its close frame
    deadline = time.monotonic() + 3.0
    while connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
