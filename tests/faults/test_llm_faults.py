"""The LLM backend fails under a running server: it dies in the middle of an answer, it streams
slower than the read timeout, it does not answer at all. Each time the reply ends with one clear
``error`` event within a bounded time, what was delivered stays delivered (and in the history),
and everyone else on the instance carries on; once the backend is back, answers are whole again.

The backend is the synthetic token server (``[[tokens=N rate=R delay=S]]`` in a question shapes
its answer); the server reads it with ``RAG_LLM_READ_TIMEOUT_SECONDS`` = 3.
"""

from __future__ import annotations

import time

import httpx

from rag_chat.testing.token_server import token_text
from tests.faults.conftest import (
    LLM_READ_TIMEOUT_S,
    Instance,
    ask_private,
    deltas,
    history,
    ping,
    wait_for,
)
from tests.rooms.conftest import Client, Event, new_room

# bounds that tell a hang from a slow machine; not speed goals
ANSWER_WITHIN_S = 30.0
ERROR_WITHIN_S = 30.0


def n_tokens(client: Client, message_id: str) -> int:
    return sum(e.get("type") == "ai.token" and e["message_id"] == message_id for e in client.events)


def reply_of(client: Client, message_id: str) -> list[Event]:
    return [e for e in client.events if e.get("message_id") == message_id]


def whole_answer(client: Client, tokens: int) -> Event:
    """Ask in the private conversation; the answer must be ``tokens`` tokens, all of them."""
    start = ask_private(client, f"How do I ingest PDF files? [[tokens={tokens} rate=400]]")
    done = client.until("ai.done", timeout=ANSWER_WITHIN_S, message_id=start["message_id"])
    assert done["finish_reason"] == "stop", done
    assert deltas(client.events, start["message_id"]) == token_text(tokens)
    assert not [e for e in reply_of(client, start["message_id"]) if e["type"] == "error"]
    return done


def room_still_works(sender: Client, receiver: Client, room: str, text: str) -> None:
    """A message in ``room`` reaches the other member, and ping is answered."""
    since = receiver.mark()
    sender.send(type="message", room=room, text=text)
    got = receiver.until("message", timeout=15, since=since, text=text)
    assert got["user"] == sender.name
    ping(sender)
    ping(receiver)


def test_llm_killed_mid_answer(healthy: Instance) -> None:
    inst = healthy
    llm = inst.llm
    room = new_room("bystanders")
    with (
        Client(inst.proc, "asker") as asker,
        Client(inst.proc, "ann") as ann,
        Client(inst.proc, "ben") as ben,
    ):
        ann.join(room, "ann")
        ben.join(room, "ben")
        start = ask_private(asker, "Explain the configuration [[tokens=3000 rate=30]]")
        message_id, conversation = start["message_id"], start["conversation_id"]
        asker.wait(lambda e: n_tokens(asker, message_id) >= 5, timeout=20, since=0, what="5 tokens")
        assert inst.token.stats()["active"] == 1

        llm.kill()  # SIGKILL: the stream ends without a last chunk
        killed = time.monotonic()

        error = asker.until("error", timeout=ERROR_WITHIN_S, message_id=message_id)
        assert time.monotonic() - killed < ERROR_WITHIN_S
        assert error["code"] == "llm_unavailable", error
        assert error["partial"] is True, error
        assert error["message"] and "\n" not in error["message"]
        # what was delivered is a clean prefix of the answer, and nothing came after the error
        events = reply_of(asker, message_id)
        types = [e["type"] for e in events]
        assert types[:2] == ["ai.start", "ai.sources"], types
        assert types[-1] == "error" and "ai.done" not in types, types
        delivered = deltas(asker.events, message_id)
        count = n_tokens(asker, message_id)
        assert count >= 5 and delivered == token_text(count)
        # ... and stays: in the history (the answer as far as it got) and in the room's log
        answer = [m for m in history(inst.proc, conversation) if m["id"] == message_id]
        assert len(answer) == 1, answer
        assert answer[0]["role"] == "assistant" and answer[0]["finish_reason"] == "error"
        assert answer[0]["content"] == delivered
        with Client(inst.proc, "replay") as replay:
            replay.join(conversation, "replay", last_seq=start["seq"] - 1)
            again = replay.until("error", timeout=15, message_id=message_id)
            assert again["partial"] is True
            assert deltas(replay.events, message_id) == delivered

        # the rest of the instance carries on while the LLM is gone
        room_still_works(ann, ben, room, "still here?")
        room_still_works(ben, ann, room, "yes")
        assert httpx.get(inst.proc.url + "/healthz", timeout=10).status_code == 200
        ready = httpx.get(inst.proc.url + "/readyz", timeout=15)
        assert ready.status_code == 503, ready.text
        checks = ready.json()["checks"]
        assert checks["llm"]["ok"] is False and checks["memory"]["ok"] is True, checks
        # a question asked now fails clearly, and quickly enough (connection refused, retried)
        asked = time.monotonic()
        down = ask_private(asker, "Anyone there? [[tokens=10]]")
        refused = asker.until("error", timeout=ERROR_WITHIN_S, message_id=down["message_id"])
        assert refused["code"] == "llm_unavailable" and refused["partial"] is False, refused
        assert time.monotonic() - asked < ERROR_WITHIN_S
        assert n_tokens(asker, down["message_id"]) == 0

        # the LLM comes back on the same address: the next question gets a whole answer
        llm.start()
        wait_for(
            lambda: httpx.get(inst.proc.url + "/readyz", timeout=15).status_code == 200,
            30,
            "/readyz 200 once the LLM is back",
            every=0.5,
        )
        whole_answer(asker, 40)
        whole_answer(ann, 12)  # and for anyone else
        assert inst.proc.alive(), inst.proc.tail()


