"""Resume across instances: clients that drop (with or without a close frame) at random points,
mostly in the middle of AI answers, and come back on the other instance with their last seq get
exactly what a client that never left got; a re-sent ``client_id`` is taken once; an SSE stream
resumed with ``Last-Event-ID`` on the other instance completes the answer."""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from rag_chat.rooms import RedisRoomLog, RoomHub
from rag_chat.testing.token_server import token_text
from tests.rooms.conftest import (
    REDIS_URL,
    Client,
    Cluster,
    Event,
    Proc,
    delete_prefix,
    new_prefix,
    new_room,
    room_events,
    until,
)

SEED = 1234
RESUMERS = 4
CYCLES = 50  # drops and reconnects per resuming client: 200 in all
MAX_ANSWERS = 400  # a bound on the driver, should the resumers stall
MID_ANSWER = {"ai.start", "ai.sources", "ai.token"}

Row = tuple[int, str, str | None, str | None]  # (seq, type, message_id or id or user, delta)


def row(event: Event) -> Row:
    ref = event.get("message_id") or event.get("id") or event.get("user")
    return (event["seq"], event["type"], ref, event.get("delta"))


def canonical(rows: list[Row]) -> list[Row]:
    """Tokens of one answer next to each other as one row (the seq of the last). A client
    that falls behind (a resume replaying a backlog) gets such runs coalesced by the server;
    in this form every client's transcript reads the same."""
    out: list[Row] = []
    for r in rows:
        if out and r[1] == "ai.token" and out[-1][1] == "ai.token" and out[-1][2] == r[2]:
            out[-1] = (r[0], r[1], r[2], (out[-1][3] or "") + (r[3] or ""))
        else:
            out.append(r)
    return out


@dataclass
class Resumer:
    """A client that keeps dropping its connection and resuming on the other instance."""

    name: str
    servers: list[Proc]
    room: str
    rng: random.Random
    first_seq: int = 0
    last: int = 0
    rows: list[Row] = field(default_factory=list)
    cycles: int = 0
    mid_answer_drops: int = 0
    abrupt: int = 0
    error: BaseException | None = None

    def take(self, event: Event) -> None:
        if event.get("room") != self.room or "seq" not in event:
            return
        # nothing twice, nothing out of order: a resume replays only what is after `last`
        assert event["seq"] > self.last, (self.name, event["seq"], self.last)
        self.last = event["seq"]
        self.rows.append(row(event))

    def connect(self, turn: int, last_seq: int | None) -> Client:
        client = Client(self.servers[turn % 2], self.name)
        joined = client.join(self.room, self.name, last_seq=last_seq)
        if last_seq is None:
            self.first_seq = self.last = joined["last_seq"]
        for event in client.events[client.events.index(joined) + 1 :]:
            self.take(event)
        return client

    def run(self, ready: threading.Barrier, end: threading.Event, end_id: list[str]) -> None:
        client: Client | None = None
        try:
            turn = self.rng.randrange(2)
            client = self.connect(turn, None)
            ready.wait(timeout=60)
            while self.cycles < CYCLES:
                for _ in range(self.rng.randint(1, 30)):
                    event = client.recv(0.5)
                    if event is None:
                        break  # nothing streaming right now: drop anyway
                    self.take(event)
                if self.rows and self.rows[-1][1] in MID_ANSWER:
                    self.mid_answer_drops += 1
                if self.rng.random() < 0.5:
                    client.drop()
                    self.abrupt += 1
                else:
                    client.close()
                self.cycles += 1
                turn += 1
                if self.rng.random() < 0.3:
                    time.sleep(self.rng.uniform(0, 0.3))  # away a little longer
                client = self.connect(turn, self.last)
            # done dropping: stay (reading) until the driver's closing message
            deadline = time.monotonic() + 300
            while not end.is_set() and time.monotonic() < deadline:
                if (event := client.recv(0.2)) is not None:
                    self.take(event)
            deadline = time.monotonic() + 60
            while not any(r[1] == "message" and r[2] == end_id[0] for r in self.rows):
                event = client.recv(deadline - time.monotonic())
                assert event is not None, f"{self.name}: no END message"
                self.take(event)
        except BaseException as exc:
            self.error = exc
            ready.abort()
        finally:
            if client is not None:
                client.close()


