"""Many clients at once: C WebSockets, each streaming paced answers from rag_chat.

    .venv/bin/python benchmarks/concurrency.py --data-dir DIR [--collection NAME]
                     [--clients 1000 | --sweep 100,250,500,1000,1500] [--instances 1]
                     [--tokens 200] [--rate 20] [--ramp S] [--duration 20]
    .venv/bin/python benchmarks/concurrency.py --data-dir DIR --idle 10000

Load test (one level per client count): a token server paced at ``--rate`` tokens/s per stream
and ``python -m rag_chat`` (``RAG_LLM_BASE_URL`` at it; Redis DB 14, its own key prefix, deleted
afterwards; the per-user caps raised) run as processes of their own. This process is the load
generator: one asyncio loop, C ``websockets`` clients, each in a private conversation of its
own. All C connect first; then each starts at a random moment within ``--ramp`` seconds (one
answer's length by default) and asks its question (client i: SciFact claim i, cycled;
``--same-question``: the first claim for all) — the claim alone, as a user would ask it: the
token server is started with ``--tokens``/``--rate`` (a 200-token answer at 20 tokens/s) —
again and again in the same conversation, until ``--duration``
seconds after the ramp; the answers in flight then finish. A question the server answers
"don't know" (nothing relevant in the index: no LLM, no paced answer) is not asked again: its
client takes the next claim nobody has found unanswerable. Clients are spread over source
addresses 127.0.0.1, 127.0.0.2, … (at most 500 per address: in open mode the per-user caps
count per address, and RAG_MAX_REPLIES_PER_USER cannot exceed 1,000).

Per level: aggregate tokens/s delivered in the steady window (after the ramp) next to the ideal
C × rate; p50/p99 time to first token (send → first ``ai.token`` frame) and inter-token gap
(from frame arrival times, per answer; a frame that carries several tokens — the server merges
tokens for a client that falls behind — counts them as arriving together); errors; whether
every token arrived (each answer's text is exactly ``t0 t1 … t199``; an answer the
server gives as "don't know", having found nothing relevant, is whole without the LLM and
counts apart); where TTFT went (p50/p99 of each part, from ``ai.done``'s timings): admit
(the question's arrival → its reply's start), the reply's start → its first token, and the
rest (the question's way in and the first token's way out); CPU taken by the load generator,
the server, its search process, the token server and Redis (/proc); the server's own
event-loop lag p99 (its /metrics histogram: a bucket bound) and the load generator's. A level
*holds* when p99 gap ≤ 100 ms, p99 TTFT ≤ 300 ms, no errors and every token arrived;
``--sweep`` reports the knee. ``--instances N``: N servers on the same Redis and index, the
connections spread over them in turn (as a proxy in front of them would); their CPU is added
up, the loop lag is the worst instance's.

``--idle N``: memory per idle connection: the server's RSS before, with N open WebSockets, and
with each of them also joined to a private conversation (what the browser UI does), divided by N;
then all N close at once: how long until the server has let them go, and its CPU for that.

Without ``--data-dir`` the bundled guide (data/) is the index: a smoke run. Raw samples:
benchmarks/out/concurrency.json (or concurrency_idle.json); plots: concurrency_*.png
(``_nodeflate`` added to the names with ``--no-deflate``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from benchmarks._bench import (  # noqa: E402
    REDIS_URL,
    TOKEN,
    CpuMeter,
    counter_delta,
    cpu_seconds,
    delete_prefix,
    describe_index,
    dist,
    find_pid,
    fmt,
    guide_index,
    histogram_quantile,
    log_dir,
    machine_load,
    new_prefix,
    pct,
    plot_distributions,
    plot_lines,
    queries,
    raise_open_files,
    rss_bytes,
    save_json,
    scrape,
    search_process_pid,
    start_rag_chat,
    start_token_server,
    wait_ready,
)
from rag_chat.testing.token_server import token_text  # noqa: E402

GOAL_GAP_MS = 100.0
GOAL_TTFT_MS = 300.0
# RAG_MAX_REPLIES_PER_USER's ceiling is 1,000 and open mode counts per client address; a client
# asks again the moment its answer's ai.done arrives, a moment before the server releases that
# answer's slot, so an address at the cap briefly holds one more: 500 per address keeps the
# load test from measuring the cap (1,000 clients on one address got ~30 too_many_replies)
PER_ADDRESS = 500
CONNECTS_AT_ONCE = 100
LAG_PROBE_S = 0.1


@dataclass
class Answer:
    client: int
    t_send: float
    frames: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in it)
    parts: list[str] = field(default_factory=list)
    error: str | None = None
    finish: str | None = None
    # the server found nothing relevant and said so without the LLM (its "don't know"): a
    # whole answer, with no token from the token server
    no_match: bool = False
    complete: bool = False
    done: bool = False
    # the server's own figures, from ai.done's timings: admit (the question's arrival → the
    # reply's start), retrieval, and the reply's start → its first token
    admit_ms: float | None = None
    retrieval_ms: float | None = None
    server_ttft_ms: float | None = None

    def rest_ms(self) -> float | None:
        """What TTFT spent outside the server's two timings: the question's way in, the
        first token's way out (its room-log append and fan-out, the socket) and the load
        generator's own read."""
        if not self.frames or self.admit_ms is None or self.server_ttft_ms is None:
            return None
        return (self.frames[0][0] - self.t_send) * 1000 - self.admit_ms - self.server_ttft_ms

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.frames)

    def gaps_ms(self) -> list[float]:
        out: list[float] = [0.0] * max(0, self.frames[0][1] - 1) if self.frames else []
        for (t0, _), (t1, n) in zip(self.frames, self.frames[1:], strict=False):
            out.append((t1 - t0) * 1000)
            out.extend([0.0] * (n - 1))
        return out


