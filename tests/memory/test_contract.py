"""The Memory contract, run against every implementation, plus what is specific to each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from rag_chat.errors import BadRequest
from rag_chat.memory import LocalMemory, Memory, RedisMemory, StoredMessage, new_message
from rag_chat.memory.base import BAD_CONVERSATION_ID
from rag_chat.settings import Settings
from tests.memory import TEST_REDIS_URL, drop_prefix, require_shared_redis, unique_prefix

MakeMemory = Callable[..., Memory]
MakeRedis = Callable[..., RedisMemory]


def msg(content: str, role: str = "user", **fields: Any) -> StoredMessage:
    message: dict[str, Any] = {"role": role, "content": content, **fields}
    return message  # type: ignore[return-value]


def contents(messages: list[StoredMessage]) -> list[str]:
    return [m["content"] for m in messages]


@pytest.fixture(params=["redis", "local"])
def kind(request: pytest.FixtureRequest) -> str:
    param: str = request.param
    if param == "redis":
        require_shared_redis()
    return param


@pytest.fixture
def prefix(kind: str) -> Iterator[str]:
    prefix = unique_prefix()
    yield prefix
    if kind == "redis":
        drop_prefix(prefix)


@pytest.fixture
def memory_settings(prefix: str) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None, redis_url=TEST_REDIS_URL, redis_prefix=prefix, memory_max_messages=5
    )


@pytest.fixture
async def make_memory(kind: str, memory_settings: Settings) -> AsyncIterator[MakeMemory]:
    made: list[Memory] = []

    def make(
        max_messages: int = memory_settings.memory_max_messages,
        ttl_seconds: int = memory_settings.memory_ttl_seconds,
    ) -> Memory:
        memory: Memory
        if kind == "redis":
            memory = RedisMemory.from_url(
                memory_settings.redis_url,
                prefix=memory_settings.redis_prefix,
                max_messages=max_messages,
                ttl_seconds=ttl_seconds,
            )
        else:
            memory = LocalMemory(max_messages=max_messages, ttl_seconds=ttl_seconds)
        made.append(memory)
        return memory

    yield make
    for memory in made:
        await memory.aclose()


@pytest.fixture
def memory(make_memory: MakeMemory) -> Memory:
    return make_memory()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    require_shared_redis()
    prefix = unique_prefix()
    yield prefix
    drop_prefix(prefix)


@pytest.fixture
async def make_redis(redis_prefix: str) -> AsyncIterator[Callable[..., RedisMemory]]:
    made: list[RedisMemory] = []

    def make(max_messages: int = 5, ttl_seconds: int = 3600) -> RedisMemory:
        memory = RedisMemory.from_url(
            TEST_REDIS_URL, prefix=redis_prefix, max_messages=max_messages, ttl_seconds=ttl_seconds
        )
        made.append(memory)
        return memory

    yield make
    for memory in made:
        await memory.aclose()


@pytest.fixture
def raw_redis() -> Iterator[redis.Redis]:
    """A plain client on the test DB, for looking behind the store's back."""
    client = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=True)
    yield client
    client.close()


# --- the contract ---------------------------------------------------------------------------


async def test_is_a_memory(memory: Memory, kind: str) -> None:
    assert isinstance(memory, Memory)
    assert memory.kind == {"redis": "redis", "local": "memory"}[kind]
    await memory.ping()


async def test_append_then_history_oldest_first(memory: Memory) -> None:
    await memory.append("c1", msg("q1"), msg("a1", "assistant"))
    await memory.append("c1", msg("q2"))
    history = await memory.history("c1")
    assert contents(history) == ["q1", "a1", "q2"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]


async def test_ids_and_timestamps_assigned_unless_given(memory: Memory) -> None:
    given = new_message("assistant", "hello", finish_reason="stop")
    await memory.append("c1", msg("q"), given, msg("r", id="mine", created_at=12.5))
    first, second, third = await memory.history("c1")
    assert isinstance(first["id"], str) and len(first["id"]) == 32
    assert isinstance(first["created_at"], float) and first["created_at"] > 1.7e9
    assert second == given
    assert (third["id"], third["created_at"]) == ("mine", 12.5)
    assert len({first["id"], second["id"], third["id"]}) == 3


