"""What the in-process WebSocket and SSE tests share."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession

from rag_chat.api.protocol import server_event
from rag_chat.errors import RetrievalError


def receive(ws: WebSocketTestSession) -> dict[str, Any]:
    """The next event, checked against the protocol's schema (what the UI's types are
    generated from): a field or error code the schema does not list fails the test."""
    event: dict[str, Any] = ws.receive_json()
    server_event.validate_python(event)
    return event


def until(ws: WebSocketTestSession, kind: str, **match: Any) -> dict[str, Any]:
    """The next event of type ``kind`` whose fields equal ``match`` (others are skipped)."""
    while True:
        event = receive(ws)
        if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
            return event


def answer(ws: WebSocketTestSession) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The next answer: its ai.start, its text and its ai.done (or error)."""
    start = until(ws, "ai.start")
    text = ""
    while True:
        event = receive(ws)
        if event.get("message_id") != start["message_id"]:
            continue
        if event["type"] == "ai.token":
            text += event["delta"]
        elif event["type"] in ("ai.done", "error"):
            return start, text, event


def sse(
    client: TestClient, url: str, body: dict[str, Any], method: str = "POST"
) -> list[dict[str, Any]]:
    """The events of an SSE response (200 expected), in order."""
    events = []
    with client.stream(method, url, json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def fail_next_retrieval(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's next retrieval fails (RetrievalError, a real one's message); later ones run."""
    chat = client.app.state.services.chat  # type: ignore[attr-defined]
    real = chat.retrieve
    failures = [RetrievalError("retrieval failed: the index is being rebuilt")]

    async def retrieve(query: str, k: int | None = None) -> Any:
        if failures:
            raise failures.pop()
        return await real(query, k)

    monkeypatch.setattr(chat, "retrieve", retrieve)
