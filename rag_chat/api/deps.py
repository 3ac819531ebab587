"""What every HTTP route shares: the caller's identity, and JSON that never carries live HTML.

JSON from this server escapes ``<``, ``>`` and ``&`` as ``\\u003c``, ``\\u003e``, ``\\u0026``:
the same values to any JSON parser, but a model's or a document's ``<script>`` can never
become markup if a response is ever rendered or sniffed as HTML.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from rag_chat.auth import COOKIE, Principal, anonymous, bearer
from rag_chat.services import Services

try:  # installed with chromadb; the stdlib does the same, ten times slower
    import orjson
except ImportError:  # pragma: no cover
    orjson = None  # type: ignore[assignment]

# a conversation (or room) id in a URL path
ConversationId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
# a message's id in a URL path
MessageId = Annotated[str, Path(min_length=1, max_length=128)]

_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def dumps(obj: Any) -> str:
    """Compact JSON, ``<``, ``>``, ``&`` escaped. Every frame a client gets goes through here:
    orjson first (a tenth of the stdlib's time); the stdlib for what orjson refuses (a lone
    surrogate, an integer over 64 bits), with the same result."""
    if orjson is None:  # pragma: no cover
        return _stdlib_dumps(obj)
    try:
        raw = orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return _stdlib_dumps(obj)
    # UTF-8 never has these bytes inside a multi-byte character: only the ASCII ones match
    if b"<" in raw or b">" in raw or b"&" in raw:
        raw = raw.replace(b"<", b"\\u003c").replace(b">", b"\\u003e").replace(b"&", b"\\u0026")
    return raw.decode()


def _stdlib_dumps(obj: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_ESCAPES)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from some input: escape rather than fail
        text = json.dumps(obj, ensure_ascii=True, separators=(",", ":")).translate(_ESCAPES)
    return text


class SafeJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


def services_of(conn: HTTPConnection) -> Services:
    services: Services = conn.app.state.services
    return services


def client_host(conn: HTTPConnection) -> str:
    return conn.client.host if conn.client else ""


def credential(conn: HTTPConnection) -> str | None:
    """A bearer token from the Authorization header, else the session cookie."""
    return bearer(conn.headers.get("authorization")) or conn.cookies.get(COOKIE) or None


async def principal(request: Request) -> Principal:
    """The caller. In open development mode everyone is anonymous; otherwise a valid token
    is required (401 ``unauthorized`` with a one-line reason)."""
    auth = services_of(request).auth
    if not auth.required:
        return anonymous(client=client_host(request))
    return auth.verify(credential(request), client_host(request))


Caller = Annotated[Principal, Depends(principal)]
