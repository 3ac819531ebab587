"""What rag_chat adds to a stream: the same token server read directly and through the server.

    .venv/bin/python benchmarks/relay_overhead.py --data-dir DIR [--collection NAME]
                     [--tokens 512] [--rounds 30] [--warmup 3] [--transports ws,sse]

A synthetic OpenAI-compatible server (``python -m rag_chat.testing.token_server``, its own
process) streams ``--tokens`` tokens per answer as fast as it can (rate 0). One client process
reads it, one answer at a time:

  (a) direct     the official ``openai`` SDK (``AsyncOpenAI``, ``stream=True``, the same request
                 parameters rag_chat sends: max_tokens, temperature, include_usage), with a
                 prompt of the size rag_chat builds (5 sources)
  (b) ws         through ``python -m rag_chat`` (``RAG_LLM_BASE_URL`` at the token server): a
                 ``message`` over a WebSocket (``websockets``; the connection is opened before
                 the clock starts), in a new private conversation each time
      sse        the same through ``POST /api/chat`` (``httpx`` streaming, one keep-alive
                 connection)

Rounds interleave the three (the order rotates each round), so drift in the machine's load
falls on all of them. Every (b) answer pays memory, retrieval over the index (hybrid, top 5)
and the room log (Redis DB 14, a key prefix of its own, deleted afterwards).

Tokens are counted in the text (token i is ``"t{i} "``), never from frames: the server merges
tokens for a client that falls behind. Figures:

  TTFT          send → first token
  stream tok/s  tokens after the first frame / (last token − first token): the relay's rate
  e2e tok/s     tokens / (last token − send): what one client sees, TTFT included
  TTFT added    (b)'s TTFT − the median of (a)'s: what rag_chat adds, retrieval included

Goals: stream tokens/s (b)/(a) ≥ 0.95 for one client; TTFT added p50 ≤ 15 ms. The server caps
an answer at 512 tokens (``rag_chat.chat.ANSWER_TOKENS``): ``--tokens`` above that is cut to it
on both sides. Without ``--data-dir`` the bundled guide (data/, a few dozen chunks) is ingested
into benchmarks/out/guide-index: a smoke run, not the benchmark (which needs ≥ 10,000 chunks).
Raw samples: benchmarks/out/relay_overhead.json; plots: relay_overhead_*.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from benchmarks._bench import (  # noqa: E402
    TOKEN,
    delete_prefix,
    describe_index,
    dist,
    fmt,
    guide_index,
    log_dir,
    machine_load,
    new_prefix,
    pct,
    plot_distributions,
    queries,
    save_json,
    start_rag_chat,
    start_token_server,
    verdict,
    wait_ready,
)
from rag_chat.chat import ANSWER_TOKENS, SYSTEM_PROMPT  # noqa: E402
from rag_chat.testing.token_server import token_text  # noqa: E402

TEMPERATURE = 0.2  # what rag_chat's backends send
SOURCE_CHARS = 1100  # about what one retrieved chunk adds to rag_chat's prompt
READ_TIMEOUT_S = 120.0
GOAL_RATIO = 0.95
GOAL_TTFT_ADDED_MS = 15.0

Sample = dict[str, Any]


def new_sample(kind: str, round_: int, question: str) -> Sample:
    return {"kind": kind, "round": round_, "question": question, "error": None}


def finish(s: Sample, t_send: float, stamps: list[tuple[float, int]], text: str, want: str) -> None:
    """Fill the timings of one answer from (arrival time, tokens in that frame) pairs."""
    tokens = len(TOKEN.findall(text))
    s["tokens"] = tokens
    s["frames"] = len(stamps)
    s["complete"] = text == want
    if not stamps:
        return
    t_first, first_n = stamps[0]
    t_last = stamps[-1][0]
    s["ttft_ms"] = (t_first - t_send) * 1000
    s["total_ms"] = (t_last - t_send) * 1000
    s["stream_s"] = t_last - t_first
    s["stream_tokens"] = tokens - first_n
    s["stream_tps"] = (tokens - first_n) / (t_last - t_first) if t_last > t_first else math.nan
    s["e2e_tps"] = tokens / (t_last - t_send)


def direct_messages(question: str) -> list[dict[str, str]]:
    """A prompt the size of rag_chat's: system prompt, 5 sources, the question."""
    filler = (question + " ") * (SOURCE_CHARS // (len(question) + 1) + 1)
    sources = "\n\n".join(f"[{n}] source {n}\n{filler[:SOURCE_CHARS]}" for n in range(1, 6))
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Sources:\n{sources}\n\nQuestion: {question}"},
    ]