def test_clients_dropping_anywhere_and_resuming_on_either_instance_lose_nothing(
    cluster: Cluster,
) -> None:
    room = new_room("resume")
    servers = cluster.servers()
    rng = random.Random(SEED)
    refs = [Client(cluster.a, "ref-a"), Client(cluster.b, "ref-b")]
    # two drivers: answers run on A and on B at the same time, interleaved in the room's log
    drivers = [Client(cluster.a, "driver-a"), Client(cluster.b, "driver-b")]
    resumers = [
        Resumer(f"r{i}", servers, room, random.Random(SEED + 1 + i)) for i in range(RESUMERS)
    ]
    ready = threading.Barrier(RESUMERS + 1)
    end = threading.Event()
    end_id: list[str] = []
    threads = [threading.Thread(target=r.run, args=(ready, end, end_id)) for r in resumers]
    asked: dict[str, int] = {}  # AI message_id -> tokens it was asked for
    try:
        ref_first = [c.join(room, c.name)["last_seq"] for c in refs]
        for driver in drivers:
            driver.join(room, driver.name)
        for t in threads:
            t.start()
        ready.wait(timeout=60)  # every resumer is in: each sees every answer from its start
        answers = 0
        while any(r.cycles < CYCLES and r.error is None for r in resumers):
            assert answers < MAX_ANSWERS, [(r.name, r.cycles) for r in resumers]
            posted = []
            for driver in drivers:
                n = rng.randint(20, 40)
                cid = f"q{answers}"
                text = f"@ai question {answers}: how do I ingest PDFs? [[tokens={n} rate=300]]"
                posted.append((driver, driver.mark(), cid, n))
                driver.send(type="message", room=room, text=text, client_id=cid)
                answers += 1
            for driver, since, cid, n in posted:
                msg = driver.until("message", since=since, client_id=cid)
                start = driver.until("ai.start", since=since, reply_to=msg["id"])
                asked[start["message_id"]] = n
                mid = start["message_id"]
                done = driver.until("ai.done", timeout=30, since=since, message_id=mid)
                assert done["finish_reason"] == "stop", done
        since = drivers[0].mark()
        drivers[0].send(type="message", room=room, text="END", client_id="end")
        end_id.append(drivers[0].until("message", since=since, client_id="end")["id"])
        end.set()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        errors = [(r.name, r.error) for r in resumers if r.error is not None]
        assert not errors, errors
        for ref in refs:
            ref.until("message", timeout=30, id=end_id[0])
    finally:
        end.set()
        ready.abort()
        for client in [*refs, *drivers]:
            client.close()
        for t in threads:
            t.join(timeout=30)

    end_seq = next(r[0] for r in resumers[0].rows if r[2] == end_id[0])
    base = max([*ref_first, *(r.first_seq for r in resumers)])

    def window(rows: list[Row]) -> list[Row]:
        # between the last join and END; tokens only of the answers that started in it
        started = {r[2] for r in rows if r[1] == "ai.start" and base < r[0] <= end_seq}
        return canonical(
            [r for r in rows if base < r[0] <= end_seq and (r[1] != "ai.token" or r[2] in started)]
        )

    def increasing(rows: list[Row]) -> bool:
        return all(a[0] < b[0] for a, b in itertools.pairwise(rows))

    raw_reference = [row(e) for e in room_events(refs[0].events, room)]
    reference = window(raw_reference)
    assert window([row(e) for e in room_events(refs[1].events, room)]) == reference
    # the reference is complete: every event once, in order, every answer whole
    assert increasing(raw_reference)
    assert sum(r[1] == "ai.done" for r in reference) == answers == len(asked) >= 10
    for message_id, n in asked.items():
        deltas = [r[3] or "" for r in reference if r[1] == "ai.token" and r[2] == message_id]
        assert "".join(deltas) == token_text(n), message_id
    for resumer in resumers:
        assert increasing(resumer.rows), resumer.name  # nothing twice, nothing out of order
        assert resumer.rows[0][0] == resumer.first_seq + 1, resumer.name
        assert window(resumer.rows) == reference, resumer.name
    assert sum(r.cycles for r in resumers) == RESUMERS * CYCLES
    # most drops fell in the middle of an answer, some without a close frame
    assert sum(r.mid_answer_drops for r in resumers) >= RESUMERS * CYCLES // 3, [
        r.mid_answer_drops for r in resumers
    ]
    assert sum(r.abrupt for r in resumers) >= RESUMERS * CYCLES // 4


def test_a_message_resent_after_reconnecting_elsewhere_is_taken_once(cluster: Cluster) -> None:
    room = new_room("idem")
    token = cluster.token
    before = token.wait_idle()
    text = "@ai once, please [[tokens=20 rate=200]]"
    with Client(cluster.b, "observer") as observer:
        observer.join(room, "observer")
        sender = Client(cluster.a, "sender")
        last = sender.join(room, "sender")["last_seq"]
        sender.send(type="message", room=room, text=text, client_id="once-1")
        sender.drop()  # gone before any answer: did it arrive?
        with Client(cluster.b, "sender") as again:
            again.join(room, "sender", last_seq=last)
            again.send(type="message", room=room, text=text, client_id="once-1")
            msg = again.until("message", client_id="once-1")
            start = again.until("ai.start", reply_to=msg["id"])
            again.until("ai.done", message_id=start["message_id"])
            # the same client_id on both instances at once: still one message
            with Client(cluster.a, "twin-a") as twin_a, Client(cluster.b, "twin-b") as twin_b:
                for twin in (twin_a, twin_b):
                    twin.join(room, twin.name)
                for twin in (twin_a, twin_b):
                    twin.send(type="message", room=room, text="twice?", client_id="both")
                observer.until("message", client_id="both")
                again.until("message", client_id="both")
                time.sleep(1.0)  # room for a second reply or message to show up
                for client in (observer, again):
                    while client.recv(0.2) is not None:
                        pass
            for client in (observer, again):
                events = room_events(client.events, room)
                for cid in ("once-1", "both"):
                    assert (
                        sum(e["type"] == "message" and e["client_id"] == cid for e in events) == 1
                    )
                assert sum(e["type"] == "ai.start" for e in events) == 1
                assert sum(e["type"] == "ai.done" for e in events) == 1
    after = token.wait_idle()
    assert after["requests"] == before["requests"] + 1


