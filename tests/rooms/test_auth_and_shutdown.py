"""A real ``python -m rag_chat`` with auth on: tokens from the CLI, the WebSocket subprotocol,
the start-up guards of open mode, and a graceful shutdown (SIGTERM) in the middle of answers:
each ends with its final event, then close code 1012."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import ROOT
from tests.rooms.conftest import (
    TokenServer,
    base_env,
    delete_prefix,
    new_prefix,
    server_env,
    spawn_servers,
)

SECRET = "a-secret-for-the-process-tests-32-chars-at-least"


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rag_chat", *args],
        cwd=ROOT,
        env={**base_env(), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_token_cli_mints_what_the_server_verifies() -> None:
    done = cli("token", "--user", "alice", "--room", "team-*", "--days", "1", RAG_JWT_SECRET=SECRET)
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["rooms"] == ["team-*"]
    assert 86000 < claims["exp"] - claims["iat"] <= 86400

    no_secret = cli("token", "--user", "alice")
    assert no_secret.returncode == 2
    assert no_secret.stderr.strip().splitlines() == [
        "rag_chat token: no key to sign with: set RAG_JWT_SECRET, or pass the RS256 private key"
    ]
    short = cli("token", "--user", "alice", RAG_JWT_SECRET="short")
    assert short.returncode == 2 and "bad setting jwt_secret" in short.stderr


def test_open_mode_refuses_public_interfaces_unless_told(tmp_path: Path) -> None:
    done = cli("--host", "0.0.0.0", "--port", "1", RAG_DATA_DIR=str(tmp_path))
    assert done.returncode == 2
    assert "refusing to serve 0.0.0.0 in open development mode" in done.stderr
    bad_key = cli(RAG_JWT_PUBLIC_KEY=str(tmp_path / "missing.pem"), RAG_DATA_DIR=str(tmp_path))
    assert bad_key.returncode == 1 and "cannot read" in bad_key.stderr


def recv(ws: Any, timeout: float = 20) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(ws.recv(timeout=timeout))
    return event


def until(ws: Any, kind: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        event = recv(ws, max(0.1, deadline - time.monotonic()))
        if event["type"] in (kind, "error"):
            return event


def test_authenticated_server_and_graceful_shutdown(
    tmp_path: Path, guide_index: Path, token_server: TokenServer
) -> None:
    prefix = new_prefix()
    env = server_env(guide_index, prefix, token_server.v1, RAG_JWT_SECRET=SECRET)
    (server,) = spawn_servers(["S"], env, tmp_path)
    try:
        token = cli("token", "--user", "alice", RAG_JWT_SECRET=SECRET).stdout.strip()
        r = httpx.post(f"{server.url}/api/search", json={"query": "port"}, timeout=30)
        assert r.status_code == 401
        r = httpx.post(
            f"{server.url}/api/search",
            json={"query": "port"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert r.status_code == 200

        # a browser-style connection from another site is refused before the upgrade
        with pytest.raises(Exception, match="403"):
            connect(server.ws_url, additional_headers={"Origin": "http://evil.example"})

        protocols: Any = ["rag_chat", f"bearer.{token}"]
        with connect(server.ws_url, subprotocols=protocols, open_timeout=20) as ws:
            assert ws.subprotocol == "rag_chat"
            ws.send(json.dumps({"type": "join", "room": "ops"}))
            assert until(ws, "joined")["user"] == "alice"

            # two long answers in flight (a private one over WS, one over SSE), then SIGTERM
            ws.send(json.dumps({"type": "message", "text": "[[tokens=100000 rate=50]] go"}))
            start = until(ws, "ai.start")
            assert start["type"] == "ai.start"
            until(ws, "ai.token")
            sse_events: list[str] = []

            def sse() -> None:
                with httpx.stream(
                    "POST",
                    f"{server.url}/api/chat",
                    json={"message": "[[tokens=100000 rate=50]] more"},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=60,
                ) as r:
                    for line in r.iter_lines():
                        if line.startswith("event: "):
                            sse_events.append(line[7:])

            reader = threading.Thread(target=sse, daemon=True)
            reader.start()
            deadline = time.monotonic() + 30
            while "ai.token" not in sse_events and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "ai.token" in sse_events

            server.popen.send_signal(signal.SIGTERM)
            done = until(ws, "ai.done", timeout=30)
            assert done["type"] == "ai.done", done
            assert done["message_id"] == start["message_id"]
            assert (done["finish_reason"], done["cancel_reason"]) == (
                "cancelled",
                "server_shutdown",
            )
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    recv(ws, 30)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1012
            reader.join(timeout=30)
            assert sse_events[-1] == "ai.done"  # the SSE stream ended with its final event too
        server.popen.wait(timeout=30)
        # uvicorn re-raises the signal it handled once shutdown is complete
        assert server.popen.returncode in (0, -signal.SIGTERM), server.tail()
        assert "Traceback" not in server.tail(20_000)
        assert token_server.wait_idle()["active"] == 0  # both generations were stopped
    finally:
        server.stop()
        delete_prefix(prefix)
