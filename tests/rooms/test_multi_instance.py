"""Rooms across real server processes: two ``python -m rag_chat`` instances (A and B) share one
Redis and one data dir; the AI is the synthetic token server, so every answer is known in
advance. Members on different instances see one room: presence, typing, messages, AI streams,
cancels and edits, in one order; a dropped connection or a killed instance is cleaned up."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from rag_chat.rooms.presence import RedisPresence
from rag_chat.testing.token_server import token_text
from tests.conftest import run_cli
from tests.rooms.conftest import (
    PRESENCE_TTL_S,
    REDIS_URL,
    TOKENS,
    TYPING_TTL_S,
    Client,
    Cluster,
    Event,
    TokenServer,
    base_env,
    delete_prefix,
    free_port,
    new_prefix,
    new_room,
    room_events,
    server_env,
    spawn,
    spawn_servers,
    wait_ready,
)

QUESTION = "How do I ingest PDF files?"


def reply_events(client: Client, message_id: str, timeout: float = 30.0) -> list[Event]:
    """Every event of one AI reply as ``client`` received it, up to its ``ai.done``."""
    client.until("ai.done", timeout=timeout, message_id=message_id)
    return [e for e in client.events if e.get("message_id") == message_id]


def expected_answer(token: TokenServer) -> tuple[str, str]:
    """The text and finish reason of the token server's latest answer: its default length,
    cut at the max_tokens the server asked for."""
    record = token.stats(recent=1)["recent"][0]
    limit = record["max_tokens"]
    n = TOKENS if limit is None else min(TOKENS, limit)
    return token_text(n), ("length" if limit is not None and limit < TOKENS else "stop")


def test_members_on_two_instances_see_one_room(cluster: Cluster) -> None:
    room = new_room("fanout")
    with Client(cluster.a, "alice") as alice, Client(cluster.b, "bob") as bob:
        alice.join(room, "alice")
        # bob, on the other instance, asks for the room's whole log: alice's join is in it
        joined = bob.join(room, "bob", last_seq=0)
        assert [m["user"] for m in joined["members"]] == ["alice", "bob"]
        bob.until("presence", user="alice", action="join")
        alice.until("presence", user="bob", action="join")

        # typing, both ways
        alice.send(type="typing", room=room, state="start")
        assert bob.until("typing", user="alice", state="start")["ttl_ms"] == TYPING_TTL_S * 1000
        alice.send(type="typing", room=room, state="stop")
        bob.until("typing", user="alice", state="stop")
        since = alice.mark()
        bob.send(type="typing", room=room, state="start")
        start = alice.until("typing", since=since, user="bob", state="start")
        # bob goes quiet: his indicator stops on its own after the typing TTL
        stop = alice.until("typing", since=since, user="bob", state="stop", timeout=10)
        assert TYPING_TTL_S - 0.5 <= stop["_t"] - start["_t"] <= TYPING_TTL_S + 2

        # messages, both ways
        alice.send(type="message", room=room, text="hello from A", client_id="a-1")
        got = bob.until("message", user="alice")
        assert (got["text"], got["ai"], got["client_id"]) == ("hello from A", False, "a-1")
        bob.send(type="message", room=room, text="hi from B")
        assert alice.until("message", user="bob")["text"] == "hi from B"

        # bob asks the AI through B; both members get the whole stream
        bob.send(type="message", room=room, text=QUESTION, ai=True)
        asked = alice.until("message", user="bob", text=QUESTION)
        assert asked["ai"] is True
        start = alice.until("ai.start", reply_to=asked["id"])
        seen = {c.name: reply_events(c, start["message_id"]) for c in (alice, bob)}
        text, finish = expected_answer(cluster.token)
        for name, events in seen.items():
            types = [e["type"] for e in events]
            assert types == ["ai.start", "ai.sources"] + ["ai.token"] * (len(types) - 3) + [
                "ai.done"
            ], name
            assert "".join(e["delta"] for e in events if e["type"] == "ai.token") == text, name
            done = events[-1]
            assert done["finish_reason"] == finish and done["usage"]["completion_tokens"] == TOKENS
            chunks = events[1]["chunks"]
            assert chunks and any(c["source"].endswith("ingesting.md") for c in chunks), chunks
            assert all(e["user"] == "ai" and e["reply_to"] == asked["id"] for e in events)
        # the same events, with the same seqs, on both instances
        assert [(e["seq"], e["type"]) for e in seen["alice"]] == [
            (e["seq"], e["type"]) for e in seen["bob"]
        ]


def test_concurrent_posts_on_both_instances_arrive_in_one_order(cluster: Cluster) -> None:
    room = new_room("order")
    per_client = 20
    names = ["c0", "c1", "c2", "c3"]
    clients = [Client(cluster.servers()[i % 2], name) for i, name in enumerate(names)]
    try:
        joined = {}
        for client in clients:
            joined[client.name] = client.join(room, client.name)["last_seq"]
        # everyone has seen the last join: the posts start after that seq, for everyone
        last_join = [c.until("presence", user=names[-1], action="join")["seq"] for c in clients]
        assert len(set(last_join)) == 1
        base = last_join[0]
        total = per_client * len(clients)
        go = threading.Barrier(len(clients))
        failures: list[BaseException] = []

        def run(client: Client) -> None:
            try:
                go.wait(timeout=10)
                for i in range(per_client):
                    client.send(
                        type="message",
                        room=room,
                        text=f"{client.name} #{i}",
                        client_id=f"{client.name}-{i}",
                    )

                def all_in(_: Event) -> bool:
                    return sum(e.get("type") == "message" for e in client.events) >= total

                client.wait(all_in, timeout=60, since=0, what=f"{total} messages")
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert not failures, failures

        views = {}
        for client in clients:
            events = room_events(client.events, room)
            seqs = [e["seq"] for e in events]
            # from its own join on: every seq once, no gap
            assert seqs == list(range(joined[client.name] + 1, seqs[-1] + 1)), client.name
            views[client.name] = [
                (e["seq"], e["type"], e.get("id") or e.get("user"))
                for e in events
                if e["seq"] > base
            ]
        reference = views[names[0]]
        for name in names[1:]:
            assert views[name] == reference, name
        assert [s for s, _, _ in reference] == list(range(base + 1, base + total + 1))
        assert all(kind == "message" for _, kind, _ in reference)
        # and each sender's messages in the order it sent them
        messages = [e for e in room_events(clients[0].events, room) if e["type"] == "message"]
        for name in names:
            mine = [e["client_id"] for e in messages if e["user"] == name]
            assert mine == [f"{name}-{i}" for i in range(per_client)], name
    finally:
        for client in clients:
            client.close()


def test_a_member_on_one_instance_cancels_a_reply_running_on_the_other(cluster: Cluster) -> None:
    room = new_room("cancel")
    token = cluster.token
    with Client(cluster.a, "alice") as alice, Client(cluster.b, "bob") as bob:
        alice.join(room, "alice")
        bob.join(room, "bob")
        before = token.wait_idle()
        # alice asks through A: the reply runs on A; a long, slow answer
        alice.send(
            type="message", room=room, text="Explain everything [[tokens=3000 rate=40]]", ai=True
        )
        message_id = bob.until("ai.start", timeout=20)["message_id"]

        def three_tokens(_: Event) -> bool:
            n = sum(e.get("type") == "ai.token" for e in bob.events)
            return n >= 3

        bob.wait(three_tokens, timeout=20, since=0, what="3 tokens")
        assert token.stats()["active"] == 1
        # bob cancels through B, by message_id alone (B knows the room from ai.start)
        bob.send(type="cancel", message_id=message_id)
        for client in (alice, bob):
            events = reply_events(client, message_id, timeout=15)
            types = [e["type"] for e in events]
            assert "ai.cancel" in types, (client.name, types)
            cancel = events[types.index("ai.cancel")]
            assert cancel["user"] == "bob"
            done = events[-1]
            assert done["type"] == "ai.done" and done["finish_reason"] == "cancelled"
            assert types.index("ai.cancel") < len(types) - 1
            assert types.count("ai.done") == 1
        # the token server's stream was closed: stopped early, nothing active
        after = token.wait_idle(10)
        assert after["active"] == 0, after
        assert after["requests"] == before["requests"] + 1
        assert after["cancelled"] == before["cancelled"] + 1
        record = token.stats(recent=1)["recent"][0]
        assert record["planned"] == min(3000, record["max_tokens"]) > 100
        assert record["state"] == "cancelled" and record["sent"] < 100, record
        streamed = [e for e in alice.events if e.get("type") == "ai.token"]
        assert len(streamed) <= record["sent"]
        time.sleep(0.5)
        assert token.stats()["tokens_sent"] == after["tokens_sent"]


def test_an_edit_through_one_instance_answers_again_for_members_on_both(
    cluster: Cluster,
) -> None:
    room = new_room("edit")
    with (
        Client(cluster.a, "alice") as alice,
        Client(cluster.b, "bob") as bob,
        Client(cluster.a, "bob-on-a") as bob_on_a,
    ):
        alice.join(room, "alice")
        bob.join(room, "bob")
        bob_on_a.join(room, "bob")  # the same user, another connection, on the other instance
        # bob asks through B: the answer runs on B
        bob.send(type="message", room=room, text="How do I ingest PDF fils?", ai=True)
        asked = alice.until("message", user="bob")
        first = alice.until("ai.start", reply_to=asked["id"])
        for client in (alice, bob, bob_on_a):
            reply_events(client, first["message_id"])

        # alice, on A, may not edit bob's question
        alice.send(type="edit", room=room, message_id=asked["id"], text="mine now")
        assert alice.until("error", event="edit")["code"] == "forbidden"
        # bob edits it through A: everyone gets the new text, then an answer that runs on A
        # and takes the old one's place
        marks = {c.name: c.mark() for c in (alice, bob)}
        bob_on_a.send(type="edit", room=room, message_id=asked["id"], text=QUESTION)
        for client in (alice, bob):
            edited = client.until("message.edited", since=marks[client.name])
            assert (edited["id"], edited["user"], edited["text"], edited["ai"]) == (
                asked["id"],
                "bob",
                QUESTION,
                True,
            )
            second = client.until("ai.start", since=marks[client.name], reply_to=asked["id"])
            assert second["replaces"] == first["message_id"]
            events = reply_events(client, second["message_id"])
            text, finish = expected_answer(cluster.token)
            assert "".join(e["delta"] for e in events if e["type"] == "ai.token") == text
            assert events[-1]["finish_reason"] == finish
        # both instances serve the history: the new text, and the new answer alone
        for server in (cluster.a, cluster.b):
            r = httpx.get(f"{server.url}/api/conversations/{room}/messages", timeout=10)
            stored = r.json()["messages"]
            assert [(m["role"], m["content"]) for m in stored] == [
                ("user", QUESTION),
                ("assistant", text),
            ]
            assert stored[0]["edited_at"] > 0 and stored[1]["id"] == second["message_id"]


def test_only_members_can_cancel_a_reply(cluster: Cluster) -> None:
    """README: ``cancel`` comes "from any member, on any instance". A connection that has not
    joined the room must neither stop its reply nor write an ``ai.cancel`` into its log."""
    room = new_room("nocancel")
    with (
        Client(cluster.a, "alice") as alice,
        Client(cluster.b, "mallory") as mallory,
    ):
        alice.join(room, "alice")
        alice.send(type="message", room=room, text="Tell me [[tokens=60 rate=100]]", ai=True)
        message_id = alice.until("ai.start")["message_id"]
        alice.until("ai.token", message_id=message_id)
        mallory.send(type="cancel", room=room, message_id=message_id)
        events = reply_events(alice, message_id)
        assert [e["type"] for e in events if e["type"] in ("ai.cancel", "ai.done")] == ["ai.done"]
        assert events[-1]["finish_reason"] == "stop"
        assert mallory.until("error", timeout=5)["code"] == "not_joined"


def test_a_dropped_connection_stops_typing_and_leaves_at_once(cluster: Cluster) -> None:
    room = new_room("drop")
    with Client(cluster.a, "alice") as alice, Client(cluster.b, "carol") as carol:
        alice.join(room, "alice")
        carol.join(room, "carol")
        alice.until("presence", user="carol", action="join")
        carol.send(type="typing", room=room, state="start")
        alice.until("typing", user="carol", state="start")
        dropped = time.monotonic()
        carol.drop()  # no close frame: B notices the dead TCP connection
        stop = alice.until("typing", user="carol", state="stop", timeout=10)
        left = alice.until("presence", user="carol", action="leave", timeout=10)
        # well before the typing TTL would have stopped it: the disconnect did
        assert stop["_t"] - dropped < TYPING_TTL_S * 0.75, stop["_t"] - dropped
        assert left["_t"] - dropped < TYPING_TTL_S * 0.75
        assert stop["seq"] < left["seq"]
        assert left["members"] == [{"user": "alice", "connections": 1}]


def test_a_killed_instance_users_leave_and_its_answer_ends_after_the_ttl(cluster: Cluster) -> None:
    room = new_room("kill")
    spare = cluster.spare
    assert spare.alive(), spare.tail()
    with (
        Client(cluster.a, "alice") as alice,
        Client(cluster.b, "bob") as bob,
        Client(spare, "dave") as dave,
    ):
        alice.join(room, "alice")
        bob.join(room, "bob")
        dave.join(room, "dave")
        for client in (alice, bob):
            client.until("presence", user="dave", action="join")
        # dave asks through C: a long answer streams from C when it dies
        dave.send(type="message", room=room, text="All of it [[tokens=3000 rate=20]]", ai=True)
        streaming = alice.until("ai.start", timeout=20)["message_id"]
        alice.until("ai.token", timeout=20, message_id=streaming)
        killed = time.monotonic()
        spare.kill()  # SIGKILL: C never says goodbye
        dave.drop()
        # its answer does not stay open forever: a live instance ends it in the room's log once
        # its lease lapses (C renewed it every TTL/3), once, for everyone
        for client in (alice, bob):
            end = client.until("error", timeout=15, message_id=streaming)
            assert (end["code"], end["partial"]) == ("internal_error", True)
            assert end["message"] == "the server writing the answer stopped"
            assert end["_t"] - killed <= PRESENCE_TTL_S * 4 / 3 + 2.5
        for client in (alice, bob):
            left = client.until("presence", user="dave", action="leave", timeout=15)
            waited = left["_t"] - killed
            # dave's entry outlives its last refresh (every TTL/3) by the TTL; a live instance's
            # next refresh then notices
            assert PRESENCE_TTL_S * 2 / 3 - 0.5 <= waited <= PRESENCE_TTL_S * 4 / 3 + 2.5, waited
            assert [m["user"] for m in left["members"]] == ["alice", "bob"]
        # a newcomer does not see dave either, and the leave was announced once
        with Client(cluster.b, "erin") as erin:
            members = erin.join(room, "erin")["members"]
            assert [m["user"] for m in members] == ["alice", "bob", "erin"]
        time.sleep(PRESENCE_TTL_S / 3 + 0.5)
        for client in (alice, bob):
            client.recv(0.2)
            leaves = [
                e
                for e in client.events
                if e.get("type") == "presence" and e["action"] == "leave" and e["user"] == "dave"
            ]
            assert len(leaves) == 1, (client.name, leaves)
            ends = [e for e in client.events if e.get("message_id") == streaming]
            assert [e["type"] for e in ends].count("error") == 1, (client.name, ends[-3:])


def test_presence_events_follow_a_user_hopping_between_instances(cluster: Cluster) -> None:
    """A user whose connection moves between A and B (a network switch, a reloaded tab) 30
    times: every ``presence`` event about them must say something new (join and leave
    alternate), and once things settle the room must show them present."""
    room = new_room("hop")
    servers = cluster.servers()
    with Client(cluster.a, "alice") as alice:
        alice.join(room, "alice")
        current = Client(cluster.a, "hopper")
        current.join(room, "hopper")
        try:
            for i in range(30):
                target = servers[(i + 1) % 2]
                if i % 2:  # the new connection first, then the old one drops
                    hop = Client(target, "hopper")
                    hop.join(room, "hopper")
                    current.drop()
                else:  # the old connection drops, then the new one comes
                    current.drop()
                    hop = Client(target, "hopper")
                    hop.join(room, "hopper")
                current = hop
            time.sleep(1.5)  # everything settles
            while alice.recv(0.2) is not None:
                pass
            presence = [e for e in room_events(alice.events, room) if e["type"] == "presence"]
            actions = [e["action"] for e in presence if e["user"] == "hopper"]
            assert actions[-1] == "join", actions
            assert [m["user"] for m in presence[-1]["members"]] == ["alice", "hopper"]
            repeated = [i for i in range(1, len(actions)) if actions[i] == actions[i - 1]]
            assert not repeated, f"the same presence action twice in a row at {repeated}: {actions}"
        finally:
            current.close()


def test_a_dead_instance_users_leave_is_announced_even_if_someone_joins_first(
    cluster: Cluster,
) -> None:
    """Dave's entry was written by an instance that then died (a ``RedisPresence`` of this
    process, never refreshed: exactly what a SIGKILLed instance leaves behind). Erin joins on
    B just after dave's entry expired, before A's next refresh: dave must still be announced
    as gone. (A join, a leave, or the watchdog of an AI reply all read the room's presence.)"""
    room = new_room("ghost")
    dead = RedisPresence(REDIS_URL, cluster.prefix, ttl_s=PRESENCE_TTL_S)

    async def add_dave() -> None:
        try:
            await dead.add(room, "conn-of-a-dead-instance", "dave")
        finally:
            await dead.aclose()

    with Client(cluster.a, "alice") as alice, Client(cluster.b, "erin") as erin:
        alice.join(room, "alice")
        asyncio.run(add_dave())
        expires = time.time() + PRESENCE_TTL_S
        time.sleep(max(0.0, expires - time.time()) + 0.01)
        erin.join(room, "erin")
        left = alice.until("presence", user="dave", action="leave", timeout=PRESENCE_TTL_S + 3)
        assert [m["user"] for m in left["members"]] == ["alice", "erin"]


def test_two_instances_share_a_chroma_server(tmp_path: Path, token_server: TokenServer) -> None:
    chroma_port = free_port()
    chroma_bin = str(Path(sys.executable).parent / "chroma")
    cmd = [chroma_bin, "run", "--path", str(tmp_path / "chroma-db"), "--host", "127.0.0.1"]
    url = f"http://127.0.0.1:{chroma_port}"
    chroma = spawn("chroma", [*cmd, "--port", str(chroma_port)], base_env(), tmp_path, url)
    prefix = new_prefix()
    servers: list[Any] = []
    try:
        wait_ready([chroma], "/api/v2/heartbeat", timeout=60)
        state = tmp_path / "state"
        ingested = run_cli(
            ["-m", "ingest", "data/", "--quiet"], state, env={"RAG_CHROMA_URL": chroma.url}
        )
        assert ingested.returncode == 0, ingested.stderr
        assert not (state / "chroma").exists()  # the vectors went to the server, not embedded
        # with their texts and all their metadata: readers on other machines have no manifest
        # (read in a child process: chromadb's HttpClient leaves its sockets open on close)
        host, port = chroma.url.removeprefix("http://").split(":")
        read = (
            "import chromadb, json\n"
            f"c = chromadb.HttpClient(host={host!r}, port={port}).get_collection('docs')\n"
            "print(json.dumps(c.get(limit=5, include=['documents', 'metadatas'])))"
        )
        out = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        some = json.loads(out.stdout)
        assert len(some["ids"]) == 5 and all(some["documents"])
        assert all({"source", "doc_id", "heading", "position"} <= set(m) for m in some["metadatas"])
        env = server_env(state, prefix, token_server.v1, RAG_CHROMA_URL=chroma.url)
        servers = spawn_servers(["chroma-A", "chroma-B"], env, tmp_path)
        chunks = [
            httpx.get(s.url + "/readyz", timeout=10).json()["checks"]["vector_store"]["chunks"]
            for s in servers
        ]
        assert chunks[0] == chunks[1] > 20
        for mode in ("dense", "hybrid"):
            results = []
            for server in servers:
                r = httpx.post(
                    server.url + "/api/search",
                    json={"query": "How do I ingest PDF files?", "k": 5, "mode": mode},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
                results.append([(h["id"], h["source"]) for h in r.json()["results"]])
            assert len(results[0]) == 5
            assert results[0] == results[1], mode
            assert any(source.endswith("ingesting.md") for _, source in results[0][:3])
    finally:
        for proc in [*servers, chroma]:
            proc.stop()
        delete_prefix(prefix)
