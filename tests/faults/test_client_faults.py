"""Clients that fail: one whose socket dies in the middle of an answer (no close frame, no
HTTP goodbye), and one that stops reading while answers stream into its room.

A reply nobody listens to is cancelled in the backend after the grace period
(``RAG_REPLY_GRACE_SECONDS`` = 1 here), and what it held is released; a consumer that stops
reading costs the server bounded memory, is disconnected within a bounded time (close 1013, or
1011 when the protocol pings it ignores give out first, or dropped when not even a close frame
fits) and the server process lets go of its socket, and it slows nobody else down.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from collections.abc import Sequence
from typing import Any

from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.sync.client import connect as ws_connect
from websockets.typing import ExtensionName, ExtensionParameter

from rag_chat.server import COMPRESS_MIN_BYTES
from rag_chat.testing.token_server import token_text
from tests.faults.conftest import (
    GRACE_S,
    Instance,
    RawWebSocket,
    ask_private,
    deltas,
    history,
    metric,
    metrics,
    rss_kib,
    wait_for,
)
from tests.rooms.conftest import Client, Event, TokenServer, new_room

CONNECTIONS = "rag_ws_connections"
IN_FLIGHT = "rag_replies_in_flight"  # replies generating on the instance, any transport
ROOMS = "rag_rooms"  # rooms the instance follows (a member, an SSE stream or a reply here)
SLOW = "[[tokens=3000 rate=25]]"  # a long answer (cut at the server's max_tokens), 25 tokens/s
# bounds that detect a hang or a leak, not speed goals
STOP_WITHIN_S = GRACE_S + 20.0
FEED_FOR_AT_MOST_S = 180.0
RSS_GROWTH_BOUND_KIB = 150 * 1024


def n_tokens(events: list[Event], message_id: str) -> int:
    return sum(e.get("type") == "ai.token" and e["message_id"] == message_id for e in events)


def no_connections(inst: Instance) -> None:
    wait_for(lambda: metric(inst.proc, CONNECTIONS) == 0, 15, "no WebSocket connection left")


def nothing_held(inst: Instance) -> None:
    """No connection, no reply generating, no room followed: all released."""
    no_connections(inst)
    wait_for(lambda: metric(inst.proc, IN_FLIGHT) == 0, 15, "no reply in flight")
    wait_for(lambda: metric(inst.proc, ROOMS) == 0, 15, "no room followed")


def stopped_in_backend(token: TokenServer, before: dict[str, Any]) -> dict[str, Any]:
    """The latest completion, once the token server no longer produces it."""

    def finished() -> dict[str, Any] | None:
        stats = token.stats(recent=1)
        if stats["requests"] == before["requests"] or stats["active"]:
            return None
        record: dict[str, Any] = stats["recent"][0]
        return record

    record = wait_for(finished, STOP_WITHIN_S, "the stream stopped in the token server")
    sent = token.stats()["tokens_sent"]
    time.sleep(1.0)
    assert token.stats()["tokens_sent"] == sent, "tokens still produced after the stop"
    return record


def audit_reply(inst: Instance, conversation: str, after_seq: int, message_id: str) -> str:
    """Replay the conversation's log from ``after_seq``: the reply ended with one
    ``ai.done`` (cancelled) and nothing of it came later. Its text, as logged."""
    with Client(inst.proc, "auditor") as auditor:
        auditor.join(conversation, "auditor", last_seq=after_seq)
        done = auditor.until("ai.done", timeout=15, message_id=message_id)
        assert done["finish_reason"] == "cancelled", done
        assert done["persisted"] is True
        time.sleep(0.5)
        while auditor.recv(0.2) is not None:
            pass
        reply = [e for e in auditor.events if e.get("message_id") == message_id]
        assert reply[-1] is done, [e["type"] for e in reply[-3:]]
        assert [e["type"] for e in reply].count("ai.done") == 1
        return deltas(auditor.events, message_id)


def test_websocket_client_killed_mid_reply(healthy: Instance) -> None:
    inst = healthy
    token = inst.token
    nothing_held(inst)
    before = token.wait_idle()
    client = Client(inst.proc, "leaver")
    try:
        start = ask_private(client, f"Tell me everything {SLOW}")
        message_id, conversation = start["message_id"], start["conversation_id"]
        client.wait(lambda e: n_tokens(client.events, message_id) >= 5, 20, 0, "5 tokens streamed")
        assert token.stats()["active"] == 1
        assert metric(inst.proc, CONNECTIONS) == 1
        assert metric(inst.proc, IN_FLIGHT) == 1
        assert metric(inst.proc, ROOMS) == 1
        received = n_tokens(client.events, message_id)
    finally:
        client.drop()  # the TCP connection goes, no close frame

    # the generation is stopped in the backend, well before its end
    record = stopped_in_backend(token, before)
    assert record["state"] == "cancelled", record
    assert received <= record["sent"] < record["planned"] - 50, record
    # the connection, the reply and the room's subscriptions are gone from the server
    nothing_held(inst)
    # the reply's task ran to its end and kept what was streamed
    logged = audit_reply(inst, conversation, start["seq"], message_id)
    count = len(logged.split())
    assert received <= count <= record["sent"] and logged == token_text(count)
    answer = [m for m in history(inst.proc, conversation) if m["id"] == message_id]
    assert [(m["content"], m["finish_reason"]) for m in answer] == [(logged, "cancelled")]
    nothing_held(inst)  # the auditor is gone too


def test_sse_client_killed_mid_reply(healthy: Instance) -> None:
    inst = healthy
    token = inst.token
    nothing_held(inst)
    before = token.wait_idle()
    host, port = inst.proc.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.connect()
    sock = conn.sock
    assert sock is not None
    events: list[Event] = []
    try:
        body = json.dumps({"message": f"Tell me everything {SLOW}"})
        conn.request("POST", "/api/chat", body, {"content-type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        start: Event | None = None
        while start is None or n_tokens(events, start["message_id"]) < 5:
            line = response.readline()
            assert line, f"the stream ended early: {events}"
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["type"] == "ai.start":
                    start = events[-1]
        assert metric(inst.proc, IN_FLIGHT) == 1
        assert metric(inst.proc, ROOMS) == 1
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # gone, without reading the rest
        conn.close()
    message_id, conversation = start["message_id"], start["conversation_id"]
    received = n_tokens(events, message_id)

    record = stopped_in_backend(token, before)
    assert record["state"] == "cancelled", record
    assert received <= record["sent"] < record["planned"] - 50, record
    nothing_held(inst)
    logged = audit_reply(inst, conversation, start["seq"], message_id)
    count = len(logged.split())
    assert received <= count <= record["sent"] and logged == token_text(count)
    answer = [m for m in history(inst.proc, conversation) if m["id"] == message_id]
    assert [(m["content"], m["finish_reason"]) for m in answer] == [(logged, "cancelled")]
    nothing_held(inst)


def whole_reply(client: Client, since: int, timeout: float = 60.0) -> Event:
    """The next AI reply after ``since`` in ``client``'s events, complete: its ``ai.done``."""
    start = client.until("ai.start", timeout=timeout, since=since)
    done = client.until("ai.done", timeout=timeout, since=since, message_id=start["message_id"])
    assert done["finish_reason"] in ("stop", "length"), done
    n = done["usage"]["completion_tokens"]
    assert n > 0 and deltas(client.events, start["message_id"]) == token_text(n)
    return done