async def open_clients(
    urls: list[str], n: int, addresses: int, deflate: bool
) -> list[ClientConnection]:
    """``n`` connections, spread in turn over the servers at ``urls`` (what a load balancer in
    front of several instances would do)."""
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)

    async def one(i: int) -> ClientConnection:
        async with gate:
            return await connect(
                urls[i % len(urls)],
                proxy=None,
                max_queue=None,
                open_timeout=60,
                compression="deflate" if deflate else None,
                local_addr=(f"127.0.0.{1 + i % addresses}", 0),
            )

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def close_clients(clients: list[ClientConnection]) -> None:
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE * 2)

    async def one(ws: ClientConnection) -> None:
        async with gate:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 10)

    await asyncio.gather(*(one(ws) for ws in clients))


async def lag_probe(lags: list[float]) -> None:
    while True:
        t = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_S)
        lags.append((time.perf_counter() - t - LAG_PROBE_S) * 1000)


class QuestionPool:
    """The clients' questions. Client i starts with question i (cycled); a question the server
    answered "don't know" (nothing relevant in the index) is not asked again: its client takes
    the next one nobody has found unanswerable. A client that repeated it would ask again the
    moment the answer came — as fast as the server answers without the LLM, dozens of times a
    second between a few clients — load that is not the benchmark's (every client streaming a
    paced answer), which took a third of the search process's work at 500 clients."""

    def __init__(self, questions: list[str], start: int) -> None:
        self.questions = questions
        self.unanswerable: set[str] = set()
        self.replaced = 0
        self._next = start

    def first(self, i: int) -> str:
        return self.questions[i % len(self.questions)]

    def instead_of(self, question: str) -> str:
        """The question to ask after ``question`` got a "don't know" (itself if none is left)."""
        self.unanswerable.add(question)
        for _ in range(len(self.questions)):
            candidate = self.questions[self._next % len(self.questions)]
            self._next += 1
            if candidate not in self.unanswerable:
                self.replaced += 1
                return candidate
        return question


