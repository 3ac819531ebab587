"""Per-user limits on real Redis (shared by two instances) and in-process, the same contract."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from rag_chat.errors import RateLimited, TooManyConnections, TooManyReplies
from rag_chat.limits import Limits, LimitStore, LocalLimitStore, RedisLimitStore
from tests.conftest import TEST_REDIS_DB

REDIS_URL = f"redis://127.0.0.1:6379/{TEST_REDIS_DB}"


@pytest.fixture(params=["redis", "local"])
async def stores(
    request: pytest.FixtureRequest, redis_prefix: str
) -> AsyncIterator[Callable[[], LimitStore]]:
    """Makes stores that share one state: two Redis clients (two instances), or one local."""
    made: list[LimitStore] = []
    local = LocalLimitStore()

    def make() -> LimitStore:
        store: LimitStore = (
            RedisLimitStore(REDIS_URL, redis_prefix) if request.param == "redis" else local
        )
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


async def test_messages_over_the_window_are_refused_with_retry_after(
    stores: Callable[[], LimitStore],
) -> None:
    a = Limits(stores(), messages_per_minute=3, window_s=1.0)
    b = Limits(stores(), messages_per_minute=3, window_s=1.0)  # another instance
    await a.message("user:alice")
    await b.message("user:alice")
    await a.message("user:alice")
    with pytest.raises(RateLimited) as info:
        await b.message("user:alice")  # the 4th in the window, counted across instances
    assert 0 < info.value.retry_after <= 1.0
    assert info.value.code == "rate_limited" and "at most 3" in str(info.value)
    await a.message("user:bob")  # someone else's budget is untouched
    await asyncio.sleep(info.value.retry_after + 0.05)
    await b.message("user:alice")  # after retry_after it works again
    assert a.hits + b.hits == 1


async def test_zero_means_no_rate_limit(stores: Callable[[], LimitStore]) -> None:
    limits = Limits(stores(), messages_per_minute=0)
    for _ in range(100):
        await limits.message("user:alice")


async def test_connection_and_reply_leases_are_capped_and_released(
    stores: Callable[[], LimitStore],
) -> None:
    a = Limits(stores(), max_connections=2, max_replies=1)
    b = Limits(stores(), max_connections=2, max_replies=1)
    await a.connect("user:alice", "c1")
    await b.connect("user:alice", "c2")
    await a.connect("user:alice", "c1")  # the same lease again is not a new one
    with pytest.raises(TooManyConnections):
        await b.connect("user:alice", "c3")
    await a.disconnect("user:alice", "c1")
    await b.connect("user:alice", "c3")

    await a.reply_started("user:alice", "r1")
    with pytest.raises(TooManyReplies) as info:
        await b.reply_started("user:alice", "r2")
    assert info.value.code == "too_many_replies" and info.value.status == 429
    await a.reply_finished("user:alice", "r1")
    await b.reply_started("user:alice", "r2")
    assert a.held == {}  # everything a released is gone from its refresh list
    assert b.held == {"conn:user:alice": {"c2", "c3"}, "reply:user:alice": {"r2"}}


async def test_a_question_is_counted_and_takes_its_answers_lease_in_one_call(
    stores: Callable[[], LimitStore],
) -> None:
    """``ask`` = ``message`` + ``reply_started`` (one Lua script on Redis): both limits hold,
    across instances, and a message over the window takes no lease."""
    a = Limits(stores(), messages_per_minute=3, max_replies=1, window_s=1.0)
    b = Limits(stores(), messages_per_minute=3, max_replies=1, window_s=1.0)
    await a.ask("user:alice", "r1")
    with pytest.raises(TooManyReplies):
        await b.ask("user:alice", "r2")  # counted as a message, but r1 is still answering
    assert b.held == {}
    await a.reply_finished("user:alice", "r1")
    await b.ask("user:alice", "r2")
    assert b.held == {"reply:user:alice": {"r2"}}
    await b.reply_finished("user:alice", "r2")
    with pytest.raises(RateLimited) as info:
        await a.ask("user:alice", "r3")  # the 4th message in the window: r3 takes no lease
    assert type(info.value) is RateLimited and "at most 3" in str(info.value)
    assert a.held == {}
    await b.reply_started("user:alice", "r4")  # r3 holds no slot: the one slot is free
    await a.message("user:bob")  # someone else's budget is untouched
    assert (a.hits, b.hits) == (1, 1)
    assert a.on_hit is None

    unlimited = Limits(stores(), messages_per_minute=0, max_replies=1)
    with pytest.raises(TooManyReplies):
        await unlimited.ask("user:alice", "r5")  # r4's lease still counts


async def test_leases_of_a_dead_instance_expire_and_live_ones_are_refreshed(
    stores: Callable[[], LimitStore],
) -> None:
    dead = Limits(stores(), max_connections=1, lease_ttl_s=0.6)
    await dead.connect("user:alice", "c1")  # this instance "dies": nobody refreshes c1
    live = Limits(stores(), max_connections=1, lease_ttl_s=0.6)
    with pytest.raises(TooManyConnections):
        await live.connect("user:alice", "c2")
    await asyncio.sleep(0.8)
    await live.connect("user:alice", "c2")
    live.start()  # refreshes every ttl/3
    try:
        await asyncio.sleep(1.2)  # twice the ttl: c2 is still held
        with pytest.raises(TooManyConnections):
            await dead.connect("user:alice", "c3")
    finally:
        await live.stop()


async def test_limits_fail_open_when_redis_is_down() -> None:
    store = RedisLimitStore("redis://127.0.0.1:1/0", "test:down:")
    limits = Limits(store, messages_per_minute=1, max_connections=1, max_replies=1)
    try:
        for _ in range(3):
            await limits.message("user:alice")
            await limits.connect("user:alice", "c")
            await limits.reply_started("user:alice", "r")
            await limits.ask("user:alice", "r2")
        await limits.reply_finished("user:alice", "r")
        await limits.disconnect("user:alice", "c")
    finally:
        await limits.aclose()
