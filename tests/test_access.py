"""Who owns which conversation: the Redis store (what instances share) and the in-process one
(the fallback without Redis) keep the same contract."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rag_chat.auth import AccessStore, LocalAccess, RedisAccess
from tests.conftest import TEST_REDIS_DB


@pytest.fixture(params=["redis", "local"])
async def store(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[AccessStore]:
    made: AccessStore = (
        RedisAccess(f"redis://127.0.0.1:6379/{TEST_REDIS_DB}", redis_prefix, 3600)
        if request.param == "redis"
        else LocalAccess()
    )
    yield made
    await made.aclose()


async def test_conversations_are_listed_newest_first_and_renamed_by_their_owner(
    store: AccessStore,
) -> None:
    for i, room in enumerate(("c1", "c2", "c3")):
        assert await store.claim_private(room, "alice", f"question {i}", 100.0 + i)
    assert not await store.claim_private("c1", "bob", "mine?", 200.0)  # alice's
    assert await store.open_room("team") == ("room", "")

    assert await store.rename("c2", "alice", "Ports")
    assert not await store.rename("c2", "bob", "Stolen")  # not bob's
    assert not await store.rename("team", "alice", "Ours")  # a shared room
    assert not await store.rename("nope", "alice", "Nothing")  # no such conversation
    assert await store.claim_private("c2", "alice", "a later question", 300.0)  # keeps "Ports"

    listed = await store.conversations("alice", 10)
    assert [(c["id"], c["title"], c["updated_at"]) for c in listed] == [
        ("c2", "Ports", 300.0),
        ("c3", "question 2", 102.0),
        ("c1", "question 0", 100.0),
    ]
    assert [c["id"] for c in await store.conversations("alice", 2)] == ["c2", "c3"]
    assert await store.conversations("bob", 10) == []
    assert await store.get("team") == ("room", "")


async def test_conversations_page_by_time_and_expired_ones_drop_out(
    store: AccessStore, redis_prefix: str
) -> None:
    for i in range(7):
        assert await store.claim_private(f"c{i}", "alice", f"q{i}", 100.0 + i)
    if isinstance(store, RedisAccess):  # two conversations' own keys expire (TTL passed)
        await store._redis.delete(store._acl("c5"), store._acl("c2"))
        live = ["c6", "c4", "c3", "c1", "c0"]
    else:
        live = ["c6", "c5", "c4", "c3", "c2", "c1", "c0"]

    pages, before = [], None
    while True:
        page = await store.conversations("alice", 2, before)
        if not page:
            break
        pages.append([c["id"] for c in page])
        before = page[-1]["updated_at"]
    assert [room for page in pages for room in page] == live
    assert all(len(page) == 2 for page in pages[:-1])  # expired ones do not make pages short
    assert await store.conversations("alice", 10, 100.0) == []  # before is exclusive
    if isinstance(store, RedisAccess):  # and they are gone from the list for good
        rooms = await store._redis.zrange(store._convs("alice"), 0, -1)
        assert sorted(rooms) == sorted(live)
