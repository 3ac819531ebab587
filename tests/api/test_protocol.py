"""The protocol's types are true: the committed schema (what the UI's TypeScript types are
generated from) is the server's current one, and every event the server sends in a rich
exchange validates against it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, get_args

from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession

from rag_chat.api.protocol import ErrorCode, schema_text, server_event
from rag_chat.errors import RagChatError
from rag_chat.llm.fake import FakeLLM
from tests.conftest import ROOT

SCHEMA = ROOT / "frontend" / "src" / "wire.schema.json"


def test_the_committed_schema_is_current() -> None:
    assert SCHEMA.read_text() == schema_text(), (
        "the WebSocket protocol changed: run `.venv/bin/python -m rag_chat schema > "
        "frontend/src/wire.schema.json && (cd frontend && npm run gen:wire)`"
    )
    out = subprocess.run(
        [sys.executable, "-m", "rag_chat", "schema"], capture_output=True, text=True, check=True
    ).stdout
    assert out == schema_text()


# raised only by the upload routes (HTTP): never in a WebSocket error event
HTTP_ONLY_CODES = {"storage_error", "insufficient_storage", "unsupported_type"}


def test_the_schema_lists_every_error_code_the_server_raises() -> None:
    """A WebSocket error event carries the code of the error raised: each must be in the
    schema's ErrorCode (``conflict`` was missing from it for a stop)."""
    codes, todo = set(), [RagChatError]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    assert codes - HTTP_ONLY_CODES <= set(get_args(ErrorCode)), codes - set(get_args(ErrorCode))


def frames(ws: WebSocketTestSession, until: str, seen: list[dict[str, Any]]) -> None:
    while True:
        event: dict[str, Any] = json.loads(ws.receive_text())
        seen.append(event)
        if event["type"] == until:
            return


def test_every_event_the_server_sends_validates(make_app: Any) -> None:
    llm = FakeLLM(delay=0.01)
    seen: list[dict[str, Any]] = []
    with (
        TestClient(make_app(llm)) as client,
        client.websocket_connect("/ws") as a,
        client.websocket_connect("/ws") as b,
    ):
        a.send_json({"type": "join", "room": "proto", "user": "alice"})
        frames(a, "joined", seen)
        b.send_json({"type": "join", "room": "proto", "user": "bob"})
        frames(b, "joined", seen)
        frames(a, "presence", seen)
        a.send_json({"type": "typing", "room": "proto", "state": "start"})
        frames(b, "typing", seen)
        llm.enqueue(["Port ", "8000 ", "[1]."])
        a.send_json(
            {"type": "message", "room": "proto", "text": "@ai which port?", "client_id": "p1"}
        )
        frames(b, "ai.done", seen)
        llm.enqueue(["slow "] * 500)
        b.send_json({"type": "message", "room": "proto", "text": "@ai more"})
        frames(b, "ai.token", seen)
        start = next(e for e in reversed(seen) if e["type"] == "ai.start")
        b.send_json({"type": "cancel", "message_id": start["message_id"]})
        frames(b, "ai.done", seen)
        frames(a, "ai.done", seen)
        a.send_json({"type": "ping"})
        frames(a, "pong", seen)
        for bad in (
            "{",
            '{"type": "message"}',
            '{"type": "typing", "room": "nope", "state": "start"}',
        ):
            a.send_text(bad)
            frames(a, "error", seen)
        a.send_json({"type": "leave", "room": "proto"})
        frames(a, "left", seen)
        # a private conversation (history on join) and an answer that fails half-way
        llm.enqueue(["ok"])
        a.send_json({"type": "message", "text": "hello", "conversation_id": "proto-private"})
        frames(a, "ai.done", seen)
        a.send_json({"type": "join", "room": "proto-private", "private": True})
        frames(a, "joined", seen)
        llm.fail_after = 2
        llm.enqueue(["half ", "way ", "there"])
        a.send_json({"type": "message", "text": "again", "conversation_id": "proto-private"})
        frames(a, "error", seen)
    kinds = {e["type"] for e in seen}
    assert kinds >= {
        "joined", "presence", "typing", "message", "ai.start", "ai.sources", "ai.token",
        "ai.done", "ai.cancel", "error", "pong", "left",
    }, kinds  # fmt: skip
    joined = [e for e in seen if e["type"] == "joined" and e["history"]]
    assert joined and joined[-1]["history"][-1]["role"] == "assistant"
    assert any(e["type"] == "error" and e.get("partial") for e in seen)
    for event in seen:
        server_event.validate_python(event)  # raises with the field that does not fit