async def run_direct(
    client: openai.AsyncOpenAI, model: str, question: str, want: str, s: Sample
) -> None:
    stamps: list[tuple[float, int]] = []
    parts: list[str] = []
    t_send = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model,
        messages=direct_messages(question),  # type: ignore[arg-type]
        max_tokens=ANSWER_TOKENS,
        temperature=TEMPERATURE,
        stream=True,
        stream_options={"include_usage": True},
    )
    async with stream:
        async for chunk in stream:
            if chunk.usage is not None:
                s["usage_tokens"] = chunk.usage.completion_tokens
            for choice in chunk.choices[:1]:
                content = choice.delta.content if choice.delta is not None else None
                if content:
                    stamps.append((time.perf_counter(), len(TOKEN.findall(content))))
                    parts.append(content)
    finish(s, t_send, stamps, "".join(parts), want)


def _server_side(s: Sample, event: dict[str, Any]) -> None:
    if event.get("type") == "ai.done":
        s["usage_tokens"] = (event.get("usage") or {}).get("completion_tokens")
        timings = event.get("timings") or {}
        s["server_retrieval_ms"] = timings.get("retrieval_ms")
        s["server_ttft_ms"] = timings.get("ttft_ms")
        s["finish_reason"] = event.get("finish_reason")
    else:
        s["error"] = f"{event.get('code')}: {event.get('message')}"


async def run_ws(url: str, question: str, want: str, s: Sample) -> None:
    stamps: list[tuple[float, int]] = []
    parts: list[str] = []
    async with connect(url, proxy=None, max_queue=None, open_timeout=30) as ws:
        t_send = time.perf_counter()
        event = {"type": "message", "text": question, "conversation_id": uuid.uuid4().hex}
        await ws.send(json.dumps(event))
        while True:
            raw = await asyncio.wait_for(ws.recv(), READ_TIMEOUT_S)
            now = time.perf_counter()
            event = json.loads(raw)
            kind = event.get("type")
            if kind == "ai.token":
                delta = event["delta"]
                stamps.append((now, len(TOKEN.findall(delta))))
                parts.append(delta)
            elif kind == "ai.sources":
                s["sources_ms"] = (now - t_send) * 1000
            elif kind in ("ai.done", "error"):
                _server_side(s, event)
                break
    finish(s, t_send, stamps, "".join(parts), want)


async def run_sse(client: httpx.AsyncClient, question: str, want: str, s: Sample) -> None:
    stamps: list[tuple[float, int]] = []
    parts: list[str] = []
    t_send = time.perf_counter()
    async with client.stream("POST", "/api/chat", json={"message": question}) as resp:
        if resp.status_code != 200:
            await resp.aread()
            s["error"] = f"HTTP {resp.status_code}: {resp.text[:200]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            now = time.perf_counter()
            event = json.loads(line[5:])
            kind = event.get("type")
            if kind == "ai.token":
                delta = event["delta"]
                stamps.append((now, len(TOKEN.findall(delta))))
                parts.append(delta)
            elif kind == "ai.sources":
                s["sources_ms"] = (now - t_send) * 1000
            elif kind in ("ai.done", "error"):
                _server_side(s, event)
                break
    finish(s, t_send, stamps, "".join(parts), want)


