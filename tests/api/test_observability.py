"""Observability on the real app (real Redis and retrieval, a scripted FakeLLM): the metrics move
as they should, readiness names what is down, JSON logs carry request and connection ids,
X-Request-ID round-trips, the WebSocket trace logs every event, uvicorn logs through the same
formatter, and the Grafana dashboard queries only metrics the app serves."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.sync.client import connect as ws_connect

from rag_chat.api import ws as ws_module
from rag_chat.app import create_app
from rag_chat.llm.fake import FakeLLM
from rag_chat.logs import (
    TRACE_LOGGER,
    configure_logging,
    conn_id,
    make_handler,
    request_id,
)
from rag_chat.memory.redis import RedisMemory
from rag_chat.metrics import Metrics, watch_gc
from rag_chat.retrieval.embedder import Embedder
from rag_chat.services import Services
from rag_chat.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "rag_chat.json"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: TestClient) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def until(ws: WebSocketTestSession, *types: str) -> dict[str, Any]:
    while True:
        event: dict[str, Any] = ws.receive_json()
        if event["type"] in (*types, "error"):
            return event


def sse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


@pytest.fixture
def log_lines() -> Iterator[Callable[[str], list[dict[str, Any]]]]:
    """JSON log lines of a logger, captured through the app's own handler (formatter and id
    filter) while the test runs: ``lines(logger_name)``."""
    attached: list[tuple[logging.Logger, logging.Handler, int]] = []
    buffers: dict[str, io.StringIO] = {}

    def lines(name: str) -> list[dict[str, Any]]:
        if name not in buffers:
            logger = logging.getLogger(name)
            buffers[name] = io.StringIO()
            handler = make_handler("json", buffers[name])
            attached.append((logger, handler, logger.level))
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)
        return [json.loads(line) for line in buffers[name].getvalue().splitlines()]

    yield lines
    for logger, handler, level in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_metrics_follow_answers_cancels_resumes_and_limits(
    make_app: Any, server_settings: Settings
) -> None:
    settings = server_settings.model_copy(update={"rate_limit_per_minute": 3, "gc_metrics": True})
    llm = FakeLLM(delay=0.02)
    with TestClient(make_app(llm, settings)) as client:
        before = scrape(client)
        assert value(before, "rag_ws_connections") == 0 and value(before, "rag_rooms") == 0
        # every labelled series exists from the start, at 0
        for code in ("llm_error", "llm_unavailable", "llm_timeout"):
            assert ("rag_llm_errors_total", (("code", code),)) in before
        for reason in ("user", "abandoned", "server_shutdown"):
            assert value(before, "rag_cancels_total", reason=reason) == 0

        with client.websocket_connect("/ws") as ws:
            # 1. an answer: 3 tokens, so 2 gaps between them
            llm.enqueue(["Run ", "`python -m ingest`", " [1]."])
            ws.send_json({"type": "message", "text": "How do I ingest PDF files?"})
            start = until(ws, "ai.start")
            done = until(ws, "ai.done")
            assert done["finish_reason"] == "stop"
            # from the question's arrival to the reply's start (the access check, the join,
            # limits, the question written): measured, and part of what the client waited
            assert 0 < done["timings"]["admit_ms"] < 10_000
            room = start["conversation_id"]
            m = scrape(client)
            assert value(m, "rag_messages_total", transport="ws") == 1
            assert value(m, "rag_ws_connections") == 1
            assert value(m, "rag_rooms") == 1
            assert value(m, "rag_time_to_first_token_seconds_count") == 1
            assert value(m, "rag_reply_admit_seconds_count") == 1
            assert value(m, "rag_reply_admit_seconds_sum") == pytest.approx(
                done["timings"]["admit_ms"] / 1000, abs=1e-4
            )
            assert value(m, "rag_inter_token_seconds_count") == 2
            assert value(m, "rag_inter_token_seconds_sum") >= 0.02  # FakeLLM's delay, twice
            assert value(m, "rag_reply_tokens_per_second_count") == 1
            assert value(m, "rag_retrieval_seconds_count") == 1
            assert value(m, "rag_tokens_total") == 3
            assert value(m, "rag_replies_total", transport="ws", finish_reason="stop") == 1
            eventually(
                lambda: value(scrape(client), "rag_replies_in_flight") == 0, "reply not counted out"
            )

            # 2. a cancel: in flight while it streams, then counted by reason
            llm.enqueue([f"tok{i} " for i in range(200)])
            ws.send_json(
                {"type": "message", "text": "Tell me all about Redis", "conversation_id": room}
            )
            reply = until(ws, "ai.start")["message_id"]
            until(ws, "ai.token")
            assert value(scrape(client), "rag_replies_in_flight") == 1
            ws.send_json({"type": "cancel", "message_id": reply})
            done = until(ws, "ai.done")
            assert done["finish_reason"] == "cancelled" and done["cancel_reason"] == "user"
            m = scrape(client)
            assert value(m, "rag_cancels_total", reason="user") == 1
            assert value(m, "rag_cancels_total", reason="abandoned") == 0
            assert value(m, "rag_replies_total", transport="ws", finish_reason="cancelled") == 1

            # 3. a WS resume: another connection joins the conversation with its last seq
            with client.websocket_connect("/ws") as again:
                again.send_json({"type": "join", "room": room, "private": True, "last_seq": 1})
                assert until(again, "joined")["room"] == room
                eventually(
                    lambda: value(scrape(client), "rag_resumes_total", transport="ws") == 1,
                    "WS resume not counted",
                )
                assert value(scrape(client), "rag_ws_connections") == 2

            # 4. an SSE answer, then an SSE resume with Last-Event-ID (not a new message)
            llm.enqueue(["Port ", "8000."])
            r = client.post("/api/chat", json={"message": "Which port?"})
            events = sse_events(r.text)
            sse_start = next(e for e in events if e["type"] == "ai.start")
            r = client.post(
                "/api/chat",
                json={"message": "Which port?", "conversation_id": sse_start["conversation_id"]},
                headers={"Last-Event-ID": str(sse_start["seq"])},
            )
            assert r.status_code == 200 and sse_events(r.text)[-1]["type"] == "ai.done"
            m = scrape(client)
            assert value(m, "rag_resumes_total", transport="sse") == 1
            assert value(m, "rag_messages_total", transport="sse") == 1
            assert value(m, "rag_retrieval_seconds_count") == 3
            assert value(m, "rag_time_to_first_token_seconds_count") == 3
            assert value(m, "rag_reply_admit_seconds_count") == 3
            assert sse_events(r.text)[-1]["timings"]["admit_ms"] > 0

            # 5. the fourth message in a minute is refused (limit 3): a rate-limit hit
            ws.send_json({"type": "message", "text": "one more", "conversation_id": room})
            assert until(ws, "message")["code"] == "rate_limited"
            m = scrape(client)
            assert value(m, "rag_rate_limit_hits_total", limit="messages") == 1
            assert value(m, "rag_rate_limit_hits_total", limit="replies") == 0
            assert value(m, "rag_messages_total", transport="ws") == 2  # refused: not posted
            assert value(m, "rag_errors_total", code="rate_limited") == 1

        # retrieval alone is measured too
        assert client.post("/api/search", json={"query": "Redis"}).status_code == 200
        m = scrape(client)
        assert value(m, "rag_retrieval_seconds_count") == 4
        assert value(m, "rag_ws_connections") == 0
        eventually(lambda: value(scrape(client), "rag_rooms") == 0, "rooms not released")
        eventually(
            lambda: value(scrape(client), "rag_event_loop_lag_seconds_count") > 0,
            "the event-loop lag probe did not run",
        )
        lag = scrape(client)
        # the 1 ms bucket exists (p99 needs it) and every wake-up is in +Inf
        assert ("rag_event_loop_lag_seconds_bucket", (("le", "0.001"),)) in lag
        assert value(lag, "rag_event_loop_lag_seconds_bucket", le="+Inf") == value(
            lag, "rag_event_loop_lag_seconds_count"
        )
        # garbage-collector pauses (RAG_GC_METRICS), by generation: a full collection here
        # is one more
        before = value(lag, "rag_gc_pause_seconds_count", generation="2")
        gc.collect()
        assert value(scrape(client), "rag_gc_pause_seconds_count", generation="2") == before + 1


def test_the_gc_watch_records_pauses_until_stopped() -> None:
    metrics = Metrics()
    stop = watch_gc(metrics.gc_pause)
    gc.collect()
    gc.collect(1)
    stop()
    gc.collect()
    samples = {
        s.labels["generation"]: s.value
        for family in metrics.registry.collect()
        if family.name == "rag_gc_pause_seconds"
        for s in family.samples
        if s.name.endswith("_count")
    }
    # one full collection while watched (automatic ones of the younger generations may add
    # to those), none after stop
    assert samples["2"] == 1 and samples["1"] >= 1


def test_a_slow_consumer_is_dropped_and_counted(
    make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that never takes a frame: after SEND_TIMEOUT_S the connection is closed with
    1013 (a real client that stops reading: tests/faults/test_client_faults.py)."""
    monkeypatch.setattr(ws_module, "SEND_TIMEOUT_S", 0.3)

    async def never_taken(self: WebSocket, data: str) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(WebSocket, "send_text", never_taken)
    with TestClient(make_app(FakeLLM())) as client:
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "ping"})  # its pong is the frame never taken
            t0 = time.monotonic()
            with pytest.raises(WebSocketDisconnect) as info:
                ws.receive_json()
            assert info.value.code == ws_module.CLOSE_TOO_SLOW
            assert 0.3 <= time.monotonic() - t0 < 10
        m = scrape(client)
        assert value(m, "rag_slow_consumers_dropped_total") == 1
        assert value(m, "rag_errors_total", code="too_slow") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_readyz_names_what_is_down_and_llm_errors_are_counted(
    server_settings: Settings, embedder: Embedder, redis_prefix: str
) -> None:
    # conversation memory on a port where nothing listens, and an LLM that cannot be reached;
    # the room log and the limits keep the working Redis
    dead = f"redis://127.0.0.1:{free_port()}/13"
    llm = FakeLLM(unavailable="the LLM backend is down")

    async def factory(s: Settings) -> Services:
        memory = RedisMemory.from_url(dead, prefix=redis_prefix)
        return await Services.open(s, llm=llm, memory=memory, embedder=embedder)

    with TestClient(create_app(server_settings, services_factory=factory)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}  # alive all the same
        r = client.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "not ready"
        checks = body["checks"]
        assert checks["memory"]["ok"] is False and checks["memory"]["error"]
        assert checks["llm"] == {"ok": False, "error": "the LLM backend is down"}
        assert checks["vector_store"]["ok"] is True
        r = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "llm_unavailable"
        m = scrape(client)
        assert value(m, "rag_llm_errors_total", code="llm_unavailable") == 1
        assert value(m, "rag_llm_errors_total", code="llm_error") == 0
        assert value(m, "rag_messages_total", transport="openai") == 1
        assert value(m, "rag_replies_in_flight") == 0


