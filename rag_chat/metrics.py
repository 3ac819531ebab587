"""Prometheus metrics. One registry per app, so tests and several apps in one process never
collide; ``/metrics`` serves it in the text format.

Where each is measured:

- per reply, once, where it is produced (``rag_chat.chat.Reply.events``, whatever the
  transport): replies in flight, time to first token, inter-token gap, tokens per second,
  retrieval latency (also ``/api/search``), LLM errors by kind, cancels by reason;
- per delivery to a client (``observe``): tokens and errors sent, finished replies by transport;
- by the transports: connections, messages posted, resumes, dropped slow consumers;
- rate-limit hits through ``rag_chat.limits.Limits.on_hit``; rooms when scraped; event-loop
  lag by :func:`watch_loop_lag`, a task of the app's lifespan; garbage-collector pauses by
  :func:`watch_gc`, installed for the app's lifespan.

Labels only ever take a handful of values fixed in code (no room, user or message ids).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LLM_ERROR_CODES = ("llm_error", "llm_unavailable", "llm_timeout")
LIMITS = ("messages", "replies", "connections")
CANCEL_REASONS = ("user", "abandoned", "server_shutdown")
TRANSPORTS = ("ws", "sse", "openai")
RESUME_TRANSPORTS = ("ws", "sse")
LOOP_LAG_INTERVAL_S = 0.1

# seconds
_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
_GAP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_LAG = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# tokens per second
_RATE = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("rag_ws_connections", "Open WebSocket connections", registry=r)
        self.rooms = Gauge(
            "rag_rooms",
            "Rooms this instance follows: with a member, an SSE stream or a reply here",
            registry=r,
        )
        self.messages = Counter(
            "rag_messages_total",
            "User messages posted through this instance, by transport",
            ["transport"],
            registry=r,
        )
        self.replies_in_flight = Gauge(
            "rag_replies_in_flight", "AI replies generating on this instance", registry=r
        )
        self.replies = Counter(
            "rag_replies_total",
            "Finished replies delivered, by transport",
            ["transport", "finish_reason"],
            registry=r,
        )
        self.tokens = Counter("rag_tokens_total", "Tokens streamed to clients", registry=r)
        self.errors = Counter("rag_errors_total", "Errors sent to clients", ["code"], registry=r)
        self.ttft = Histogram(
            "rag_time_to_first_token_seconds",
            "From the start of a reply to its first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.admit = Histogram(
            "rag_reply_admit_seconds",
            "From a question's arrival to the start of its reply: limits, the question written "
            "to the room log and memory (over WebSocket, a conversation's first question also "
            "its access check and join)",
            buckets=_LATENCY,
            registry=r,
        )
        self.inter_token = Histogram(
            "rag_inter_token_seconds",
            "Gap between consecutive tokens of a reply, as produced",
            buckets=_GAP,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "rag_reply_tokens_per_second",
            "Completion tokens per second of generation, one observation per reply",
            buckets=_RATE,
            registry=r,
        )
        self.retrieval = Histogram(
            "rag_retrieval_seconds",
            "Retrieval latency (every reply and /api/search)",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2),
            registry=r,
        )
        self.searches = Counter(
            "rag_searches_total",
            "A reply's searches, by where they ran: the search process, or a worker thread "
            "of the server (the process is off, starting, gone, or owes MAX_PENDING already)",
            ["where"],
            registry=r,
        )
        self.search_process_ready = Gauge(
            "rag_search_process_ready",
            "1 while the search process answers, 0 while searches run in the server",
            registry=r,
        )
        self.llm_errors = Counter(
            "rag_llm_errors_total", "LLM failures, by error code", ["code"], registry=r
        )
        self.rate_limit_hits = Counter(
            "rag_rate_limit_hits_total", "Requests refused by a limit", ["limit"], registry=r
        )
        self.cancels = Counter(
            "rag_cancels_total", "Replies cancelled, by reason", ["reason"], registry=r
        )
        self.feedback = Counter(
            "rag_answer_feedback_total",
            "Ratings given to answers (up, down) and taken back (cleared)",
            ["rating"],
            registry=r,
        )
        self.resumes = Counter(
            "rag_resumes_total",
            "Resumes: WS join with last_seq, SSE Last-Event-ID",
            ["transport"],
            registry=r,
        )
        self.slow_consumers = Counter(
            "rag_slow_consumers_dropped_total",
            "WebSockets closed with 1013 because the client could not keep up",
            registry=r,
        )
        self.loop_lag = Histogram(
            "rag_event_loop_lag_seconds",
            f"How late a {LOOP_LAG_INTERVAL_S:g} s sleep of the event loop wakes up",
            buckets=_LAG,
            registry=r,
        )
        self.gc_pause = Histogram(
            "rag_gc_pause_seconds",
            "Pauses of the server process's Python garbage collector (every thread, the event "
            "loop's included, waits them out), by generation",
            ["generation"],
            buckets=_LAG,
            registry=r,
        )
        self.gc_frozen = Gauge(
            "rag_gc_frozen_objects",
            "Objects exempt from garbage collection: what the server held when it had started "
            "(0: not frozen)",
            registry=r,
        )
        self.gc_frozen.set_function(gc.get_freeze_count)
        # every series exists from the start, at 0: rate() sees the first increment
        for generation in ("0", "1", "2"):
            self.gc_pause.labels(generation)
        for code in LLM_ERROR_CODES:
            self.llm_errors.labels(code)
        for limit in LIMITS:
            self.rate_limit_hits.labels(limit)
        for reason in CANCEL_REASONS:
            self.cancels.labels(reason)
        for transport in TRANSPORTS:
            self.messages.labels(transport)
        for transport in RESUME_TRANSPORTS:
            self.resumes.labels(transport)

    def observe(self, transport: str, event: dict[str, object]) -> None:
        """One event delivered to one client (per-reply timings are measured at the source)."""
        kind = event.get("type")
        if kind == "ai.token":
            self.tokens.inc()
        elif kind == "ai.done":
            self.replies.labels(transport, str(event.get("finish_reason"))).inc()
        elif kind == "error":
            self.errors.labels(str(event.get("code"))).inc()

    def rate_limited(self, limit: str) -> None:
        """``Limits.on_hit``: one request refused by ``limit``."""
        self.rate_limit_hits.labels(limit if limit in LIMITS else "other").inc()

    def cancelled(self, reason: str | None) -> None:
        self.cancels.labels(reason if reason in CANCEL_REASONS else "other").inc()


async def watch_loop_lag(histogram: Histogram, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
    """Sleep ``interval_s`` again and again and record how late each wake-up is: the time
    callbacks wait for a loop that something blocks (CPU work, a blocking call)."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval_s)
        histogram.observe(max(0.0, loop.time() - start - interval_s))