async def test_stored_copies_are_independent(memory: Memory) -> None:
    sources = [{"doc": "a.md"}]
    original = msg("q", sources=sources)
    await memory.append("c1", original)
    assert "id" not in original  # the caller's dict is not modified
    sources.append({"doc": "late"})
    got = (await memory.history("c1"))[0]
    assert got["sources"] == [{"doc": "a.md"}]
    got["content"] = "changed"
    assert contents(await memory.history("c1")) == ["q"]


async def test_replace_puts_a_message_in_anothers_place(memory: Memory) -> None:
    await memory.append("c1", msg("q", id="q"), msg("old", "assistant", id="a1"), msg("later"))
    found = await memory.replace("c1", "a1", msg("new", "assistant", id="a2", reply_to="q"))
    assert found is True
    history = await memory.history("c1")
    assert contents(history) == ["q", "new", "later"]
    assert (history[1]["id"], history[1]["reply_to"]) == ("a2", "q")
    assert "created_at" in history[1]
    # the one it names is gone: appended instead, like append()
    assert await memory.replace("c1", "a1", msg("again", "assistant", id="a3")) is False
    assert contents(await memory.history("c1")) == ["q", "new", "later", "again"]
    # a conversation that expired or never was: it starts with the message
    assert await memory.replace("c2", "x", msg("first", "assistant")) is False
    assert contents(await memory.history("c2")) == ["first"]


async def test_replace_keeps_the_cap(make_memory: MakeMemory) -> None:
    memory = make_memory(max_messages=3)
    await memory.append("c1", msg("1", id="m1"), msg("2", id="m2"), msg("3", id="m3"))
    assert await memory.replace("c1", "m2", msg("two", id="n2")) is True
    assert contents(await memory.history("c1")) == ["1", "two", "3"]
    assert await memory.replace("c1", "gone", msg("4", id="m4")) is False
    assert contents(await memory.history("c1")) == ["two", "3", "4"]


async def test_update_changes_a_message_in_place(memory: Memory) -> None:
    await memory.append("c1", msg("q", id="q"), msg("a", "assistant", id="a1"), msg("later"))
    got = await memory.update("c1", "a1", lambda m: {**m, "feedback": {"alice": "up"}})
    assert got is not None and got["feedback"] == {"alice": "up"} and got["content"] == "a"
    history = await memory.history("c1")
    assert contents(history) == ["q", "a", "later"]
    assert history[1] == got
    assert await memory.update("c1", "nope", lambda m: m) is None
    assert await memory.update("c2", "a1", lambda m: m) is None


async def test_update_refused_by_its_change_writes_nothing(memory: Memory) -> None:
    await memory.append("c1", msg("q", id="q"))
    before = await memory.history("c1")

    def refuse(message: StoredMessage) -> StoredMessage:
        raise ValueError("not an answer")

    with pytest.raises(ValueError, match="not an answer"):
        await memory.update("c1", "q", refuse)
    assert await memory.history("c1") == before


async def test_concurrent_updates_of_one_message_all_land(memory: Memory) -> None:
    await memory.append("c1", msg("a", "assistant", id="a1"))

    def add(name: str) -> Callable[[StoredMessage], StoredMessage]:
        def change(message: StoredMessage) -> StoredMessage:
            return {**message, "feedback": {**message.get("feedback", {}), name: "up"}}

        return change

    names = [f"user{i}" for i in range(4)]
    await asyncio.gather(*(memory.update("c1", "a1", add(n)) for n in names))
    (stored,) = await memory.history("c1")
    assert sorted(stored["feedback"]) == names


async def test_history_limit_is_the_last_n(memory: Memory) -> None:
    await memory.append("c1", msg("1"), msg("2"), msg("3"), msg("4"))
    assert contents(await memory.history("c1", limit=2)) == ["3", "4"]
    assert contents(await memory.history("c1", limit=1)) == ["4"]
    assert contents(await memory.history("c1", limit=4)) == ["1", "2", "3", "4"]
    assert contents(await memory.history("c1", limit=50)) == ["1", "2", "3", "4"]
    assert await memory.history("c1", limit=0) == []
    assert await memory.history("unknown", limit=3) == []


@pytest.mark.parametrize("limit", [-1, True, 2.0])
async def test_bad_limit_rejected(memory: Memory, limit: Any) -> None:
    with pytest.raises(BadRequest, match="limit"):
        await memory.history("c1", limit=limit)


