"""Fault injection against real processes: ``python -m rag_chat`` instances, the synthetic
token server as the LLM (``python -m rag_chat.testing.token_server``) and Redis.

``instance`` is one server on the shared Redis (DB 13, a key prefix of its own) whose LLM is
``llm``, a token server on a fixed port that a test may kill and start again. Tests that stop
Redis start their own (``PersistentRedis``, with an append-only file, so that what it held is
there again after a restart) and their own server pointed at it. Every process started here is
stopped, and every key under the prefixes deleted, at the end.

Helpers: ``metric`` (a sample of ``/metrics``), ``rss_kib`` (a process's resident memory),
``wait_for`` (a condition, with a bound that detects a hang) and ``RawWebSocket`` (a client
that sends its frames by hand and reads only when told, for the consumer that stops reading).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from rag_chat.testing.procs import Proc, free_port, spawn, wait_ready
from tests.memory import RedisServer
from tests.rooms.conftest import (
    Client,
    Event,
    TokenServer,
    base_env,
    delete_prefix,
    new_prefix,
    server_env,
    spawn_servers,
)

# what the servers here are started with (see the README's configuration table)
GRACE_S = 1.0  # RAG_REPLY_GRACE_SECONDS: a reply nobody listens to is cancelled after this
LLM_READ_TIMEOUT_S = 3.0  # RAG_LLM_READ_TIMEOUT_SECONDS (rag_chat/llm/openai_compat.py)
TOKENS = 24  # the token server's default answer
RATE = 400.0

T = TypeVar("T")


def fault_env(**extra: str) -> dict[str, str]:
    """Settings every server in these tests gets, on top of ``server_env``."""
    return {
        "RAG_REPLY_GRACE_SECONDS": str(GRACE_S),
        "RAG_LLM_READ_TIMEOUT_SECONDS": str(LLM_READ_TIMEOUT_S),
        # the faults, not the abuse limits, are under test: in open mode every client here is
        # one user (one address), with many connections, messages and replies at once
        "RAG_RATE_LIMIT_PER_MINUTE": "0",
        "RAG_MAX_REPLIES_PER_USER": "1000",
        "RAG_MAX_CONNECTIONS_PER_USER": "1000",
        **extra,
    }


def wait_for(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.1) -> T:
    """``check()``'s first truthy value; fails after ``timeout`` s (a hang, not a speed goal)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(every)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$")


def metrics(proc: Proc) -> dict[str, float]:
    """Every sample of ``/metrics``: ``{'name{labels}': value}``."""
    r = httpx.get(proc.url + "/metrics", timeout=10)
    r.raise_for_status()
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if (m := _SAMPLE.match(line)) is not None:
            out[m.group(1)] = float(m.group(2))
    return out