def test_x_request_id_round_trips_and_tags_the_logs(
    make_app: Any, log_lines: Callable[[str], list[dict[str, Any]]]
) -> None:
    app: FastAPI = make_app(FakeLLM())
    log = logging.getLogger("rag_chat.test_observability")

    @app.get("/_log")
    async def _log() -> dict[str, str]:
        log.info("inside the request")
        return {}

    log_lines(log.name)  # capture from now on
    client = TestClient(app)  # no lifespan: neither route needs the services
    r = client.get("/healthz", headers={"X-Request-ID": "req-42.a:b"})
    assert r.headers["x-request-id"] == "req-42.a:b"
    generated = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    for insane in ("two words", "x" * 200, "-starts-with-a-dash", 'quote"d'):
        echoed = client.get("/healthz", headers={"X-Request-ID": insane}).headers["x-request-id"]
        assert echoed != insane and re.fullmatch(r"[0-9a-f]{32}", echoed)
    assert client.get("/_log", headers={"X-Request-ID": "trace-7"}).status_code == 200
    (line,) = log_lines(log.name)
    assert line["request_id"] == "trace-7" and line["message"] == "inside the request"
    assert {"ts", "level", "logger"} <= line.keys() and "conn_id" not in line
    assert request_id.get() is None  # nothing leaks out of the request


