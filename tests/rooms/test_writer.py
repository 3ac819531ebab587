"""How a reply reaches its room log: batched appends (consecutive seqs, one pipeline for many
rooms), and the reply writer that merges tokens coming while one is on its way to Redis."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from rag_chat.errors import MemoryUnavailable
from rag_chat.rooms import LocalRoomLog, RedisRoomLog
from rag_chat.rooms import log as log_module
from rag_chat.rooms.log import _APPEND, Event, RoomLog, _Batcher
from rag_chat.rooms.service import ReplyWriter
from tests.memory import RedisServer
from tests.rooms.conftest import REDIS_URL, delete_prefix, new_prefix


@pytest.fixture
async def redis_log() -> AsyncIterator[RedisRoomLog]:
    prefix = new_prefix()
    log = RedisRoomLog(REDIS_URL, prefix)
    try:
        yield log
    finally:
        await log.aclose()
        delete_prefix(prefix)


def token(n: int) -> Event:
    return {"type": "ai.token", "message_id": "m", "delta": f"t{n} "}


async def _appends_keep_order(log: RoomLog) -> None:
    first = await log.append_many("a", [{"type": "x", "n": 0}, {"type": "x", "n": 1}])
    assert [e["seq"] for e in first] == [1, 2]
    assert await log.append_many("a", []) == []

    # many rooms appending at once (one pipeline per turn of the loop on Redis): every room's
    # seqs stay consecutive and in each caller's order
    async def writer(room: str) -> list[int]:
        seqs = []
        for i in range(20):
            batch = await log.append_many(room, [{"type": "x", "n": 2 * i}, {"type": "x"}])
            seqs += [e["seq"] for e in batch]
        return seqs

    results = await asyncio.gather(*(writer(f"r{k}") for k in range(50)))
    assert all(seqs == list(range(1, 41)) for seqs in results)
    logged = await log.since("r7", 0)
    assert [e["seq"] for e in logged] == list(range(1, 41))
    assert [e["n"] for e in logged[::2]] == list(range(0, 40, 2))
    assert await log.last_seq("r7") == 40


async def test_append_many_local() -> None:
    await _appends_keep_order(LocalRoomLog())


async def test_append_many_redis(redis_log: RedisRoomLog) -> None:
    await _appends_keep_order(redis_log)


async def test_a_script_redis_does_not_know_yet_is_loaded(redis_log: RedisRoomLog) -> None:
    # a script no Redis has seen: EVALSHA fails with NOSCRIPT, the batch loads it and retries
    fresh = _Batcher(REDIS_URL, _APPEND + f"\n-- {uuid.uuid4().hex}\n")
    keys = list(redis_log._keys("fresh"))
    firsts = await asyncio.gather(
        *(fresh.run(keys, ['{"type":"x"}', 100, 60, redis_log.channel, "fresh"]) for _ in range(3))
    )
    assert sorted(firsts) == [0, 1, 2]  # each call's `first`: seqs 1, 2, 3, once each
    assert await redis_log.last_seq("fresh") == 3
    await fresh.aclose()


async def test_appends_reconnect_after_the_connection_drops(redis_log: RedisRoomLog) -> None:
    await redis_log.append("drop", {"type": "x", "n": 0})
    writer = redis_log._batch._pipe._writer
    assert writer is not None
    writer.transport.abort()  # what a Redis restart or a network cut does to it
    await asyncio.sleep(0.05)
    await redis_log.append("drop", {"type": "x", "n": 1})  # a new connection, nothing lost
    assert [e["n"] for e in await redis_log.since("drop", 0)] == [0, 1]


async def test_an_error_reply_reaches_the_caller(redis_log: RedisRoomLog) -> None:
    # the room's seq key holding something that is not a number: INCRBY fails in the script
    await redis_log._redis.set(redis_log._keys("broken")[1], "not a number")
    with pytest.raises(MemoryUnavailable, match="not an integer"):
        await redis_log.append("broken", {"type": "x"})
    await redis_log.append("fine", {"type": "x"})  # the connection still serves


async def test_a_redis_that_stops_answering_fails_the_appends_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen Redis (SIGSTOP: the connection stays up, nothing comes back): the appends on
    their way fail with MemoryUnavailable after PIPE_TIMEOUT_S instead of waiting forever, and
    once Redis answers again the next append gets a new connection."""
    monkeypatch.setattr(log_module, "PIPE_TIMEOUT_S", 0.5)
    server = RedisServer(tmp_path)
    server.start()
    room_log = RedisRoomLog(server.url, "frozen:")
    try:
        await room_log.append("r", {"type": "x", "n": 0})
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(room_log.append("r", {"type": "x", "n": n}) for n in (1, 2, 3)),
                    return_exceptions=True,
                ),
                10,
            )
            waited = time.monotonic() - t0
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert all(isinstance(r, MemoryUnavailable) for r in results), results
        assert "no reply from Redis" in str(results[0])
        assert 0.5 <= waited < 5
        await room_log.append("r", {"type": "x", "n": 4})
        # what the frozen server had read meanwhile it may still have run: 4 comes last
        assert [e["n"] for e in await room_log.since("r", 0)][-1] == 4
    finally:
        await room_log.aclose()
        server.stop()


