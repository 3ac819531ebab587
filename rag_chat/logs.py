"""Logging: text or one JSON object per line, with the request or connection id of each record.

::

    HTTP request ──► RequestIdMiddleware: X-Request-ID (a sane incoming one, else a new id)
                     ──► request_id (ContextVar) ──► echoed in the response's X-Request-ID
    WebSocket    ──► the same for the upgrade; ws.py sets conn_id for the connection's life
    any log record ──► ContextFilter copies both ids onto it ──► TextFormatter / JsonFormatter

Tasks started while an id is set inherit it (asyncio copies the context), so a reply started
by a connection logs with that connection's id. ``configure_logging`` (``python -m rag_chat``)
routes uvicorn's own error and access logs through the same handler and formatter.

The WebSocket trace (logger ``rag_chat.ws.trace`` at DEBUG, or ``RAG_TRACE_WS=true``) logs every
event a connection receives and sends: see :func:`event_summary` for what is kept of it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
TRACE_LOGGER = "rag_chat.ws.trace"
TRACE_TEXT_CHARS = 200
LOG_FORMATS = ("text", "json")

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
conn_id: ContextVar[str | None] = ContextVar("conn_id", default=None)

# what a client may choose as its request id: a short token, nothing that could forge a log line
_SANE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+=/-]{0,127}$")
_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")
# attributes every LogRecord has; anything else on a record came in through ``extra=``
_RECORD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "request_id",
    "conn_id",
    "color_message",  # uvicorn's coloured copy of the message
}


def new_id() -> str:
    return uuid.uuid4().hex


def sane_request_id(value: str | None) -> str | None:
    return value if value is not None and _SANE_ID.match(value) else None


class RequestIdMiddleware:
    """Sets ``request_id`` for each HTTP request and WebSocket upgrade: the client's (or a
    proxy's) ``X-Request-ID`` when it is a sane token, else a new one; echoed in the
    response's ``X-Request-ID`` header (and in the WebSocket upgrade's response)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                incoming = sane_request_id(value.decode("latin-1"))
                break
        rid = incoming or new_id()
        start = "http.response.start" if scope["type"] == "http" else "websocket.accept"

        async def send_with_id(message: Message) -> None:
            if message["type"] == start:
                message.setdefault("headers", [])
                MutableHeaders(scope=message).setdefault(REQUEST_ID_HEADER, rid)
            await send(message)

        # not reset afterwards: servers run each request in a task of its own (a copy of the
        # context), and the server's own log of an unhandled error still names the request
        request_id.set(rid)
        await self.app(scope, receive, send_with_id)


class SecurityHeadersMiddleware:
    """``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer`` on every HTTP
    response that does not set its own. Plain ASGI, wrapping only ``send``: Starlette's
    ``@app.middleware("http")`` would pass each streamed body chunk (every token of an SSE
    answer) through a memory stream and a task of its own."""

    HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"))

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in self.HEADERS if k not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ContextFilter(logging.Filter):
    """Puts the current request and connection ids on every record (for either formatter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        if fields.get("request_id") is None:
            fields["request_id"] = request_id.get()
        if fields.get("conn_id") is None:
            fields["conn_id"] = conn_id.get()
        return True


def _ids(record: logging.LogRecord) -> dict[str, str]:
    ids = {
        "request_id": getattr(record, "request_id", None) or request_id.get(),
        "conn_id": getattr(record, "conn_id", None) or conn_id.get(),
    }
    return {k: v for k, v in ids.items() if v}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, ``request_id`` / ``conn_id`` when set, ``exc`` (a traceback), fields passed
    with ``extra=``, and for uvicorn's access log ``client``, ``method``, ``path``,
    ``status``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_ids(record),
        }
        args = record.args
        # uvicorn's access log: '%s - "%s %s HTTP/%s" %d'
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, _version, status = args
            out.update(client=client, method=method, path=path, status=status)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # ASCII: a lone surrogate from a client cannot make the line unwritable
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``LEVEL logger [req=… conn=…]: message`` (the ids only when set)."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s%(ids)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = _ids(record)
        short = {"request_id": "req", "conn_id": "conn"}
        record.__dict__["ids"] = (
            " [" + " ".join(f"{short[k]}={v}" for k, v in ids.items()) + "]" if ids else ""
        )
        return super().format(record)


class _Handler(logging.StreamHandler[IO[str]]):
    """The handler configure_logging installs (so that a second call replaces it)."""


def make_handler(fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) in ``fmt`` that carries the request ids."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(
    level: str | int = "INFO",
    fmt: str = "text",
    *,
    trace_ws: bool = False,
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Log to ``stream`` (stderr) in ``fmt`` ("text" or "json") from the root logger, with
    uvicorn's loggers sent through the same handler (run uvicorn with ``log_config=None``).
    A handler installed by an earlier call is replaced; other handlers are left alone."""
    handler = make_handler(fmt, stream)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in _UVICORN:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    if trace_ws:
        enable_ws_trace()
    return handler


def enable_ws_trace() -> None:
    """Log every WebSocket event (logger ``rag_chat.ws.trace`` at DEBUG)."""
    logger = logging.getLogger(TRACE_LOGGER)
    if not logger.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.DEBUG)


def _cut(text: str, limit: int = TRACE_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# kept as they are (short, fixed-size values)
_SCALARS = (
    "type",
    "room",
    "seq",
    "last_seq",
    "message_id",
    "conversation_id",
    "reply_to",
    "client_id",
    "id",
    "user",
    "code",
    "action",
    "state",
    "finish_reason",
    "cancel_reason",
    "private",
    "ai",
    "partial",
    "event",
)
_TEXTS = ("text", "delta", "message", "query")  # cut to TRACE_TEXT_CHARS
_LISTS = ("history", "chunks", "members", "citations")  # only their length


def event_summary(event: Mapping[str, Any]) -> dict[str, Any]:
    """What the trace keeps of a protocol event: ids, seq and kind as they are, texts cut to
    TRACE_TEXT_CHARS, lists as their length. Never a token (the ``auth`` event's is dropped)."""
    out: dict[str, Any] = {}
    for key in _SCALARS:
        value = event.get(key)
        if value is not None and isinstance(value, str | int | float | bool):
            out[key] = _cut(value, 128) if isinstance(value, str) else value
    for key in _TEXTS:
        value = event.get(key)
        if isinstance(value, str):
            out[key] = _cut(value)
            out[f"{key}_chars"] = len(value)
    for key in _LISTS:
        value = event.get(key)
        if isinstance(value, list):
            out[f"n_{key}"] = len(value)
    return out


def trace_message(direction: str, summary: Mapping[str, Any], size: int) -> str:
    """``send ai.token room='r1' seq=12 size=85 delta='…'``."""
    kind = summary.get("type", "?")
    rest = " ".join(f"{k}={v!r}" for k, v in summary.items() if k != "type")
    return f"{direction} {kind} size={size}" + (f" {rest}" if rest else "")