def test_json_formatter_writes_one_object_per_line() -> None:
    buf = io.StringIO()
    handler = make_handler("json", buf)
    logger = logging.getLogger("rag_chat.test_json_formatter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        token = conn_id.set("c0ffee")
        try:
            logger.warning("two\nlines %s", "here", extra={"room_count": 3})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        finally:
            conn_id.reset(token)
        logger.warning("no ids")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    first, second, third = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first["message"] == "two\nlines here" and first["level"] == "WARNING"
    assert first["conn_id"] == "c0ffee" and first["room_count"] == 3
    assert first["logger"] == "rag_chat.test_json_formatter"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert "ValueError: boom" in second["exc"] and second["level"] == "ERROR"
    assert "conn_id" not in third and "request_id" not in third


def test_ws_trace_logs_every_event_with_the_connection_id(
    make_app: Any, server_settings: Settings, log_lines: Callable[[str], list[dict[str, Any]]]
) -> None:
    log_lines(TRACE_LOGGER)  # capture from now on; the logger's level is restored afterwards
    trace = logging.getLogger(TRACE_LOGGER)
    trace.setLevel(logging.INFO)
    settings = server_settings.model_copy(update={"trace_ws": True})
    app = make_app(FakeLLM(), settings)  # RAG_TRACE_WS=true turns the trace logger on
    assert trace.isEnabledFor(logging.DEBUG)
    long_text = "word " * 200
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as a:
            a.send_json({"type": "join", "room": "traced"})
            until(a, "joined")
            a.send_json({"type": "message", "room": "traced", "text": long_text})
            until(a, "message")
            a.send_json({"type": "auth", "token": "secret-token-value"})
            assert until(a, "error")["code"] == "bad_request"
        with client.websocket_connect("/ws") as b:
            b.send_json({"type": "ping"})
            assert b.receive_json() == {"type": "pong"}
    records = log_lines(TRACE_LOGGER)
    assert "secret-token-value" not in json.dumps(records)
    ids = {r.get("conn_id") for r in records}
    assert None not in ids and len(ids) == 2  # every line names its connection; two of them
    by_conn: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_conn.setdefault(r["conn_id"], []).append(r)
    first, second = sorted(by_conn.values(), key=len, reverse=True)
    seen = [(r.get("direction"), r.get("event", {}).get("type")) for r in first]
    for expected in [
        ("recv", "join"),
        ("send", "joined"),
        ("send", "presence"),
        ("recv", "message"),
        ("send", "message"),
        ("recv", "auth"),
        ("send", "error"),
    ]:
        assert expected in seen, (expected, seen)
    sent = next(
        r for r in first if r.get("direction") == "send" and r["event"]["type"] == "message"
    )
    assert sent["event"]["room"] == "traced" and sent["event"]["seq"] >= 1
    assert len(sent["event"]["text"]) <= 201 and sent["event"]["text_chars"] == len(long_text)
    assert sent["size"] > len(long_text) and len(sent["message"]) < len(long_text)
    assert [(r["direction"], r["event"]["type"]) for r in second if "event" in r] == [
        ("recv", "ping"),
        ("send", "pong"),
    ]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    names = ["uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", TRACE_LOGGER]
    saved = [
        (lg, list(lg.handlers), lg.propagate, lg.level)
        for lg in [root, *map(logging.getLogger, names)]
    ]
    yield
    for lg, handlers, propagate, level in saved:
        lg.handlers[:] = handlers
        lg.propagate = propagate
        lg.setLevel(level)


def test_uvicorn_logs_go_through_the_json_formatter(make_app: Any, restore_logging: None) -> None:
    buf = io.StringIO()
    configure_logging("info", "json", trace_ws=True, stream=buf)
    port = free_port()
    # as python -m rag_chat runs it: log_config=None leaves the logging set up above
    config = uvicorn.Config(
        make_app(FakeLLM()), host="127.0.0.1", port=port, log_config=None, log_level="info"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: server.started, "uvicorn did not start", timeout=120)
        url = f"http://127.0.0.1:{port}"
        r = httpx.get(url + "/healthz", headers={"X-Request-ID": "probe-1"})
        assert r.headers["x-request-id"] == "probe-1"
        with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            ws.send(json.dumps({"type": "ping"}))
            assert json.loads(ws.recv(timeout=10)) == {"type": "pong"}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]  # every line is JSON
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    messages = {line["message"] for line in lines}
    assert "Application startup complete." in messages
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    probe = next(line for line in access if line.get("path") == "/healthz")
    assert probe["request_id"] == "probe-1" and probe["status"] == 200 and probe["method"] == "GET"
    accepted = next(line for line in lines if "[accepted]" in line["message"])
    assert accepted["request_id"]
    traced = [line for line in lines if line["logger"] == TRACE_LOGGER]
    pong = next(line for line in traced if line.get("event", {}).get("type") == "pong")
    assert pong["conn_id"] and pong["request_id"] == accepted["request_id"]
    assert not any("color_message" in line for line in lines)