class SlowLog(LocalRoomLog):
    """Each append takes ``delay`` seconds; records the batches it was given."""

    def __init__(self, delay: float = 0.05, fail: bool = False) -> None:
        super().__init__()
        self.delay = delay
        self.fail = fail
        self.batches: list[list[str]] = []

    async def append_many(self, room: str, events: Sequence[Event]) -> list[Event]:
        self.batches.append([e["type"] for e in events])
        await asyncio.sleep(self.delay)
        if self.fail:
            raise MemoryUnavailable("Redis is not reachable for room events (test)")
        return await super().append_many(room, events)


async def test_tokens_of_a_burst_keep_their_own_events() -> None:
    log = SlowLog()
    writer = ReplyWriter(log, "r")
    writer.put({"type": "ai.start", "message_id": "m"})
    for n in range(3):
        writer.put(token(n))
    writer.put({"type": "ai.done", "message_id": "m"})
    await writer.close()
    # nothing was on its way when they came: one batch, every token its own event
    assert log.batches == [["ai.start", "ai.token", "ai.token", "ai.token", "ai.done"]]
    assert writer.tokens == 3


async def test_tokens_coming_while_a_token_is_on_its_way_merge() -> None:
    log = SlowLog(delay=0.05)
    writer = ReplyWriter(log, "r")
    writer.put(token(0))
    await asyncio.sleep(0.01)  # t0 is on its way to Redis
    for n in range(1, 6):
        writer.put(token(n))
        await asyncio.sleep(0.001)
    writer.put({"type": "ai.done", "message_id": "m"})
    await writer.close()
    assert log.batches == [["ai.token"], ["ai.token", "ai.done"]]
    logged = await log.since("r", 0)
    assert [e["delta"] for e in logged if e["type"] == "ai.token"] == ["t0 ", "t1 t2 t3 t4 t5 "]
    assert [e["seq"] for e in logged] == [1, 2, 3]
    assert writer.tokens == 6


async def test_a_failed_append_reaches_the_reply() -> None:
    log = SlowLog(delay=0.01, fail=True)
    writer = ReplyWriter(log, "r")
    writer.put(token(0))
    await asyncio.sleep(0.05)
    with pytest.raises(MemoryUnavailable):
        writer.put(token(1))
    with pytest.raises(MemoryUnavailable):
        await writer.close()
    assert writer.tokens == 0
    await writer.abort()


async def test_a_writer_over_redis_logs_every_token_in_order(redis_log: RedisRoomLog) -> None:
    """The writer against the real log (no task of its own: each append starts from a
    callback): a paced answer and a burst, with replies from Redis coming between the tokens,
    end up in the log whole and in order, each token once."""
    writer = ReplyWriter(redis_log, "w")
    writer.put({"type": "ai.start", "message_id": "m"})
    for n in range(30):
        writer.put(token(n))
        if n % 3 == 0:
            await asyncio.sleep(0.002)  # a reply from Redis may come in between
    writer.put({"type": "ai.done", "message_id": "m"})
    await writer.close()
    logged = await redis_log.since("w", 0)
    assert logged[0]["type"] == "ai.start" and logged[-1]["type"] == "ai.done"
    deltas = "".join(e["delta"] for e in logged if e["type"] == "ai.token")
    assert deltas == "".join(f"t{n} " for n in range(30))
    assert [e["seq"] for e in logged] == list(range(1, len(logged) + 1))
    assert writer.tokens == 30


async def test_abort_drops_what_has_not_gone_out() -> None:
    log = SlowLog(delay=0.05)
    writer = ReplyWriter(log, "r")
    writer.put(token(0))
    await asyncio.sleep(0.01)  # t0 is on its way
    writer.put(token(1))  # waits for t0's reply
    await writer.abort()
    await writer.close()  # nothing left to wait for, no error
    await asyncio.sleep(0.1)
    assert log.batches == [["ai.token"]]  # t1 never went out
    writer.put(token(2))  # after abort: taken, never sent
    await asyncio.sleep(0.1)
    assert log.batches == [["ai.token"]]


async def test_an_append_that_cannot_start_reaches_the_reply(redis_log: RedisRoomLog) -> None:
    """An event the log cannot even encode fails the reply (next put or close) instead of
    vanishing in a callback."""
    writer = ReplyWriter(redis_log, "bad")
    writer.put({"type": "ai.token", "message_id": "m", "delta": object()})
    with pytest.raises(TypeError):
        await writer.close()
    with pytest.raises(TypeError):
        writer.put(token(1))
    assert await redis_log.since("bad", 0) == []