async def test_unknown_conversation_is_empty(memory: Memory) -> None:
    assert await memory.history("never-written") == []


async def test_cap_keeps_the_newest(memory: Memory) -> None:
    # max_messages=5 in the test settings
    await memory.append("c1", msg("1"), msg("2"))
    await memory.append("c1", msg("3"), msg("4"))
    await memory.append("c1", msg("5"), msg("6"), msg("7"))
    assert contents(await memory.history("c1")) == ["3", "4", "5", "6", "7"]
    await memory.append("c2", *(msg(str(i)) for i in range(8)))  # one batch over the cap
    assert contents(await memory.history("c2")) == ["3", "4", "5", "6", "7"]


async def test_conversations_are_independent(memory: Memory) -> None:
    await memory.append("a", msg("for a"))
    await memory.append("b", msg("for b"))
    assert contents(await memory.history("a")) == ["for a"]
    assert await memory.delete("a") is True
    assert contents(await memory.history("b")) == ["for b"]


async def test_delete_reports_whether_it_existed(memory: Memory) -> None:
    await memory.append("c1", msg("q"))
    assert await memory.delete("c1") is True
    assert await memory.history("c1") == []
    assert await memory.delete("c1") is False
    assert await memory.delete("never-written") is False
    await memory.append("c1", msg("again"))  # a deleted conversation can start over
    assert contents(await memory.history("c1")) == ["again"]


async def test_unicode_and_sources_round_trip(memory: Memory) -> None:
    answer = msg(
        "Ünïcödé — 中文, emoji 🚀, RTL שלום, NUL \x00, quotes \"'\\ and\nnewlines",
        "assistant",
        sources=[
            {"id": "doc.md#3", "title": "Çà et là", "score": 0.8125, "page": None, "tags": []},
            {"id": "b", "nested": {"list": [1, 2.5, True, None], "text": "✓"}},
        ],
        query="rewritten 🔎 query",
        finish_reason="stop",
    )
    await memory.append("c1", answer)
    (got,) = await memory.history("c1")
    assert {k: v for k, v in got.items() if k not in ("id", "created_at")} == answer


async def test_empty_append_is_a_no_op(memory: Memory) -> None:
    await memory.append("c1")
    assert await memory.delete("c1") is False


async def test_unserialisable_batch_lands_not_at_all(memory: Memory) -> None:
    with pytest.raises(TypeError):
        await memory.append("c1", msg("fine"), msg("bad", sources=[{"x": object()}]))
    assert await memory.history("c1") == []


@pytest.mark.parametrize(
    "conversation_id",
    ["", "x" * 129, "has space", "slash/no", "ünï", "new\nline", "trailing\n", "*", "a?b", 42],
)
async def test_invalid_conversation_ids_rejected(memory: Memory, conversation_id: Any) -> None:
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: memory.append(conversation_id, msg("q")),
        lambda: memory.history(conversation_id),
        lambda: memory.delete(conversation_id),
    ]
    for call in calls:
        with pytest.raises(BadRequest) as info:
            await call()
        assert str(info.value) == BAD_CONVERSATION_ID


@pytest.mark.parametrize("conversation_id", ["x" * 128, "A-z_0.9:b", "1", "user:42:chat-7.a_b"])
async def test_valid_conversation_ids_accepted(memory: Memory, conversation_id: str) -> None:
    await memory.append(conversation_id, msg("q"))
    assert contents(await memory.history(conversation_id)) == ["q"]
    assert await memory.delete(conversation_id) is True


async def test_concurrent_appends_all_land_whole(make_memory: MakeMemory) -> None:
    memory = make_memory(max_messages=1000)
    tasks = 60

    async def turn(i: int) -> None:
        await memory.append("busy", msg(f"q{i}"), msg(f"a{i}", "assistant"))

    await asyncio.gather(*(turn(i) for i in range(tasks)))
    history = contents(await memory.history("busy"))
    assert len(history) == 2 * tasks
    # each batch is atomic: every question is directly followed by its own answer
    pairs = list(zip(history[::2], history[1::2], strict=True))
    assert all(q[1:] == a[1:] for q, a in pairs)
    assert sorted(int(q[1:]) for q, _ in pairs) == list(range(tasks))


