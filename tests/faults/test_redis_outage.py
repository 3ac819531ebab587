"""Redis goes away under a running server and comes back (a private ``redis-server`` with an
append-only file; the server is not restarted).

While it is down, whatever a client tries gets a clear ``memory_unavailable`` error, the process
stays up, ``/healthz`` answers and ``/readyz`` says 503 naming Redis. Once it is back, the server
recovers by itself: joins, messages, AI answers and resumes work again, members still connected
are present again, and every message acknowledged before the outage is still in the history.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from rag_chat.testing.token_server import token_text
from tests.faults.conftest import (
    LLMServer,
    PersistentRedis,
    ask_private,
    deltas,
    fault_env,
    history,
    metric,
    ping,
    wait_for,
)
from tests.rooms.conftest import (
    PRESENCE_TTL_S,
    Client,
    Event,
    new_prefix,
    new_room,
    room_events,
    server_env,
    spawn_servers,
)

LONG = "[[tokens=400 rate=20]]"  # an answer of 20 s
ERROR_WITHIN_S = 20.0  # an outage answers with an error, not a hang
RECOVER_WITHIN_S = 40.0  # the reader's backoff is capped; this only detects "never"


def n_tokens(client: Client, message_id: str) -> int:
    return sum(e.get("type") == "ai.token" and e["message_id"] == message_id for e in client.events)


def members_of(event: Event) -> list[str]:
    return [m["user"] for m in event["members"]]


def error_for(client: Client, since: int, event: str) -> Event:
    error = client.until("error", timeout=ERROR_WITHIN_S, since=since, event=event)
    assert error["code"] == "memory_unavailable", error
    assert "Redis" in error["message"] and "\n" not in error["message"], error
    return error


def test_redis_stopped_and_restarted(
    tmp_path: Path, guide_index: Path, llm: LLMServer, private_redis: PersistentRedis
) -> None:
    llm.ensure()
    env = server_env(
        guide_index, new_prefix(), llm.v1, **fault_env(RAG_REDIS_URL=private_redis.url)
    )
    proc = spawn_servers(["redis-outage"], env, tmp_path)[0]
    room = new_room("outage")
    try:
        with Client(proc, "alice") as alice, Client(proc, "carol") as carol:
            alice.join(room, "alice")
            carol.join(room, "carol")
            alice.until("presence", user="carol", action="join")

            # acknowledged before the outage: seen echoed back as `message` events
            acked: list[Event] = []
            for i in range(3):
                alice.send(type="message", room=room, text=f"before {i}", client_id=f"b{i}")
                acked.append(alice.until("message", client_id=f"b{i}"))
            alice.send(type="message", room=room, text="@ai PDFs? [[tokens=16]]", client_id="bq")
            question = alice.until("message", client_id="bq")
            start = alice.until("ai.start", timeout=30, reply_to=question["id"])
            done = alice.until("ai.done", timeout=30, message_id=start["message_id"])
            assert done["finish_reason"] == "stop" and done["persisted"] is True
            carol.until("ai.done", timeout=30, message_id=start["message_id"])
            seen_by_carol = room_events(carol.events, room)[-1]["seq"]
            # and an answer that is still streaming when Redis goes
            alice.send(type="message", room=room, text=f"@ai more {LONG}", client_id="bl")
            long_question = alice.until("message", client_id="bl")
            cut = alice.until("ai.start", timeout=30, reply_to=long_question["id"])["message_id"]
            alice.wait(lambda e: n_tokens(alice, cut) >= 3, 20, 0, "3 tokens")
            before = history(proc, room)
            assert [m["content"] for m in before] == [
                "before 0",
                "before 1",
                "before 2",
                "@ai PDFs? [[tokens=16]]",
                token_text(16),
                f"@ai more {LONG}",
            ]
            assert [m["id"] for m in before] == [
                *(e["id"] for e in [*acked, question]),
                start["message_id"],
                long_question["id"],
            ]
            token = llm.ensure()
            asked = token.stats()["requests"]

            private_redis.kill()  # SIGKILL: no goodbye to any client
            down_at = time.monotonic()

            # the streaming answer cannot go on without its log: it is stopped in the backend
            record = wait_for(
                lambda: (
                    r
                    if (r := token.stats(recent=1)["recent"][0])["state"] != "active"
                    and token.stats()["requests"] == asked
                    else None
                ),
                ERROR_WITHIN_S,
                "the cut-off answer stopped in the token server",
            )
            assert record["state"] == "cancelled" and record["sent"] < record["planned"], record

            # --- while Redis is down ---
            since = alice.mark()
            alice.send(type="message", room=room, text="during", client_id="d0")
            error_for(alice, since, "message")
            since = alice.mark()
            alice.send(type="typing", room=room, state="start")
            error_for(alice, since, "typing")
            with Client(proc, "dave") as dave:
                since = dave.mark()
                dave.send(type="join", room=room, user="dave")
                error_for(dave, since, "join")
                since = dave.mark()
                dave.send(type="message", text="Are you there?")  # a private question
                error_for(dave, since, "message")
                ping(dave)  # the connection itself is fine
            ping(alice)
            ping(carol)
            assert httpx.get(proc.url + "/healthz", timeout=10).status_code == 200
            ready = httpx.get(proc.url + "/readyz", timeout=15)
            assert ready.status_code == 503, ready.text
            memory = ready.json()["checks"]["memory"]
            assert memory["ok"] is False and "Redis" in memory["error"], memory
            lost = httpx.get(f"{proc.url}/api/conversations/{room}/messages", timeout=15)
            assert lost.status_code == 503, lost.text
            assert lost.json()["error"]["code"] == "memory_unavailable"
            # long enough for every presence entry to expire (nobody can refresh them)
            time.sleep(max(0.0, PRESENCE_TTL_S + 1.5 - (time.monotonic() - down_at)))
            assert proc.alive(), proc.tail()

            private_redis.start()  # same port, same append-only file

            # --- recovery, with no restart of the server ---
            wait_for(
                lambda: httpx.get(proc.url + "/readyz", timeout=15).status_code == 200,
                RECOVER_WITHIN_S,
                "/readyz 200 once Redis is back",
                every=0.5,
            )
            # the answer that was cut off ends, for everyone, with an error once the log is back
            for client in (alice, carol):
                end = client.until("error", timeout=RECOVER_WITHIN_S, message_id=cut)
                assert end["code"] == "memory_unavailable" and end["partial"] is True, end
            got = deltas(alice.events, cut)
            assert got == token_text(n_tokens(alice, cut)) and len(got.split()) >= 3
            assert "ai.done" not in [e["type"] for e in alice.events if e.get("message_id") == cut]
            # the first message after readiness goes through, and the room's reader (XREAD)
            # delivers it to the member who stayed connected all along
            since = alice.mark()
            alice.send(type="message", room=room, text="after 0", client_id="a0")
            mine = alice.until("message", timeout=RECOVER_WITHIN_S, since=since, client_id="a0")
            assert not [e for e in alice.events[since:] if e["type"] == "error"], alice.events
            carol.until("message", timeout=RECOVER_WITHIN_S, client_id="a0")
            assert mine["seq"] > seen_by_carol
            # the AI answers again, in full
            alice.send(type="message", room=room, text="@ai again [[tokens=12]]", client_id="aq")
            question2 = alice.until("message", client_id="aq")
            start2 = alice.until("ai.start", timeout=30, reply_to=question2["id"])
            done2 = alice.until("ai.done", timeout=30, message_id=start2["message_id"])
            assert done2["finish_reason"] == "stop" and done2["persisted"] is True
            assert deltas(alice.events, start2["message_id"]) == token_text(12)
            # typing works again
            since = carol.mark()
            alice.send(type="typing", room=room, state="start")
            carol.until("typing", since=since, user="alice", state="start")

            # alice and carol never left: they are members again (the presence refresher put
            # back the entries that expired while Redis was away)
            def everyone_present() -> Event | None:
                with Client(proc, "erin") as erin:
                    joined = erin.join(room, "erin")
                return joined if members_of(joined) == ["alice", "carol", "erin"] else None

            joined = wait_for(everyone_present, 15, "alice and carol present again", every=0.5)
            assert joined["last_seq"] > mine["seq"]

            # a private conversation with the AI works for a newcomer too
            with Client(proc, "frank") as frank:
                fresh = ask_private(frank, "How do I ingest PDFs? [[tokens=9]]")
                frank.until("ai.done", timeout=30, message_id=fresh["message_id"])
                assert deltas(frank.events, fresh["message_id"]) == token_text(9)

            # resume from before the outage: exactly what came after, in order, none missing
            with Client(proc, "carol") as back:
                back.join(room, "carol", last_seq=seen_by_carol)
                back.until("ai.done", timeout=30, message_id=start2["message_id"])
                replayed = room_events(back.events, room)
                seqs = [e["seq"] for e in replayed]
                assert seqs == list(range(seen_by_carol + 1, seen_by_carol + 1 + len(seqs)))
                ids = {e.get("id") for e in replayed if e["type"] == "message"}
                assert {long_question["id"], mine["id"], question2["id"]} <= ids
                cut_end = [e for e in replayed if e.get("message_id") == cut][-1]
                assert cut_end["type"] == "error", cut_end
                assert not {e["id"] for e in acked} & ids  # nothing from before, again
                assert "during" not in [e.get("text") for e in replayed]

            # everything acknowledged before the outage is still there, then what came after
            after = history(proc, room)
            assert after[: len(before)] == before
            assert [m["content"] for m in after[len(before) :]] == [
                "after 0",
                "@ai again [[tokens=12]]",
                token_text(12),
            ]
            assert "during" not in [m["content"] for m in after]
        # nothing is left generating (the cut-off answer included)
        wait_for(lambda: metric(proc, "rag_replies_in_flight") == 0, 15, "no reply in flight")
        assert proc.alive(), proc.tail()
    finally:
        proc.stop()
