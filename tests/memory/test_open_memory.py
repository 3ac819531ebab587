"""open_memory: Redis when it answers; without it, fall back only if Redis was not asked for."""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Iterator

import pytest

from rag_chat.errors import MemoryUnavailable
from rag_chat.memory import LocalMemory, RedisMemory, open_memory
from rag_chat.memory.redis import PING_TIMEOUT_S
from rag_chat.settings import Settings
from tests.memory import TEST_REDIS_URL, drop_prefix, free_port, require_shared_redis, unique_prefix

# how far past the probe's own deadline a refusal may take, on a loaded machine
SLACK_S = 1.5


def settings(**fields: object) -> Settings:
    return Settings(_env_file=None, memory_max_messages=5, **fields)  # type: ignore[call-arg,arg-type]


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    # an RAG_REDIS_URL in the environment would make every URL here "explicit"
    monkeypatch.delenv("RAG_REDIS_URL", raising=False)


@pytest.fixture
def prefix() -> Iterator[str]:
    require_shared_redis()
    prefix = unique_prefix()
    yield prefix
    drop_prefix(prefix)


@pytest.fixture
def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A port that accepts connections (the kernel completes them) but never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"


def refusal(url: str) -> str:
    return rf"^Redis at {re.escape(url)} is not reachable \(.+\); start Redis or fix RAG_REDIS_URL$"


async def test_default_url_down_falls_back_loudly(
    dead_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings()
    assert "redis_url" not in s.model_fields_set
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rag_chat.memory"):
        memory = await open_memory(s, default_url=dead_url)
    assert time.monotonic() - started < PING_TIMEOUT_S + SLACK_S
    assert isinstance(memory, LocalMemory) and memory.kind == "memory"
    assert memory.max_messages == 5

    (record,) = [r for r in caplog.records if r.name == "rag_chat.memory"]
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert dead_url in text
    assert "will not survive a restart" in text
    assert "shared between server instances" in text
    assert "start Redis" in text and "RAG_REDIS_URL" in text

    await memory.append("c1", {"role": "user", "content": "still works"})
    assert [m["content"] for m in await memory.history("c1")] == ["still works"]
    await memory.aclose()


async def test_explicit_url_down_refuses_to_start(dead_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(MemoryUnavailable, match=refusal(dead_url)) as info:
        await open_memory(settings(redis_url=dead_url))
    assert time.monotonic() - started < PING_TIMEOUT_S + SLACK_S
    assert "\n" not in str(info.value)
    assert info.value.code == "memory_unavailable"


async def test_url_from_environment_is_explicit(
    dead_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAG_REDIS_URL", dead_url)
    s = settings()
    assert "redis_url" in s.model_fields_set
    # default_url only stands in for a URL nobody set, so a live one here changes nothing
    with pytest.raises(MemoryUnavailable, match=refusal(dead_url)):
        await open_memory(s, default_url=TEST_REDIS_URL)


async def test_silent_server_gives_up_fast(silent_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(MemoryUnavailable, match=refusal(silent_url)):
        await open_memory(settings(redis_url=silent_url))
    assert time.monotonic() - started < PING_TIMEOUT_S + SLACK_S


async def test_password_is_not_shown() -> None:
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0?password=s3cret"
    with pytest.raises(MemoryUnavailable) as info:
        await open_memory(settings(redis_url=url))
    assert "s3cret" not in str(info.value)
    assert "user:***@127.0.0.1" in str(info.value)


async def test_malformed_explicit_url_is_refused() -> None:
    with pytest.raises(MemoryUnavailable, match=r"not valid .*fix RAG_REDIS_URL$"):
        await open_memory(settings(redis_url="http://127.0.0.1:6379"))


async def test_explicit_url_up_gives_redis(prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    memory = await open_memory(settings(redis_url=TEST_REDIS_URL, redis_prefix=prefix))
    try:
        assert isinstance(memory, RedisMemory) and memory.kind == "redis"
        assert memory.prefix == prefix and memory.max_messages == 5
        await memory.ping()
    finally:
        await memory.aclose()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_default_url_up_gives_redis(prefix: str) -> None:
    memory = await open_memory(settings(redis_prefix=prefix), default_url=TEST_REDIS_URL)
    try:
        assert isinstance(memory, RedisMemory)
    finally:
        await memory.aclose()


async def test_server_restart_loses_no_conversation(prefix: str) -> None:
    before = await open_memory(settings(redis_url=TEST_REDIS_URL, redis_prefix=prefix))
    await before.append("c1", {"role": "user", "content": "remember me"})
    await before.append(
        "c1", {"role": "assistant", "content": "I will", "sources": [{"id": "a#1"}]}
    )
    written = await before.history("c1")
    await before.aclose()

    after = await open_memory(settings(redis_url=TEST_REDIS_URL, redis_prefix=prefix))
    try:
        assert await after.history("c1") == written
        assert [m["content"] for m in written] == ["remember me", "I will"]
    finally:
        await after.aclose()
