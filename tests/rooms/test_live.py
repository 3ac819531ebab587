"""The hub's live feed (Redis pub/sub beside the streams): what it loses, the log gives back.

Real Redis throughout. The feed is made to fail the ways a connection does — dropped while
appends go on, a message lost — and every subscriber must still get every event once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from rag_chat.errors import MemoryUnavailable
from rag_chat.rooms import RedisPresence, RedisRoomLog, RoomHub
from rag_chat.rooms.log import Event
from tests.memory import RedisServer
from tests.rooms.conftest import REDIS_URL, delete_prefix, new_prefix, until


class _FlakyLog(RedisRoomLog):
    """The real log, whose live feed can be cut (``cut``: the connection fails at the next
    batch) or made to lose the next batch (``lose``)."""

    cut = False
    lose = False
    connections = 0

    async def live(self) -> AsyncGenerator[list[Event], None]:
        self.connections += 1
        async for batch in super().live():
            if batch and self.cut:
                self.cut = False
                raise MemoryUnavailable("room events connection lost (test)")
            if batch and self.lose:
                self.lose = False
                continue
            yield batch


@contextlib.asynccontextmanager
async def _following(
    url: str = REDIS_URL, prefix: str | None = None
) -> AsyncIterator[tuple[_FlakyLog, list[Event]]]:
    """A flaky log and a hub following room "r" from now on (what it delivers is collected);
    stopped and, on the shared Redis, its keys deleted afterwards."""
    prefix = prefix or new_prefix()
    log = _FlakyLog(url, prefix)
    hub = RoomHub(log)
    hub.start()
    try:
        got: list[Event] = []
        await hub.subscribe("r", None, got.append)
        await until(lambda: log.connections == 1)
        yield log, got
    finally:
        await hub.stop()
        await log.aclose()
        if url == REDIS_URL:
            delete_prefix(prefix)


async def test_events_appended_while_the_feed_was_down_arrive_after_it_is_back() -> None:
    async with _following() as (log, got):
        await log.append("r", {"type": "message", "n": 0})
        await until(lambda: len(got) == 1)
        log.cut = True
        for n in range(1, 21):  # the first of these cuts the feed; the rest come while it is down
            await log.append("r", {"type": "message", "n": n})
        await until(lambda: len(got) == 21)
        assert log.connections == 2  # it reconnected …
        assert [e["n"] for e in got] == list(range(21))  # … and nothing is missing or twice
        await log.append("r", {"type": "message", "n": 21})
        await until(lambda: len(got) == 22)
        assert [e["seq"] for e in got] == list(range(1, 23))


async def test_a_lost_message_is_read_from_the_log_when_the_next_one_comes() -> None:
    async with _following() as (log, got):
        await log.append("r", {"type": "message", "n": 0})
        await until(lambda: len(got) == 1)
        log.lose = True
        await log.append("r", {"type": "message", "n": 1})  # never reaches the hub live
        await asyncio.sleep(0.2)
        assert len(got) == 1
        await log.append("r", {"type": "message", "n": 2})  # seq 3 after 1: the gap is read
        await until(lambda: len(got) == 3)
        assert [e["n"] for e in got] == [0, 1, 2]
        assert log.connections == 1  # no reconnection was needed


async def test_the_feed_carries_batches_and_presence_with_their_seqs() -> None:
    """What the append script and the presence script publish decodes to the stream's events."""
    prefix = new_prefix()
    log = RedisRoomLog(REDIS_URL, prefix)
    feed = log.live()
    try:
        assert await anext(feed) == []  # listening
        await log.append_many("q", [{"type": "a", "text": "line\nbreak"}, {"type": "b"}])
        presence = RedisPresence(REDIS_URL, prefix)
        await presence.add("q", "conn-1", "alice")
        await presence.aclose()
        live: list[Event] = []
        while len(live) < 3:
            live += await asyncio.wait_for(anext(feed), 5)
        assert live == await log.since("q", 0)
        assert [(e["seq"], e["type"]) for e in live] == [(1, "a"), (2, "b"), (3, "presence")]
        assert live[0]["text"] == "line\nbreak" and live[2]["user"] == "alice"
    finally:
        await feed.aclose()
        await log.aclose()
        delete_prefix(prefix)


class _PasswordRedis(RedisServer):
    """A private redis-server that wants a password (the raw connections AUTH, then SELECT)."""

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--requirepass", "s3cret", "--dir", str(self.workdir)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 10
        while True:  # ready once it answers at all (NOAUTH)
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16):
                    return
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)


async def test_a_password_and_a_database_number_in_the_url(tmp_path: Path) -> None:
    server = _PasswordRedis(tmp_path)
    server.start()
    try:
        async with _following(f"redis://:s3cret@127.0.0.1:{server.port}/3", "pw:") as (log, got):
            await log.append("r", {"type": "message", "n": 0})
            await until(lambda: len(got) == 1)
        # the append went to database 3, where redis-py (and `since`) read it
        reader = Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        assert await reader.exists("pw:room:r:log") == 1
        await reader.aclose()
        wrong = RedisRoomLog(f"redis://:nope@127.0.0.1:{server.port}/3", "pw:")
        with pytest.raises(MemoryUnavailable):
            await wrong.append("r", {"type": "message"})
        await wrong.aclose()
    finally:
        server.stop()