async def test_aclose_is_idempotent(make_memory: MakeMemory) -> None:
    memory = make_memory()
    await memory.append("c1", msg("q"))
    await memory.aclose()
    await memory.aclose()


# --- Redis specifics ------------------------------------------------------------------------


async def test_redis_key_layout_and_ttl(
    make_redis: MakeRedis, raw_redis: redis.Redis, redis_prefix: str
) -> None:
    memory = make_redis(ttl_seconds=3600)
    await memory.append("c1", msg("q"), msg("a", "assistant"))
    key = f"{redis_prefix}conv:c1"
    assert raw_redis.type(key) == "list"
    assert raw_redis.llen(key) == 2
    pttl = raw_redis.pttl(key)
    assert isinstance(pttl, int) and 0 < pttl <= 3600 * 1000

    raw_redis.pexpire(key, 10_000)
    await memory.append("c1", msg("q2"))  # each append restarts the expiry
    pttl = raw_redis.pttl(key)
    assert isinstance(pttl, int) and 3_000_000 < pttl <= 3600 * 1000

    await memory.history("c1")
    raw_redis.pexpire(key, 10_000)
    await memory.history("c1")  # reading does not
    pttl = raw_redis.pttl(key)
    assert isinstance(pttl, int) and pttl <= 10_000


async def test_redis_expired_conversation_is_gone(
    make_redis: MakeRedis, raw_redis: redis.Redis, redis_prefix: str
) -> None:
    memory = make_redis()
    await memory.append("c1", msg("q"))
    raw_redis.pexpire(f"{redis_prefix}conv:c1", 1)
    await asyncio.sleep(0.05)
    assert await memory.history("c1") == []
    assert await memory.delete("c1") is False


async def test_redis_skips_foreign_entries(
    make_redis: MakeRedis,
    raw_redis: redis.Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    memory = make_redis()
    await memory.append("c1", msg("q"))
    raw_redis.rpush(f"{redis_prefix}conv:c1", "not json", "[1, 2]")
    await memory.append("c1", msg("a", "assistant", id="a1"))
    assert contents(await memory.history("c1")) == ["q", "a"]
    assert "not a JSON object" in caplog.text
    # replace() reads past them (its script decodes what it can)
    raw_redis.rpush(f"{redis_prefix}conv:c1", "{broken")
    assert await memory.replace("c1", "a1", msg("b", "assistant", id="a2")) is True
    assert contents(await memory.history("c1")) == ["q", "b"]
    assert raw_redis.llen(f"{redis_prefix}conv:c1") == 5


async def test_redis_prefix_separates_instances(make_redis: MakeRedis) -> None:
    mine = make_redis()
    other_prefix = unique_prefix()
    other = RedisMemory.from_url(TEST_REDIS_URL, prefix=other_prefix)
    try:
        await mine.append("c1", msg("mine"))
        assert await other.history("c1") == []
    finally:
        await other.aclose()
        drop_prefix(other_prefix)


# --- LocalMemory specifics ------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_local_expiry_is_refreshed_by_append() -> None:
    clock = FakeClock()
    memory = LocalMemory(max_messages=5, ttl_seconds=10, clock=clock)
    await memory.append("c1", msg("q"))
    clock.now += 9.9
    assert contents(await memory.history("c1")) == ["q"]  # reading does not refresh...
    await memory.append("c1", msg("q2"))  # ...appending does
    clock.now += 9.9
    assert contents(await memory.history("c1")) == ["q", "q2"]
    clock.now += 0.1
    assert await memory.history("c1") == []
    assert await memory.delete("c1") is False
    await memory.append("c1", msg("fresh"))  # an expired conversation starts over
    assert contents(await memory.history("c1")) == ["fresh"]


async def test_local_sweep_frees_expired_conversations() -> None:
    clock = FakeClock()
    memory = LocalMemory(max_messages=5, ttl_seconds=10, clock=clock)
    for i in range(20):
        await memory.append(f"old{i}", msg("q"))
    clock.now += 3600  # past the expiry and the sweep interval
    await memory.append("new", msg("q"))
    assert list(memory._conversations) == ["new"]


def test_local_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        LocalMemory(max_messages=0)
    with pytest.raises(ValueError):
        LocalMemory(ttl_seconds=0)
