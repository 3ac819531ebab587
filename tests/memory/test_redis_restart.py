"""A Redis that dies fails calls fast and clearly; once it is back, the same store works again.

Staged on a private ``redis-server`` (keeps nothing on disk), never on the shared one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from rag_chat.errors import MemoryUnavailable
from rag_chat.memory import RedisMemory, StoredMessage
from tests.memory import RedisServer

# "does not hang": well under a request timeout, yet past the retries' backoff (~1.4 s)
OUTAGE_ANSWER_WITHIN_S = 5.0


def msg(content: str) -> StoredMessage:
    return {"role": "user", "content": content}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def memory(server: RedisServer) -> AsyncIterator[RedisMemory]:
    memory = RedisMemory.from_url(server.url, prefix="test:restart:", max_messages=50)
    yield memory
    await memory.aclose()


async def test_outage_fails_fast_then_recovers(server: RedisServer, memory: RedisMemory) -> None:
    await memory.append("c1", msg("before"))
    assert [m["content"] for m in await memory.history("c1")] == ["before"]

    server.kill()
    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("append", lambda: memory.append("c1", msg("during"))),
        ("history", lambda: memory.history("c1")),
        ("delete", lambda: memory.delete("c1")),
        ("ping", memory.ping),
    ]
    for name, call in calls:
        started = time.monotonic()
        with pytest.raises(MemoryUnavailable) as info:
            await call()
        elapsed = time.monotonic() - started
        assert elapsed < OUTAGE_ANSWER_WITHIN_S, f"{name} took {elapsed:.1f} s"
        message = str(info.value)
        assert message.startswith(f"Redis at {server.url} is not reachable (")
        assert "\n" not in message

    server.start()  # same port; this server kept nothing on disk, so "before" is gone
    await memory.ping()
    await memory.append("c1", msg("after"))
    assert [m["content"] for m in await memory.history("c1")] == ["after"]


async def test_restart_between_calls_goes_unnoticed(
    server: RedisServer, memory: RedisMemory
) -> None:
    await memory.append("c1", msg("one"))
    # the pooled connection is now dead; the retry replaces it without the caller noticing
    server.kill()
    server.start()
    await memory.append("c1", msg("two"))
    assert [m["content"] for m in await memory.history("c1")] == ["two"]