def too_slow(inst: Instance) -> float:
    """How many slow consumers the server has disconnected (for the failure message)."""
    samples = metrics(inst.proc)
    names = ("rag_slow_consumers_dropped_total", 'rag_errors_total{code="too_slow"}')
    return max(samples.get(name, 0.0) for name in names)


def test_a_client_that_stops_reading(healthy: Instance) -> None:
    inst = healthy
    pid = inst.proc.popen.pid
    nothing_held(inst)
    room = new_room("firehose")
    rss_before = rss_kib(pid)
    rss_peak = rss_before
    with Client(inst.proc, "feeder") as feeder, Client(inst.proc, "observer") as observer:
        feeder.join(room, "feeder")
        # handshake, join, then it never reads again; a small receive window, as a phone's
        stalled = RawWebSocket(inst.proc.url, rcvbuf=16 * 1024)
        try:
            stalled.send(type="join", room=room, user="stalled")
            feeder.until("presence", user="stalled", action="join")
            began = time.monotonic()
            fed = 0
            # long, fast answers into its room (each as long as the server's max_tokens), while
            # someone on the same instance, in another conversation, keeps asking too
            while not stalled.released_by_server():
                assert time.monotonic() - began < FEED_FOR_AT_MOST_S, (
                    f"the stalled client is still connected after {fed} answers "
                    f"({stalled.pending_bytes()} bytes unread; server: its socket "
                    f"(TCP state, inode) {stalled.server_side()}, RSS "
                    f"+{(rss_kib(pid) - rss_before) // 1024} MiB, {CONNECTIONS} "
                    f"{metric(inst.proc, CONNECTIONS):g} of which 2 are feeder and observer, "
                    f"too_slow closes {too_slow(inst):g})"
                )
                since_feed, since_obs = feeder.mark(), observer.mark()
                feeder.send(type="message", room=room, text="@ai all [[tokens=100000 rate=0]]")
                observer.send(type="message", text="How do I ingest PDFs? [[tokens=40 rate=400]]")
                whole_reply(feeder, since_feed)
                whole_reply(observer, since_obs)
                fed += 1
                rss_peak = max(rss_peak, rss_kib(pid))
                assert rss_peak - rss_before < RSS_GROWTH_BOUND_KIB, (fed, rss_peak - rss_before)
            closed_after = time.monotonic() - began
            frames = stalled.drain(timeout=30)
        finally:
            stalled.close()
        # it got events before it stalled, then a close frame: 1013 (too slow: the send path
        # gave up on it) or 1011 (it stopped answering the protocol pings too: uvicorn's
        # keepalive gave up first), or, when not even that could be delivered, the end
        assert frames.texts > 0
        if frames.close_code is not None:
            assert frames.close_code in (1013, 1011), frames
        else:
            assert frames.reset or frames.eof, frames
        # the others were served the whole time, and still are
        whole_reply(feeder, _ask(feeder, room))
        wait_for(lambda: metric(inst.proc, CONNECTIONS) == 2, 15, "the stalled connection freed")
    nothing_held(inst)
    rss_after = rss_kib(pid)
    assert rss_after - rss_before < RSS_GROWTH_BOUND_KIB, (rss_before, rss_peak, rss_after)
    print(
        f"stalled client dropped after {fed} answers, {closed_after:.1f} s; close frame "
        f"{frames.close_code}, {frames.texts} frames; RSS {rss_before // 1024} MiB -> peak "
        f"{rss_peak // 1024} MiB -> {rss_after // 1024} MiB"
    )


