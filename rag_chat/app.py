"""The FastAPI app: ``create_app(settings)`` builds the services in the lifespan.

Errors from the one hierarchy (rag_chat.errors) become ``{"error": {"code", "message"}}`` with
the error's HTTP status; request validation failures become one-line ``bad_request`` errors.
Tracebacks never reach clients.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from rag_chat import __version__
from rag_chat.api import openai, rest, sse, ws
from rag_chat.errors import RagChatError
from rag_chat.services import Services
from rag_chat.settings import Settings, get_settings

log = logging.getLogger(__name__)

ServicesFactory = Callable[[Settings], Awaitable[Services]]


def create_app(
    settings: Settings | None = None, services_factory: ServicesFactory | None = None
) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await (services_factory or Services.open)(settings)
        app.state.services = services
        try:
            yield
        finally:
            await services.aclose()

    app = FastAPI(
        title="rag_chat",
        version=__version__,
        summary="Real-time chat that answers questions over your own documents.",
        lifespan=lifespan,
    )

    # One error body for every HTTP route; it is also the shape OpenAI clients parse.
    def error(code: str, message: str, status: int) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": code, "message": message, "type": code}}, status_code=status
        )

    @app.exception_handler(RagChatError)
    async def _rag_error(request: Request, exc: RagChatError) -> JSONResponse:
        return error(exc.code, str(exc), exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error("bad_request", f"{loc}: {first['msg']}" if loc else str(first["msg"]), 422)

    for module in (ws, sse, openai, rest):
        app.include_router(module.router)
    return app
