"""Real processes for the room tests: a synthetic token server and several ``python -m rag_chat``
instances sharing one Redis (DB 13, one key prefix of their own) and one data dir.

Every process started here is stopped, and every Redis key under the prefix deleted, at the end.
The helpers (``Client``, ``spawn_servers``, ...) are imported by the test modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from rag_chat.testing.procs import (
    Proc,
    delete_keys,
    free_port,
    offline_env,
    spawn,
    wait_ready,
)
from tests.conftest import TEST_REDIS_DB

REDIS_URL = f"redis://127.0.0.1:6379/{TEST_REDIS_DB}"
PRESENCE_TTL_S = 3.0
TYPING_TTL_S = 2.0
# the token server's default answer: short and fast (requests override it with [[tokens=N ...]])
TOKENS = 24
RATE = 400.0

Event = dict[str, Any]
_QUIET = logging.getLogger("tests.rooms.dropped-connections")
_QUIET.disabled = True


def base_env() -> dict[str, str]:
    # the session's cache of the exported embedding model is kept: every server would export it;
    # so is the suite's RAG_MIN_RELEVANCE (tests/conftest.py: no "don't know" for "hi")
    return offline_env(keep=("RAG_EMBEDDING_CACHE_DIR", "RAG_MIN_RELEVANCE"))


def server_env(data_dir: Path, prefix: str, llm_url: str, **extra: str) -> dict[str, str]:
    return {
        **base_env(),
        "RAG_DATA_DIR": str(data_dir),
        "RAG_REDIS_URL": REDIS_URL,
        "RAG_REDIS_PREFIX": prefix,
        "RAG_LLM_BASE_URL": llm_url,
        "RAG_PRESENCE_TTL_SECONDS": str(PRESENCE_TTL_S),
        "RAG_TYPING_TTL_SECONDS": str(TYPING_TTL_S),
        # every client here is 127.0.0.1, one "user" for the open-mode rate limit: these
        # tests are about ordering and fan-out (tests/api/test_abuse.py covers the limit)
        "RAG_RATE_LIMIT_PER_MINUTE": "0",
        "RAG_MAX_REPLIES_PER_USER": "1000",
        "RAG_MAX_CONNECTIONS_PER_USER": "100000",
        **extra,
    }


def spawn_servers(names: list[str], env: dict[str, str], log_dir: Path) -> list[Proc]:
    """``python -m rag_chat`` instances on free ports, ready (``/readyz`` 200) when returned."""
    procs = []
    for name in names:
        port = free_port()
        args = [sys.executable, "-m", "rag_chat", "--port", str(port), "--log-level", "warning"]
        procs.append(spawn(name, args, env, log_dir, f"http://127.0.0.1:{port}"))
    wait_ready(procs, "/readyz")
    return procs


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (without blocking the event loop) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def new_prefix() -> str:
    return f"test:rooms:{uuid.uuid4().hex}:"


def delete_prefix(prefix: str) -> None:
    """SCAN + DEL of this prefix's keys only (never a flush)."""
    assert prefix.startswith("test:") and prefix.endswith(":")
    delete_keys(REDIS_URL, prefix)