def sse(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Generator[Event, None, None]:
    """The events of ``POST /api/chat``, each with its ``id`` (the seq), as they arrive."""
    with httpx.stream("POST", url + "/api/chat", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        event: dict[str, str] = {}
        for line in r.iter_lines():
            if not line:
                if "data" in event:
                    yield {**json.loads(event["data"]), "_id": int(event["id"])}
                event = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(":")
                event[key] = value[1:] if value.startswith(" ") else value


def key(event: Event) -> tuple[Any, ...]:
    if event["type"] == "ai.sources":
        return (event["type"], tuple(c["id"] for c in event["chunks"]))
    return (event["type"], event.get("delta"), event.get("text"), event.get("finish_reason"))


def merged_keys(events: Iterable[Event]) -> list[tuple[Any, ...]]:
    """``key`` of each event, the tokens next to each other as one (their text joined)."""
    out: list[tuple[Any, ...]] = []
    for event in events:
        k = key(event)
        if out and k[0] == "ai.token" and out[-1][0] == "ai.token":
            out[-1] = ("ai.token", out[-1][1] + k[1], None, None)
        else:
            out.append(k)
    return out


def test_sse_resumed_with_last_event_id_on_the_other_instance(cluster: Cluster) -> None:
    question = "How do I ingest PDF files? [[tokens=30 rate=60]]"
    whole = list(sse(cluster.a.url, {"message": question}))
    assert whole[-1]["type"] == "ai.done"

    first: list[Event] = []
    with contextlib.closing(sse(cluster.a.url, {"message": question})) as stream:
        for event in stream:
            first.append(event)
            if sum(e["type"] == "ai.token" for e in first) == 5:
                break  # closing the stream drops the connection here, mid-answer
    conversation = next(e for e in first if e["type"] == "ai.start")["conversation_id"]
    body = {"message": question, "conversation_id": conversation}
    rest = list(sse(cluster.b.url, body, {"Last-Event-ID": str(first[-1]["_id"])}))
    resumed = first + rest
    ids = [e["_id"] for e in resumed]
    assert ids == sorted(set(ids)), ids  # nothing twice
    assert resumed[-1]["type"] == "ai.done" and resumed[-1]["finish_reason"] == "stop"
    # the same events as the uninterrupted run (presence comes and goes with the connections;
    # tokens that came while one was on its way to Redis are one event: compared merged)
    chat = {"message", "ai.start", "ai.sources", "ai.token", "ai.done", "error"}
    assert merged_keys(e for e in resumed if e["type"] in chat) == merged_keys(
        e for e in whole if e["type"] in chat
    )
    tokens = [e["delta"] for e in resumed if e["type"] == "ai.token"]
    assert "".join(tokens) == token_text(30)


class _RacingLog(RedisRoomLog):
    """The real Redis log; ``during_head_read`` runs after the next ``last_seq`` read has been
    answered and before its caller resumes: what a busy event loop does to a join."""

    during_head_read: Callable[[], Awaitable[None]] | None = None

    async def last_seq(self, room: str) -> int:
        value = await super().last_seq(room)
        hook, self.during_head_read = self.during_head_read, None
        if hook is not None:
            await hook()
        return value


async def test_a_resume_at_the_head_of_a_busy_room_misses_nothing() -> None:
    """A client that resumes with the room's latest seq (it missed nothing yet) while another
    member on the same instance follows the room: an event that the hub's reader fans out
    while the join reads the room's head must still reach the resuming client."""
    prefix = new_prefix()
    log = _RacingLog(REDIS_URL, prefix)
    hub = RoomHub(log)
    hub.start()
    try:
        room = "busy"
        other: list[Event] = []
        await hub.subscribe(room, None, other.append)
        await log.append(room, {"type": "message", "n": 1})
        await until(lambda: len(other) == 1)
        head = other[-1]["seq"]

        async def an_event_goes_out() -> None:
            await log.append(room, {"type": "message", "n": 2})
            await until(lambda: len(other) == 2)  # the reader fanned it out to who it knew

        log.during_head_read = an_event_goes_out
        resumed: list[Event] = []
        await hub.subscribe(room, head, resumed.append)
        await log.append(room, {"type": "message", "n": 3})
        await until(lambda: len(other) == 3)
        assert [e["n"] for e in other] == [1, 2, 3]
        assert [e["n"] for e in resumed] == [2, 3]
    finally:
        await hub.stop()
        await log.aclose()
        delete_prefix(prefix)
