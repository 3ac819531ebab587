"""What the in-process WebSocket tests share."""

from __future__ import annotations

from typing import Any

from starlette.testclient import WebSocketTestSession


def until(ws: WebSocketTestSession, kind: str, **match: Any) -> dict[str, Any]:
    """The next event of type ``kind`` whose fields equal ``match`` (others are skipped)."""
    while True:
        event = ws.receive_json()
        if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
            return event