@dataclass
class TokenServer:
    proc: Proc
    tokens: int
    rate: float

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def v1(self) -> str:
        return self.proc.url + "/v1"

    def stats(self, recent: int = 0) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/stats", params={"recent": recent}, timeout=5)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def wait_idle(self, timeout: float = 10.0) -> dict[str, Any]:
        """The stats once no completion is in progress."""
        deadline = time.monotonic() + timeout
        while (stats := self.stats())["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        return stats


def start_token_server(log_dir: Path, tokens: int = TOKENS, rate: float = RATE) -> TokenServer:
    port = free_port()
    args = [sys.executable, "-m", "rag_chat.testing.token_server", "--port", str(port)]
    args += ["--tokens", str(tokens), "--rate", str(rate)]
    proc = spawn("token-server", args, base_env(), log_dir, f"http://127.0.0.1:{port}")
    wait_ready([proc], "/v1/models", timeout=60)
    return TokenServer(proc, tokens, rate)


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    server = start_token_server(tmp_path_factory.mktemp("token-server"))
    try:
        yield server
    finally:
        server.proc.stop()


@dataclass
class Cluster:
    """Instances A and B (and a spare, C, for the test that kills one) sharing Redis and data."""

    a: Proc
    b: Proc
    spare: Proc
    token: TokenServer
    prefix: str
    data_dir: Path
    log_dir: Path

    def servers(self) -> list[Proc]:
        return [self.a, self.b]


@pytest.fixture(scope="session")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, guide_index: Path, token_server: TokenServer
) -> Iterator[Cluster]:
    prefix = new_prefix()
    log_dir = tmp_path_factory.mktemp("cluster")
    env = server_env(guide_index, prefix, token_server.v1)
    procs: list[Proc] = []
    try:
        # started together: the spare's start-up overlaps A's and B's instead of a test's
        procs = spawn_servers(["A", "B", "C"], env, log_dir)
        a, b, spare = procs
        yield Cluster(a, b, spare, token_server, prefix, guide_index, log_dir)
    finally:
        for proc in procs:
            proc.stop()
        delete_prefix(prefix)


class Client:
    """A WebSocket client that keeps every event it received, in order."""

    def __init__(self, server: Proc | str, name: str = "client") -> None:
        url = server.ws_url if isinstance(server, Proc) else server
        self.name = name
        # max_queue=None: a client that reads late buffers rather than pushing back on the server
        self.ws: ClientConnection = connect(
            url, open_timeout=20, close_timeout=2, max_queue=None, legacy=True
        )
        self.events: list[Event] = []
        self.closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, **event: Any) -> None:
        self.ws.send(json.dumps(event))

    def recv(self, timeout: float) -> Event | None:
        """The next event, or None after ``timeout`` seconds without one."""
        try:
            raw = self.ws.recv(timeout=max(timeout, 0.0))
        except TimeoutError:
            return None
        event: Event = json.loads(raw)
        event["_t"] = time.monotonic()
        self.events.append(event)
        return event

    def mark(self) -> int:
        return len(self.events)

    def until(self, kind: str, timeout: float = 15.0, since: int = 0, **match: Any) -> Event:
        """The first event (from index ``since`` of what was received) of type ``kind`` whose
        fields equal ``match``, reading more as needed."""

        def ok(e: Event) -> bool:
            return e.get("type") == kind and all(e.get(k) == v for k, v in match.items())

        return self.wait(ok, timeout, since, f"{kind} {match}")

    def wait(self, pred: Callable[[Event], bool], timeout: float, since: int, what: str) -> Event:
        i = since
        deadline = time.monotonic() + timeout
        while True:
            while i < len(self.events):
                i += 1
                if pred(self.events[i - 1]):
                    return self.events[i - 1]
            left = deadline - time.monotonic()
            if left <= 0 or self.recv(left) is None:
                seen = [(e.get("type"), e.get("seq"), e.get("user")) for e in self.events[-30:]]
                raise AssertionError(f"{self.name}: no {what} within {timeout}s; last: {seen}")

    def join(self, room: str, user: str | None = None, last_seq: int | None = None) -> Event:
        event: dict[str, Any] = {"type": "join", "room": room}
        if user is not None:
            event["user"] = user
        if last_seq is not None:
            event["last_seq"] = last_seq
        since = self.mark()
        self.send(**event)
        return self.until("joined", since=since, room=room)

    def drop(self) -> None:
        """Lose the connection without a close frame (a cable pulled, a laptop lid shut)."""
        if self.closed:
            return
        self.closed = True
        # the client library logs the torn connection as an internal error: it is on purpose
        self.ws.logger = _QUIET
        with contextlib.suppress(OSError):
            self.ws.socket.shutdown(socket.SHUT_RDWR)
        self.ws.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ConnectionClosed):
            self.ws.close()


def room_events(events: list[Event], room: str) -> list[Event]:
    return [e for e in events if e.get("room") == room and "seq" in e]


def new_room(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"