def test_llm_slower_than_the_read_timeout(healthy: Instance) -> None:
    """A stream that stops for longer than the read timeout: ``llm_timeout`` after the tokens
    that did come, while another user's answer streams whole."""
    inst = healthy
    token = inst.token
    with Client(inst.proc, "patient") as patient, Client(inst.proc, "other") as other:
        # token 0 at once, then one every 10 s: more than the read timeout between tokens
        start = ask_private(patient, "Take your time [[tokens=30 rate=0.1]]")
        message_id = start["message_id"]
        patient.until("ai.token", timeout=20, message_id=message_id)
        first_token = time.monotonic()
        # meanwhile, someone else on the instance is answered in full
        whole_answer(other, 30)
        ping(other)
        error = patient.until("error", timeout=LLM_READ_TIMEOUT_S + ERROR_WITHIN_S)
        waited = time.monotonic() - first_token
        assert error["message_id"] == message_id
        assert error["code"] == "llm_timeout", error
        assert error["partial"] is True
        assert waited < LLM_READ_TIMEOUT_S + ERROR_WITHIN_S
        assert deltas(patient.events, message_id) == token_text(1)
        assert "ai.done" not in [e["type"] for e in reply_of(patient, message_id)]
        # the server hung up on the slow stream: it does not go on in the backend
        record = wait_for(
            lambda: next(
                (
                    r
                    for r in token.stats(recent=10)["recent"]
                    if r["rate"] == 0.1 and r["state"] != "active"
                ),
                None,
            ),
            15,
            "the slow stream closed in the token server",
        )
        assert record["state"] == "cancelled" and record["sent"] == 1, record
        # the connection is as good as before
        whole_answer(patient, 8)


def test_llm_not_answering(healthy: Instance) -> None:
    """A backend that accepts the request and never answers: after the SDK's bounded retries,
    ``llm_timeout`` with nothing delivered; other users are answered meanwhile."""
    inst = healthy
    token = inst.token
    with Client(inst.proc, "waiting") as waiting, Client(inst.proc, "other") as other:
        asked = time.monotonic()
        start = ask_private(waiting, "Hello? [[tokens=10 delay=600]]")
        message_id = start["message_id"]
        whole_answer(other, 20)
        room = new_room("chatter")
        other.join(room, "other")
        waiting.join(room, "waiting")
        room_still_works(other, waiting, room, "is the LLM stuck for you too?")
        error = waiting.until("error", timeout=ERROR_WITHIN_S + 30, message_id=message_id)
        assert time.monotonic() - asked < ERROR_WITHIN_S + 30
        assert error["code"] == "llm_timeout", error
        assert error["partial"] is False
        assert n_tokens(waiting, message_id) == 0
        # every attempt was given up: none is left open in the backend
        tries = wait_for(
            lambda: (
                rs
                if (rs := [r for r in token.stats(recent=20)["recent"] if r["delay"] == 600])
                and all(r["state"] == "cancelled" for r in rs)
                else None
            ),
            15,
            "the unanswered requests closed",
        )
        assert 1 <= len(tries) <= 3, tries  # the first try and at most 2 retries
        assert all(r["sent"] == 0 for r in tries)
        whole_answer(waiting, 8)