async def client_loop(
    i: int,
    ws: ClientConnection,
    pool: QuestionPool,
    start_at: float,
    stop_asking: float,
    want: str,
    answers: list[Answer],
    read_timeout: float,
) -> None:
    conversation = f"bench-{uuid.uuid4().hex}"
    question = pool.first(i)
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    while True:
        answer = Answer(i, time.perf_counter())
        answers.append(answer)
        try:
            await ws.send(
                json.dumps({"type": "message", "text": question, "conversation_id": conversation})
            )
            # one deadline for the whole answer, not a wait_for per message: a task and a
            # timer per token were a fifth of this process's CPU at 1,000 clients (py-spy)
            async with asyncio.timeout(read_timeout):
                while True:
                    raw = await ws.recv()
                    now = time.perf_counter()
                    event = orjson.loads(raw)
                    kind = event.get("type")
                    if kind == "ai.token":
                        delta = event["delta"]
                        answer.frames.append((now, len(TOKEN.findall(delta))))
                        answer.parts.append(delta)
                    elif kind == "ai.done":
                        answer.finish = event.get("finish_reason")
                        answer.no_match = bool(event.get("no_match"))
                        timings = event.get("timings") or {}
                        answer.admit_ms = timings.get("admit_ms")
                        answer.retrieval_ms = timings.get("retrieval_ms")
                        answer.server_ttft_ms = timings.get("ttft_ms")
                        break
                    elif kind == "error":
                        answer.error = str(event.get("code"))
                        break
        except TimeoutError:
            answer.error = "client_timeout"
        except ConnectionClosed as exc:
            answer.error = f"closed_{exc.rcvd.code if exc.rcvd else 'abnormally'}"
        answer.done = True
        answer.complete = answer.error is None and (
            answer.no_match or "".join(answer.parts) == want
        )
        if answer.error is not None or time.perf_counter() >= stop_asking:
            return
        if answer.no_match:
            question = pool.instead_of(question)


