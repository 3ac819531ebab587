"""Prometheus metrics. One registry per app, so tests and several apps in one process never
collide; ``/metrics`` serves it in the text format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("rag_ws_connections", "Open WebSocket connections", registry=r)
        self.replies_in_flight = Gauge("rag_replies_in_flight", "Replies streaming", registry=r)
        self.replies = Counter(
            "rag_replies_total", "Finished replies", ["transport", "finish_reason"], registry=r
        )
        self.tokens = Counter("rag_tokens_total", "Tokens streamed to clients", registry=r)
        self.errors = Counter("rag_errors_total", "Errors sent to clients", ["code"], registry=r)
        self.ttft = Histogram(
            "rag_time_to_first_token_seconds",
            "From request to first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.retrieval = Histogram(
            "rag_retrieval_seconds",
            "Hybrid retrieval latency",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2),
            registry=r,
        )

    def observe(self, transport: str, event: dict[str, object]) -> None:
        kind = event.get("type")
        if kind == "ai.token":
            self.tokens.inc()
        elif kind == "ai.done":
            self.replies.labels(transport, str(event.get("finish_reason"))).inc()
            timings = event.get("timings")
            if isinstance(timings, dict):
                if isinstance(timings.get("ttft_ms"), int | float):
                    self.ttft.observe(timings["ttft_ms"] / 1000)
                if isinstance(timings.get("retrieval_ms"), int | float):
                    self.retrieval.observe(timings["retrieval_ms"] / 1000)
        elif kind == "error":
            self.errors.labels(str(event.get("code"))).inc()