def _ask(client: Client, room: str) -> int:
    since = client.mark()
    client.send(type="message", room=room, text="@ai once more [[tokens=30 rate=400]]")
    return since


class _Recorded(Extension):
    """Wraps the client's permessage-deflate and records, for each message, whether it came
    compressed (RSV1) and its size on the wire."""

    name = ExtensionName("permessage-deflate")

    def __init__(self, inner: Extension, seen: list[tuple[bool, int]]) -> None:
        self.inner, self.seen = inner, seen

    def decode(self, frame: Frame, *, max_size: int | None = None) -> Frame:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self.seen.append((frame.rsv1, len(frame.data)))
        return self.inner.decode(frame, max_size=max_size)

    def encode(self, frame: Frame) -> Frame:
        return self.inner.encode(frame)


def test_short_messages_go_out_uncompressed(healthy: Instance) -> None:
    """A client that negotiates permessage-deflate (every browser does) gets tokens and other
    short events uncompressed and long ones (sources) compressed; both decode to the same
    events, and the answer arrives whole."""
    seen: list[tuple[bool, int]] = []

    class Factory(ClientPerMessageDeflateFactory):
        def process_response_params(
            self, params: Sequence[ExtensionParameter], accepted: Sequence[Extension]
        ) -> Any:
            return _Recorded(super().process_response_params(params, accepted), seen)

    url = healthy.proc.url.replace("http://", "ws://") + "/ws"
    with ws_connect(url, compression=None, extensions=[Factory()], proxy=None) as ws:
        assert ws.response is not None
        assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
        ws.send(json.dumps({"type": "message", "text": "How do I ingest PDF files? [[tokens=20]]"}))
        events: list[Event] = []
        while not events or events[-1]["type"] != "ai.done":
            events.append(json.loads(ws.recv(timeout=30)))
    assert len(seen) == len(events)
    kinds = {e["type"]: compressed for e, (compressed, _) in zip(events, seen, strict=True)}
    assert kinds["ai.token"] is False and kinds["ai.sources"] is True, seen
    for (compressed, wire), event in zip(seen, events, strict=True):
        # the size of the server's JSON, give or take a float's digits
        size = len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode())
        if abs(size - COMPRESS_MIN_BYTES) > 16:
            assert compressed == (size > COMPRESS_MIN_BYTES), (event["type"], size, wire)
    message_id = events[-1]["message_id"]
    assert "".join(
        e["delta"] for e in events if e["type"] == "ai.token" and e["message_id"] == message_id
    ) == token_text(20)