async def run_level(
    args: argparse.Namespace, servers: list[Any], token: Any, n: int, questions: list[str]
) -> dict[str, Any]:
    want = token_text(args.tokens)
    reply_s = args.tokens / args.rate
    addresses = max(1, math.ceil(n / PER_ADDRESS))
    httpx.delete(token.url + "/stats", timeout=10, trust_env=False)
    load_before = machine_load()
    before = [scrape(s.url) for s in servers]
    t_connect = time.perf_counter()
    clients = await open_clients([s.ws_url for s in servers], n, addresses, args.deflate)
    connect_s = time.perf_counter() - t_connect
    meter = CpuMeter(
        {
            "load generator": os.getpid(),
            "rag_chat": [s.pid for s in servers],
            "search process": [search_process_pid(s.pid) for s in servers],
            "token server": token.pid,
            "redis (shared)": find_pid("redis-server"),
        }
    )
    lags: list[float] = []
    probe = asyncio.create_task(lag_probe(lags))
    answers: list[Answer] = []
    t0 = time.perf_counter()
    steady_from, stop_asking = t0 + args.ramp, t0 + args.ramp + args.duration
    read_timeout = max(60.0, reply_s * 6)
    pool = QuestionPool(questions, start=n)
    tasks = [
        asyncio.create_task(
            client_loop(
                i,
                ws,
                pool,
                t0 + random.uniform(0, args.ramp),
                stop_asking,
                want,
                answers,
                read_timeout,
            )
        )
        for i, ws in enumerate(clients)
    ]
    deadline = args.ramp + args.duration + read_timeout + 30
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - t0
    cpu = meter.stop()
    probe.cancel()
    after = [scrape(s.url) for s in servers]
    stats = httpx.get(token.url + "/stats", timeout=10, trust_env=False).json()
    await close_clients(clients)

    ttft = [(a.frames[0][0] - a.t_send) * 1000 for a in answers if a.frames]
    gaps: list[float] = []
    client_p99: dict[int, list[float]] = {}
    for a in answers:
        g = a.gaps_ms()
        gaps.extend(g)
        client_p99.setdefault(a.client, []).extend(g)
    per_client_p99 = [pct(g, 99) for g in client_p99.values() if g]
    steady_tokens = sum(k for a in answers for t, k in a.frames if steady_from <= t <= stop_asking)
    window = stop_asking - steady_from
    errors: dict[str, int] = {}
    for a in answers:
        if a.error is not None:
            errors[a.error] = errors.get(a.error, 0) + 1
        elif not a.done:
            errors["unfinished"] = errors.get("unfinished", 0) + 1
    received = sum(a.tokens for a in answers)
    complete = sum(a.complete for a in answers)
    no_match = sum(a.no_match for a in answers)
    all_tokens = complete == len(answers) and received == stats["tokens_sent"]
    # several instances: the worst instance's lag, the others' counters added up
    lags_each = [
        histogram_quantile(b, a, "rag_event_loop_lag_seconds", 0.99)
        for b, a in zip(before, after, strict=True)
    ]
    lag_server = max((x for x in lags_each if x is not None), default=None)

    def delta(name: str) -> float:
        return sum(counter_delta(b, a, name) for b, a in zip(before, after, strict=True))

    level = {
        "clients": n,
        "instances": len(servers),
        "addresses": addresses,
        "connect_s": connect_s,
        "wall_s": wall,
        "answers": len(answers),
        "complete": complete,
        "no_match": no_match,
        "questions_replaced_after_no_match": pool.replaced,
        "tokens_received": received,
        "tokens_sent_by_token_server": stats["tokens_sent"],
        "tokens_missing": stats["tokens_sent"] - received,
        # above 1 when tokens that waited together (in the server's read of the answer, or in
        # a slow client's queue) went out as one frame
        "tokens_per_frame": received / max(1, sum(len(a.frames) for a in answers)),
        "every_token_delivered": all_tokens,
        "steady_window_s": window,
        "steady_tokens_per_s": steady_tokens / window if window > 0 else math.nan,
        "ideal_tokens_per_s": n * args.rate,
        "ttft_ms": dist(ttft),
        "server_admit_ms": dist([a.admit_ms for a in answers if a.admit_ms is not None]),
        "server_retrieval_ms": dist([a.retrieval_ms for a in answers if a.retrieval_ms]),
        "server_ttft_ms": dist([a.server_ttft_ms for a in answers if a.server_ttft_ms]),
        "ttft_rest_ms": dist([r for a in answers if (r := a.rest_ms()) is not None]),
        "gap_ms": dist(gaps),
        "per_client_p99_gap_ms": dist(per_client_p99),
        "errors": errors,
        "cpu": cpu,
        "server_loop_lag_p99_s_bucket": lag_server,
        "server_slow_consumers_dropped": delta("rag_slow_consumers_dropped_total"),
        "server_errors_sent": delta("rag_errors_total"),
        # where the level's searches ran: the search process, or the server's worker threads
        # (the process starting, gone, or behind)
        "server_searches": {
            w: delta(f'rag_searches_total{{where="{w}"}}') for w in ("process", "thread")
        },
        # the server's garbage-collector pauses during the level, by generation
        "server_gc": {
            g: {
                "collections": delta(f'rag_gc_pause_seconds_count{{generation="{g}"}}'),
                "pause_ms": 1e3 * delta(f'rag_gc_pause_seconds_sum{{generation="{g}"}}'),
            }
            for g in "012"
        },
        "load_generator_loop_lag_ms": dist(lags),
        "machine_load": {"before": load_before, "after": machine_load()},
    }
    level["holds"] = bool(
        pct(gaps, 99) <= GOAL_GAP_MS and pct(ttft, 99) <= GOAL_TTFT_MS and not errors and all_tokens
    )
    level["samples"] = {
        "ttft_ms": [round(x, 3) for x in ttft],
        "gap_ms": [round(x, 3) for x in gaps],
        "answers": [
            {
                "client": a.client,
                "t_send": round(a.t_send - t0, 4),
                "tokens": a.tokens,
                "frames": len(a.frames),
                "complete": a.complete,
                "error": a.error,
            }
            for a in answers
        ],
    }
    return level