async def measure(args: argparse.Namespace, token_url: str, server_url: str) -> list[Sample]:
    want = token_text(min(args.tokens, ANSWER_TOKENS))
    asked = queries(scifact=args.data_dir is not None)
    client = openai.AsyncOpenAI(
        base_url=token_url + "/v1",
        api_key="unused",
        timeout=openai.Timeout(60.0, connect=5.0),  # what rag_chat's backend uses
        max_retries=2,
    )
    model = (await client.models.list()).data[0].id
    sse = httpx.AsyncClient(base_url=server_url, timeout=READ_TIMEOUT_S, trust_env=False)
    ws_url = server_url.replace("http://", "ws://") + "/ws"
    kinds = ["direct", *args.transports]
    samples: list[Sample] = []
    try:
        for r in range(args.warmup + args.rounds):
            question = asked[r % len(asked)]
            order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
            for kind in order:
                s = new_sample(kind, r - args.warmup, question)
                try:
                    if kind == "direct":
                        await run_direct(client, model, question, want, s)
                    elif kind == "ws":
                        await run_ws(ws_url, question, want, s)
                    else:
                        await run_sse(sse, question, want, s)
                except Exception as exc:  # one failed answer is a figure, not the end
                    s["error"] = s["error"] or f"{type(exc).__name__}: {exc}"
                if r >= args.warmup:
                    samples.append(s)
    finally:
        await client.close()
        await sse.aclose()
    return samples


def pooled_rate(rows: list[Sample], tokens_key: str, seconds_key: str) -> float:
    tokens = sum(s[tokens_key] for s in rows)
    seconds = sum(s[seconds_key] for s in rows)
    return tokens / seconds if seconds > 0 else math.nan