def watch_gc(histogram: Histogram) -> Callable[[], None]:
    """Record each garbage collection's pause in ``histogram`` (by generation) until the
    returned function is called. With ``RAG_GC_METRICS`` only: a collection can start at any
    allocation, also one made at the recursion limit, where calling this Python callback
    fails. A full collection holds the GIL for as long as it scans: before the server froze
    its start-up objects (:func:`tune_gc`) one took up to 230 ms at 250 streaming clients."""
    started = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif started[0]:
            histogram.labels(str(info["generation"])).observe(time.perf_counter() - started[0])

    gc.callbacks.append(callback)

    def stop() -> None:
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)

    return stop


GC_GEN0_THRESHOLD = 10_000  # Python's default: 700


def tune_gc() -> None:
    """The garbage collector for a long-running server, called once it has started:

    - collect once, then exempt every object alive now (modules, the app, the loaded index and
      models: ~230,000 tracked objects) from later collections, which would scan them again
      and again with the GIL held: at 250 streaming clients the server's full collections
      took up to 230 ms each, and the event loop waited them out;
    - a young-generation collection after 10,000 new container objects, not 700: at 1,000
      streaming clients the server spent 8.3 s of a 45 s run in 1,759 collections (3.2 s in
      the youngest generation alone, ~2 ms each whatever its size); with 10,000, 1.3 s in 64.
      (The count is allocations less deallocations, old objects' included, so such a
      collection finds 15,000-52,000 objects there; switching collection off altogether
      changed nothing at 200 clients: benchmarks/README.md, 27 Nov, late evening.)

    Measured with ``rag_gc_pause_seconds`` (benchmarks/concurrency.py prints it per level)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