def print_level(level: dict[str, Any]) -> None:
    cpu = level["cpu"]
    cores = ", ".join(f"{k} {v['cores']:.2f}" for k, v in cpu.items() if not k.startswith("_"))
    print(
        f"  {level['clients']} clients ({level['addresses']} source address(es), connected in "
        f"{level['connect_s']:.1f} s): {level['answers']} answers, {level['complete']} complete "
        f'({level["no_match"]} of them "don\'t know" without the LLM: nothing relevant found; '
        f"{level['questions_replaced_after_no_match']} such questions replaced by another); "
        f"tokens {level['tokens_received']:,} received / "
        f"{level['tokens_sent_by_token_server']:,} sent by the token server, "
        f"{level['tokens_per_frame']:.2f} per frame"
    )
    print(
        f"    steady tokens/s {fmt(level['steady_tokens_per_s'], 0)} (ideal C×rate "
        f"{level['ideal_tokens_per_s']:,.0f}); TTFT p50 {fmt(level['ttft_ms']['p50'])} / p99 "
        f"{fmt(level['ttft_ms']['p99'])} ms; gap p50 {fmt(level['gap_ms']['p50'])} / p99 "
        f"{fmt(level['gap_ms']['p99'])} ms (worst client's p99 "
        f"{fmt(level['per_client_p99_gap_ms']['max'])} ms)"
    )
    print(
        f"    inside the server (ai.done timings): retrieval p50 "
        f"{fmt(level['server_retrieval_ms']['p50'])} / p99 "
        f"{fmt(level['server_retrieval_ms']['p99'])} ms; reply start → first token p50 "
        f"{fmt(level['server_ttft_ms']['p50'])} / p99 {fmt(level['server_ttft_ms']['p99'])} ms"
    )
    print(
        f"    TTFT, where it went (p50 / p99 of each part): admit (arrival → reply start) "
        f"{fmt(level['server_admit_ms']['p50'])} / {fmt(level['server_admit_ms']['p99'])} ms, "
        f"reply start → first token {fmt(level['server_ttft_ms']['p50'])} / "
        f"{fmt(level['server_ttft_ms']['p99'])} ms, the rest (the question's way in, the first "
        f"token's way out: log append, fan-out, socket, this process's read) "
        f"{fmt(level['ttft_rest_ms']['p50'])} / {fmt(level['ttft_rest_ms']['p99'])} ms"
    )
    print(
        f"    errors {level['errors'] or 'none'}; CPU cores: {cores}; server loop lag p99 ≤ "
        f"{fmt(level['server_loop_lag_p99_s_bucket'], 3)} s (bucket); load generator loop lag "
        f"p99 {fmt(level['load_generator_loop_lag_ms']['p99'])} ms; "
        f"{'HOLDS' if level['holds'] else 'does NOT hold'}"
    )
    gcs = level["server_gc"]
    print(
        "    server GC pauses (generation: collections, ms in all): "
        + "; ".join(f"{g}: {v['collections']:.0f}, {v['pause_ms']:.0f}" for g, v in gcs.items())
        + "; searches: {process:.0f} in the search process, {thread:.0f} in the server's "
        "threads".format(**level["server_searches"])
    )