def report(args: argparse.Namespace, index_line: str, samples: list[Sample]) -> dict[str, Any]:
    n_tokens = min(args.tokens, ANSWER_TOKENS)
    kinds = ["direct", *args.transports]
    ok = {
        k: [s for s in samples if s["kind"] == k and s["error"] is None and "ttft_ms" in s]
        for k in kinds
    }
    for s in samples:
        s["e2e_s"] = s.get("total_ms", 0.0) / 1000
    names = {
        "direct": "(a) openai SDK, direct",
        "ws": "(b) rag_chat, WebSocket",
        "sse": "(b) rag_chat, SSE",
    }
    print(index_line)
    print(
        f"token server: {n_tokens} tokens per answer, rate 0 (as fast as it can); "
        f"{args.rounds} rounds (+{args.warmup} warm-up), order rotated each round"
    )
    if args.tokens > ANSWER_TOKENS:
        print(f"  (--tokens {args.tokens} cut to {ANSWER_TOKENS}: the server's answer cap)")
    print(
        f"\n{'':26}{'TTFT p50':>10}{'p99':>8}{'stream tok/s':>14}{'e2e tok/s':>11}"
        f"{'complete':>10}{'errors':>8}"
    )
    summary: dict[str, Any] = {}
    for k in kinds:
        rows = ok[k]
        ttft = [s["ttft_ms"] for s in rows]
        stream = pooled_rate(rows, "stream_tokens", "stream_s")
        e2e = pooled_rate(rows, "tokens", "e2e_s")
        complete = sum(bool(s.get("complete")) for s in rows)
        errors = sum(s["error"] is not None for s in samples if s["kind"] == k)
        summary[k] = {
            "ttft_ms": dist(ttft),
            "stream_tps": stream,
            "e2e_tps": e2e,
            "complete": complete,
            "runs": len(rows),
            "errors": errors,
        }
        print(
            f"{names[k]:26}{fmt(pct(ttft, 50)):>10}{fmt(pct(ttft, 99)):>8}{fmt(stream, 0):>14}"
            f"{fmt(e2e, 0):>11}{f'{complete}/{len(rows)}':>10}{errors:>8}"
        )
    direct_ttft = pct([s["ttft_ms"] for s in ok["direct"]], 50)
    print()
    for k in args.transports:
        rows = ok[k]
        ratio = summary[k]["stream_tps"] / summary["direct"]["stream_tps"]
        e2e_ratio = summary[k]["e2e_tps"] / summary["direct"]["e2e_tps"]
        added = [s["ttft_ms"] - direct_ttft for s in rows]
        sources = [s["sources_ms"] for s in rows if "sources_ms" in s]
        retrieval = [s["server_retrieval_ms"] for s in rows if s.get("server_retrieval_ms")]
        summary[k].update(
            ratio_stream=ratio,
            ratio_e2e=e2e_ratio,
            ttft_added_ms=dist(added),
            sources_ms=dist(sources),
            server_retrieval_ms=dist(retrieval),
        )
        print(
            f"{k}: stream tokens/s (b)/(a) = {ratio:.3f} (goal ≥ {GOAL_RATIO}: "
            f"{verdict(ratio >= GOAL_RATIO)}); end-to-end {e2e_ratio:.3f}"
        )
        print(
            f"{k}: TTFT added p50 {fmt(pct(added, 50))} ms, p99 {fmt(pct(added, 99))} ms "
            f"(goal p50 ≤ {GOAL_TTFT_ADDED_MS:g} ms: "
            f"{verdict(pct(added, 50) <= GOAL_TTFT_ADDED_MS)}); of which: send → ai.sources p50 "
            f"{fmt(pct(sources, 50))} ms, server's retrieval_ms p50 {fmt(pct(retrieval, 50))} / "
            f"p99 {fmt(pct(retrieval, 99))} ms"
        )
    bad = [s for s in samples if s["error"] is not None or not s.get("complete")]
    for s in bad[:5]:
        print(f"  failed: {s['kind']} round {s['round']}: {s['error'] or 'incomplete text'}")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="an ingested RAG_DATA_DIR (≥ 10,000 chunks)")
    parser.add_argument("--collection", default="docs", help="RAG_COLLECTION (default docs)")
    parser.add_argument("--tokens", type=int, default=ANSWER_TOKENS, help="tokens per answer")
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="rounds not measured (default 3)")
    parser.add_argument(
        "--transports", default="ws,sse", help="what (b) uses: ws, sse or both (default)"
    )
    args = parser.parse_args()
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not args.transports or set(args.transports) - {"ws", "sse"}:
        parser.error("--transports: ws, sse or ws,sse")
    smoke = args.data_dir is None
    if not smoke:
        queries(1, scifact=True)  # before anything starts: SciFact's questions must be there
    data_dir = guide_index() if smoke else args.data_dir.resolve()
    index_line = describe_index(data_dir, args.collection, smoke)

    prefix = new_prefix("relay")
    logs = log_dir("relay_overhead")
    token = start_token_server(logs, args.tokens, 0)
    server = None
    try:
        wait_ready([token], "/v1/models", 60)
        server = start_rag_chat(logs, data_dir, args.collection, token.url + "/v1", prefix)
        wait_ready([server], "/readyz")
        load_before = machine_load()
        samples = asyncio.run(measure(args, token.url, server.url))
        load = {"before": load_before, "after": machine_load()}
    finally:
        if server is not None:
            server.stop()
        token.stop()
        delete_prefix(prefix)
    summary = report(args, index_line, samples)
    print(
        f"machine load (1-min average) before {load['before']['load1']}, after "
        f"{load['after']['load1']}; busiest other processes before: "
        + ("; ".join(load["before"]["busiest"]) or "none over 5%")
    )
    path = save_json(
        "relay_overhead.json",
        {
            "args": {**vars(args), "data_dir": str(data_dir)},
            "index": index_line,
            "summary": summary,
            "machine_load": load,
            "samples": samples,
        },
    )
    plots = [
        plot_distributions(
            "relay_overhead_ttft.png",
            f"time to first token, {min(args.tokens, ANSWER_TOKENS)}-token answers",
            {
                k: [s["ttft_ms"] for s in samples if s["kind"] == k and "ttft_ms" in s]
                for k in ["direct", *args.transports]
            },
            "ms",
            log_x=True,
        ),
        plot_distributions(
            "relay_overhead_stream_tps.png",
            "tokens per second while streaming (first → last token), one answer each",
            {
                k: [s["stream_tps"] for s in samples if s["kind"] == k and "stream_tps" in s]
                for k in ["direct", *args.transports]
            },
            "tokens/s",
        ),
    ]
    print(f"\nraw samples: {path}; plots: " + ", ".join(str(p) for p in plots if p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