def metric(proc: Proc, name: str) -> float:
    samples = metrics(proc)
    assert name in samples, f"{name} not in /metrics: {sorted(samples)[:40]}"
    return samples[name]


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/PID/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def history(proc: Proc, conversation_id: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{proc.url}/api/conversations/{conversation_id}/messages", timeout=15)
    assert r.status_code == 200, (r.status_code, r.text)
    messages: list[dict[str, Any]] = r.json()["messages"]
    return messages


def deltas(events: list[Event], message_id: str) -> str:
    return "".join(
        e["delta"] for e in events if e.get("type") == "ai.token" and e["message_id"] == message_id
    )


def ask_private(client: Client, text: str, timeout: float = 30.0) -> Event:
    """Send ``text`` to the connection's private conversation; its ``ai.start``."""
    since = client.mark()
    client.send(type="message", text=text)
    return client.until("ai.start", timeout=timeout, since=since)


def ping(client: Client, timeout: float = 10.0) -> Event:
    since = client.mark()
    client.send(type="ping")
    return client.until("pong", timeout=timeout, since=since)


# --- the LLM: a token server that can be killed and started again on the same port ---


@dataclass
class LLMServer:
    log_dir: Path
    port: int = field(default_factory=free_port)
    starts: int = 0
    server: TokenServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def start(self) -> TokenServer:
        assert self.server is None or not self.server.proc.alive()
        self.starts += 1
        args = [sys.executable, "-m", "rag_chat.testing.token_server", "--port", str(self.port)]
        args += ["--tokens", str(TOKENS), "--rate", str(RATE)]
        name = f"token-server-{self.starts}"
        proc = spawn(name, args, base_env(), self.log_dir, self.url)
        wait_ready([proc], "/v1/models", timeout=60)
        self.server = TokenServer(proc, TOKENS, RATE)
        return self.server

    def ensure(self) -> TokenServer:
        if self.server is None or not self.server.proc.alive():
            return self.start()
        return self.server

    def kill(self) -> None:
        """SIGKILL: its streams end without a last chunk, like a crashed inference server."""
        assert self.server is not None
        self.server.proc.kill()

    def stop(self) -> None:
        if self.server is not None:
            self.server.proc.stop()


@pytest.fixture(scope="session")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLMServer]:
    server = LLMServer(tmp_path_factory.mktemp("faults-llm"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Instance:
    proc: Proc
    prefix: str
    llm: LLMServer

    @property
    def token(self) -> TokenServer:
        """The token server now running (started again if a test left it dead)."""
        return self.llm.ensure()


@pytest.fixture(scope="session")
def instance(
    tmp_path_factory: pytest.TempPathFactory, guide_index: Path, llm: LLMServer
) -> Iterator[Instance]:
    prefix = new_prefix()
    log_dir = tmp_path_factory.mktemp("faults-instance")
    env = server_env(guide_index, prefix, llm.v1, **fault_env())
    procs: list[Proc] = []
    try:
        procs = spawn_servers(["faults"], env, log_dir)
        yield Instance(procs[0], prefix, llm)
    finally:
        for proc in procs:
            proc.stop()
        delete_prefix(prefix)


@pytest.fixture
def healthy(instance: Instance) -> Iterator[Instance]:
    """The instance, with its LLM running, before and after the test; and the instance alive."""
    instance.llm.ensure()
    assert instance.proc.alive(), instance.proc.tail()
    yield instance
    instance.llm.ensure()
    assert instance.proc.alive(), instance.proc.tail()


# --- a private Redis that keeps its data across a restart ---


class PersistentRedis(RedisServer):
    """A private ``redis-server`` with an append-only file fsynced on every write: a restart
    (even after SIGKILL) finds everything it acknowledged."""

    def start(self) -> None:
        assert self.proc is None
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        args += ["--dir", str(self.workdir)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_ready()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("these tests need redis-server (apt-get install redis-server)")
    server = PersistentRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- a WebSocket client that reads only when told ---

CLOSE = 0x8
TEXT = 0x1


@dataclass
class Frames:
    texts: int = 0
    close_code: int | None = None
    close_reason: str = ""
    reset: bool = False  # the connection was reset before (or instead of) a close frame
    eof: bool = False


class RawWebSocket:
    """A WebSocket client over a plain socket: the upgrade, masked text frames out, and nothing
    read until :meth:`drain` — a consumer that stopped reading (a frozen tab, a dead app)."""

    def __init__(self, url: str, rcvbuf: int | None = None) -> None:
        m = re.match(r"http://([^:/]+):(\d+)", url)
        assert m is not None, url
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect(): it sets the window offered to the server
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(20)
        self.sock.connect((m.group(1), int(m.group(2))))
        self.ports = (int(m.group(2)), int(self.sock.getsockname()[1]))  # (server's, mine)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {m.group(1)}:{m.group(2)}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)  # byte by byte: not a byte of the first frame is taken
            assert chunk, f"connection closed during the upgrade: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, **event: Any) -> None:
        payload = json.dumps(event).encode()
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | TEXT, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | TEXT, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | TEXT, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def server_side(self) -> tuple[int, int] | None:
        """(TCP state, socket inode) of the server's end of this connection, from
        /proc/net/tcp; None once the kernel forgot it. The inode is 0 when no process holds the
        socket any more (the kernel may still be delivering what was written, then the FIN)."""
        server_port, my_port = self.ports
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == server_port and (
                int(remote.rsplit(":", 1)[1], 16) == my_port
            ):
                return int(fields[3], 16), int(fields[9])
        return None

    def released_by_server(self) -> bool:
        """The server process closed its socket of this connection (seen without reading)."""
        side = self.server_side()
        return side is None or side[1] == 0

    def pending_bytes(self) -> int:
        """Bytes waiting in this socket's receive queue (SIOCINQ)."""
        import fcntl
        import termios

        buf = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])

    def drain(self, timeout: float) -> Frames:
        """Read everything up to the end of the connection: how many text frames, and the close
        frame if one came."""
        frames = Frames()
        buf = bytearray()
        deadline = time.monotonic() + timeout
        self.sock.settimeout(None)
        while frames.close_code is None:
            left = deadline - time.monotonic()
            assert left > 0, f"the connection did not end within {timeout} s"
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                frames.reset = True
                break
            if not chunk:
                frames.eof = True
                break
            buf += chunk
            pos = 0
            while True:
                parsed = _frame(buf, pos)
                if parsed is None:
                    break
                opcode, payload, pos = parsed
                if opcode == TEXT:
                    frames.texts += 1
                elif opcode == CLOSE:
                    frames.close_code = struct.unpack("!H", payload[:2])[0] if payload else 1005
                    frames.close_reason = payload[2:].decode(errors="replace")
                    break
            del buf[:pos]
        return frames

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _frame(buf: bytearray, pos: int) -> tuple[int, bytes, int] | None:
    """(opcode, payload, next position) of the server frame at ``pos``, or None if partial."""
    if len(buf) - pos < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    assert not b1 & 0x80, "a server frame must not be masked"
    n, at = b1 & 0x7F, pos + 2
    if n == 126:
        if len(buf) - at < 2:
            return None
        n, at = struct.unpack_from("!H", buf, at)[0], at + 2
    elif n == 127:
        if len(buf) - at < 8:
            return None
        n, at = struct.unpack_from("!Q", buf, at)[0], at + 8
    if len(buf) - at < n:
        return None
    return b0 & 0x0F, bytes(buf[at : at + n]), at + n