async def load_test(
    args: argparse.Namespace, servers: list[Any], token: Any, questions: list[str]
) -> list[dict[str, Any]]:
    levels = []
    for n in args.levels:
        print(f"level {n} clients …", flush=True)
        level = await run_level(args, servers, token, n, questions)
        print_level(level)
        levels.append(level)
        # let the server settle: nothing in flight before the next level
        await asyncio.sleep(2)
    return levels


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def report_sweep(args: argparse.Namespace, index_line: str, levels: list[dict[str, Any]]) -> None:
    print(f"\n{index_line}")
    print(
        f"each client: {args.tokens}-token answers at {args.rate:g} tokens/s "
        f"({args.tokens / args.rate:g} s), ramp {args.ramp:g} s, then {args.duration:g} s "
        f"of asking; WebSocket compression: {'deflate' if args.deflate else 'none'}; "
        f"questions: {'the same for every client' if args.same_question else 'one per client'}"
    )
    print(
        f"{'clients':>8}{'tok/s':>9}{'ideal':>9}{'TTFT p50':>10}{'p99':>9}{'gap p50':>9}"
        f"{'p99':>8}{'errors':>8}{'missing':>8}{'lag p99':>8}{'cpu gen':>8}{'cpu srv':>8}"
        f"{'cpu srch':>9}{'cpu tok':>8}{'load':>6}{'holds':>6}"
    )
    for lv in levels:
        errs = sum(lv["errors"].values())
        print(
            f"{lv['clients']:>8}{fmt(lv['steady_tokens_per_s'], 0):>9}"
            f"{lv['ideal_tokens_per_s']:>9,.0f}{fmt(lv['ttft_ms']['p50']):>10}"
            f"{fmt(lv['ttft_ms']['p99']):>9}{fmt(lv['gap_ms']['p50']):>9}"
            f"{fmt(lv['gap_ms']['p99']):>8}{errs:>8}{lv['tokens_missing']:>8}"
            f"{fmt(_ms(lv['server_loop_lag_p99_s_bucket']), 0):>8}"
            f"{lv['cpu']['load generator']['cores']:>8.2f}{lv['cpu']['rag_chat']['cores']:>8.2f}"
            f"{lv['cpu'].get('search process', {}).get('cores', 0.0):>9.2f}"
            f"{lv['cpu']['token server']['cores']:>8.2f}"
            f"{lv['machine_load']['before']['load1']:>6.1f}{'yes' if lv['holds'] else 'NO':>6}"
        )
    print(
        f"goals: p99 gap ≤ {GOAL_GAP_MS:g} ms and p99 TTFT ≤ {GOAL_TTFT_MS:g} ms, no errors, "
        "every token delivered; server loop lag p99 ≤ 50 ms ('lag p99': the upper bound of "
        "the server's rag_event_loop_lag_seconds bucket, ms; 'cpu': cores used on average by "
        "the load generator, the server, its search process, the token server; the machine has "
        f"{os.cpu_count()} cores for all processes; 'load': 1-minute load average before)"
    )
    held = [lv["clients"] for lv in levels if lv["holds"]]
    failed = [lv["clients"] for lv in levels if not lv["holds"]]
    if len(levels) > 1:
        first_fail = min(failed) if failed else None
        below = [c for c in held if first_fail is None or c < first_fail]
        print(
            f"knee: holds up to {max(below) if below else 'none of the levels'}; "
            + (f"first fails at {first_fail} clients" if first_fail else "no level failed")
        )


async def idle_test(args: argparse.Namespace, server: Any) -> dict[str, Any]:
    import redis

    def mem() -> dict[str, int]:
        r = redis.Redis.from_url(REDIS_URL)
        try:
            used = int(r.info("memory")["used_memory"])
        finally:
            r.close()
        return {"server": rss_bytes(server.pid), "client": rss_bytes(os.getpid()), "redis": used}

    async def join_private(ws: ClientConnection) -> None:
        room = f"idle-{uuid.uuid4().hex}"
        await ws.send(json.dumps({"type": "join", "room": room, "private": True}))
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if event.get("type") == "joined":
                return
            if event.get("type") == "error":
                raise RuntimeError(f"join refused: {event}")

    # one connection and one join first: whatever the first of them loads lazily is not
    # counted against the N
    warm = await open_clients([server.ws_url], 1, 1, args.deflate)
    await join_private(warm[0])
    await close_clients(warm)
    await asyncio.sleep(2)
    m0 = mem()
    t = time.perf_counter()
    clients = await open_clients([server.ws_url], args.idle, 1, args.deflate)
    connect_s = time.perf_counter() - t
    await asyncio.sleep(args.settle)
    m1 = mem()
    open_now = scrape(server.url).get("rag_ws_connections", math.nan)
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)

    async def join(ws: ClientConnection) -> None:
        async with gate:
            await join_private(ws)

    t = time.perf_counter()
    await asyncio.gather(*(join(ws) for ws in clients))
    join_s = time.perf_counter() - t
    await asyncio.sleep(args.settle)
    m2 = mem()
    # closing them all at once (a proxy restarting, a network blip): how long until the
    # server has let every one go (left its rooms and presence: its open-connections gauge
    # back to 0), and the CPU that took it
    cpu0, t = cpu_seconds(server.pid), time.perf_counter()
    await close_clients(clients)
    close_s = time.perf_counter() - t
    while scrape(server.url).get("rag_ws_connections", 0) > 0 and time.perf_counter() - t < 600:
        await asyncio.sleep(0.1)
    release_s, release_cpu_s = time.perf_counter() - t, cpu_seconds(server.pid) - cpu0
    n = args.idle
    result = {
        "connections": n,
        "server_reports_open": open_now,
        "connect_s": connect_s,
        "join_s": join_s,
        "close_s": close_s,
        "release_s": release_s,
        "release_server_cpu_s": release_cpu_s,
        "before": m0,
        "connected": m1,
        "joined": m2,
        "per_connection_bytes": {
            "server_connected": (m1["server"] - m0["server"]) / n,
            "server_joined": (m2["server"] - m0["server"]) / n,
            "client_connected": (m1["client"] - m0["client"]) / n,
            "redis_joined": (m2["redis"] - m0["redis"]) / n,
        },
    }
    per = result["per_connection_bytes"]
    mib = 1024 * 1024
    print(
        f"{n:,} idle WebSockets (connected in {connect_s:.1f} s; the server counts "
        f"{open_now:,.0f} open)"
    )
    print(f"{'':34}{'server RSS':>12}{'per conn':>11}{'client RSS':>12}")
    print(f"{'before':34}{m0['server'] / mib:>10.1f}Mi{'':>11}{m0['client'] / mib:>10.1f}Mi")
    print(
        f"{'connected, idle':34}{m1['server'] / mib:>10.1f}Mi"
        f"{per['server_connected'] / 1024:>9.1f}Ki{m1['client'] / mib:>10.1f}Mi"
    )
    print(
        f"{'each joined a private conversation':34}{m2['server'] / mib:>10.1f}Mi"
        f"{per['server_joined'] / 1024:>9.1f}Ki{m2['client'] / mib:>10.1f}Mi"
    )
    print(
        f"Redis used_memory grew {per['redis_joined'] / 1024:.2f} KiB per joined connection "
        "(the whole Redis instance: other users of it blur this)"
    )
    print(
        f"all {n:,} closed at once: the server had let every one go (rooms, presence) "
        f"{release_s:.1f} s later, using {release_cpu_s:.1f} s of CPU"
    )
    return result