_METRIC = re.compile(r"\brag_[a-z0-9_]+")


def series_names(family: str, kind: str) -> set[str]:
    """The names PromQL can query for a family (also before a labelled counter has a child)."""
    if kind == "counter":
        return {family + "_total"}
    if kind == "histogram":
        return {family + suffix for suffix in ("_bucket", "_count", "_sum")}
    return {family}


def dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    """Every metric name a panel or a template variable queries."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return {name for expr in exprs for name in _METRIC.findall(expr)}


def test_the_grafana_dashboard_queries_only_metrics_the_app_serves(make_app: Any) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    # importable: the data source is an input, used by every panel, target and variable
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for p in panels:
        assert p["datasource"] == ds and p["targets"], p["title"]
        assert all(t["datasource"] == ds for t in p["targets"]), p["title"]
    assert all(v["datasource"] == ds for v in dashboard["templating"]["list"])

    with TestClient(make_app(FakeLLM())) as client:
        text = client.get("/metrics").text
    families = [
        f
        for f in text_string_to_metric_families(text)
        # the text format shows a counter's or histogram's start time as a gauge of its own
        if f.name.startswith("rag_") and not f.name.endswith("_created")
    ]
    served = {name: f.name for f in families for name in series_names(f.name, f.type)}
    queried = dashboard_metrics(dashboard)
    assert queried - served.keys() == set(), "the dashboard queries metrics the app lacks"
    # and every rag_ metric the app serves is on the dashboard
    shown = {served[name] for name in queried}
    assert {f.name for f in families} - shown == set(), "metrics missing from the dashboard"
    # the panels the issue asks for
    titles = " | ".join(p["title"] for p in panels)
    for words in ["connections", "Rooms", "Messages per minute", "Replies in flight",
                  "Time to first token", "Inter-token", "Tokens per second", "Retrieval",
                  "LLM errors", "Rate-limit", "Cancels", "Resumes", "slow consumers",
                  "Event-loop lag p99"]:  # fmt: skip
        assert words in titles, words