def run_loop(args: argparse.Namespace, coro: Coroutine[Any, Any, T]) -> T:
    """The load generator's loop: uvloop (what the server runs on) unless ``--asyncio-loop``."""
    if args.asyncio_loop:
        return asyncio.run(coro)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="an ingested RAG_DATA_DIR (≥ 10,000 chunks)")
    parser.add_argument("--collection", default="docs", help="RAG_COLLECTION (default docs)")
    parser.add_argument("--clients", type=int, default=1000, help="clients (default 1000)")
    parser.add_argument("--sweep", help="client counts, e.g. 100,250,500,1000,1500")
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="rag_chat servers sharing the Redis and the index, clients spread over them (1)",
    )
    parser.add_argument("--tokens", type=int, default=200, help="tokens per answer (default 200)")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream (20)")
    parser.add_argument(
        "--ramp", type=float, help="clients start within this many seconds (default: 1 answer)"
    )
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds of asking after the ramp (20)"
    )
    parser.add_argument(
        "--no-deflate",
        dest="deflate",
        action="store_false",
        help="no permessage-deflate (browsers offer it; so does this client by default)",
    )
    parser.add_argument(
        "--asyncio-loop",
        action="store_true",
        help="the load generator on asyncio's own loop (default: uvloop, like the server)",
    )
    parser.add_argument("--idle", type=int, help="instead: memory per idle connection, N of them")
    parser.add_argument("--settle", type=float, default=3.0, help="idle: seconds before RSS")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--same-question",
        action="store_true",
        help="every client asks the same question (default: each its own SciFact claim)",
    )
    args = parser.parse_args()
    if args.rate <= 0 or args.tokens < 1:
        parser.error("--rate and --tokens must be positive")
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    if args.idle is not None and args.instances != 1:
        parser.error("--idle measures one server's memory: it takes no --instances")
    if args.idle is not None and args.idle < 1:
        parser.error("--idle must be at least 1")
    args.ramp = args.tokens / args.rate if args.ramp is None else args.ramp
    try:
        args.levels = (
            [int(x) for x in args.sweep.split(",") if x.strip()] if args.sweep else [args.clients]
        )
    except ValueError:
        parser.error(f"--sweep takes client counts separated by commas, not {args.sweep!r}")
    if not args.levels or min(args.levels) < 1:
        parser.error("client counts must be at least 1")
    args.tag = "" if args.deflate else "_nodeflate"
    random.seed(args.seed)
    biggest = args.idle or max(args.levels)
    soft, hard = raise_open_files(biggest + 2048)
    if soft < biggest + 1024:
        print(f"WARNING: open-file limit {soft} (hard {hard}) is low for {biggest} connections")

    smoke = args.data_dir is None
    # each client its own question (SciFact's claims, cycled), as real users ask different
    # things; --same-question: every client the first one (what stops before 16 measured).
    # Read before anything starts: a SciFact index without SciFact's questions stops here
    questions = queries(1 if args.same_question else None, scifact=not smoke and not args.idle)
    data_dir = guide_index() if smoke else args.data_dir.resolve()
    index_line = describe_index(data_dir, args.collection, smoke)
    print(index_line, flush=True)
    prefix = new_prefix("concurrency")
    logs = log_dir("concurrency")
    token = start_token_server(logs, args.tokens, args.rate)
    servers: list[Any] = []
    try:
        wait_ready([token], "/v1/models", 60)
        for i in range(1 if args.idle else args.instances):
            name = "rag_chat" if i == 0 else f"rag_chat{i + 1}"
            servers.append(
                start_rag_chat(logs, data_dir, args.collection, token.url + "/v1", prefix, name)
            )
        wait_ready(servers, "/readyz")
        if args.idle:
            result = run_loop(args, idle_test(args, servers[0]))
            path = save_json(
                f"concurrency_idle{args.tag}.json",
                {
                    "args": {**vars(args), "data_dir": str(data_dir)},
                    "index": index_line,
                    "idle": result,
                },
            )
            print(f"\nraw figures: {path}")
            return 0
        levels = run_loop(args, load_test(args, servers, token, questions))
    finally:
        for server in servers:
            server.stop()
        token.stop()
        delete_prefix(prefix)
    report_sweep(args, index_line, levels)
    path = save_json(
        f"concurrency{args.tag}.json",
        {"args": {**vars(args), "data_dir": str(data_dir)}, "index": index_line, "levels": levels},
    )
    plots = [
        plot_distributions(
            f"concurrency_ttft{args.tag}.png",
            "time to first token (send → first ai.token frame)",
            {f"{lv['clients']} clients": lv["samples"]["ttft_ms"] for lv in levels},
            "ms",
            goal=GOAL_TTFT_MS,
            log_x=True,
        ),
        plot_distributions(
            f"concurrency_gap{args.tag}.png",
            "inter-token gap at the client (merged tokens: 0 ms; log axis shows gaps > 1 µs)",
            {
                f"{lv['clients']} clients": [g for g in lv["samples"]["gap_ms"] if g > 0.001]
                for lv in levels
            },
            "ms",
            goal=GOAL_GAP_MS,
            log_x=True,
        ),
    ]
    if len(levels) > 1:
        xs = [lv["clients"] for lv in levels]
        plots.append(
            plot_lines(
                f"concurrency_sweep_latency{args.tag}.png",
                "p99 latency vs clients",
                xs,
                {
                    "p99 TTFT (ms)": [lv["ttft_ms"]["p99"] for lv in levels],
                    "p99 gap (ms)": [lv["gap_ms"]["p99"] for lv in levels],
                },
                "concurrent clients",
                "ms",
                goals=[("TTFT goal 300 ms", GOAL_TTFT_MS), ("gap goal 100 ms", GOAL_GAP_MS)],
                log_y=True,
            )
        )
        plots.append(
            plot_lines(
                f"concurrency_sweep_throughput{args.tag}.png",
                "aggregate tokens/s delivered (steady window) vs clients",
                xs,
                {
                    "delivered": [lv["steady_tokens_per_s"] for lv in levels],
                    "ideal: clients × rate": [lv["ideal_tokens_per_s"] for lv in levels],
                },
                "concurrent clients",
                "tokens/s",
            )
        )
    print(f"\nraw samples: {path}; plots: " + ", ".join(str(p) for p in plots if p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
