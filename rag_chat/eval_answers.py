"""Answer quality over the bundled guide, the citation checker, and the "don't know" threshold.

    python -m rag_chat.eval_answers [--limit N] [--data-dir DIR] [--json] [--verbose]
    python -m rag_chat.eval_answers --checker      # the citation checker on labelled pairs
    python -m rag_chat.eval_answers --relevance    # on- vs off-topic questions' best relevance

**Answers** (default): every question of ``rag_chat/evalsets/answers.jsonl`` goes through the
real ``ChatService`` (hybrid retrieval, prompt, the configured LLM — the embedded SmolLM2
unless ``RAG_LLM_BASE_URL`` names an OpenAI-compatible server — and the citation check). An
answer has the *right fact* when it contains every fact of the question (each one of a few
spellings, case-insensitive); the *right citation* when one of its ``[n]`` markers names a
source from a file that holds the fact. Printed: the share of answers with the right fact, with
the right citation, with both, and the model's citation precision as the checker judges it
(supported citation markers among all).

**Checker** (``--checker``): the hand-labelled (sentence, source chunk, supports?) pairs of
``citations.jsonl``; precision and recall of "supported" at the thresholds in
``rag_chat.citations``, and over a sweep.

**Relevance** (``--relevance``): the best query-chunk cosine among the hits the chat would use,
for the guide's questions (answers.jsonl and the standalone follow-ups) and for off-topic ones
(``offtopic.jsonl``); how each threshold splits them. ``RAG_MIN_RELEVANCE`` was chosen here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag_chat import citations as checker
from rag_chat.chat import best_relevance
from rag_chat.evalsets import guide_settings, ingest_guide, load, same_file
from rag_chat.retrieval.store import Hit

if TYPE_CHECKING:
    from rag_chat.llm import LLM
    from rag_chat.retrieval.embedder import Embedder
    from rag_chat.retrieval.search import Retriever
    from rag_chat.settings import Settings


# --- answers -------------------------------------------------------------------------------


def has_fact(answer: str, spellings: Sequence[str]) -> bool:
    """One of the spellings occurs in the answer (case-insensitive; a number only as a whole
    number: "5" is not found in "50", "1.5" or "[5]")."""
    text = checker.MARKER.sub(" ", answer).lower()
    for s in spellings:
        s = s.lower()
        pattern = re.escape(s)
        if s[:1].isdigit():
            pattern = r"(?<![\w.])" + pattern
        if s[-1:].isdigit():
            pattern += r"(?![\w]|\.\d)"
        if re.search(pattern, text):
            return True
    return False


def score_answer(
    item: dict[str, Any], answer: str, chunks: list[dict[str, Any]], done: dict[str, Any]
) -> dict[str, Any]:
    files = {c["n"]: c.get("source") for c in chunks}
    cited = checker.cited(answer, len(chunks))
    supported = list(done.get("citations") or [])

    def right(ns: Sequence[int]) -> bool:
        return any(any(same_file(files.get(n), s) for s in item["sources"]) for n in ns)

    fact = all(has_fact(answer, group) for group in item["facts"])
    return {
        "id": item["id"],
        "fact": fact,
        "citation": right(cited),
        "supported_citation": right(supported),
        "both": fact and right(cited),
        "retrieved": right([c["n"] for c in chunks]),
        "cited": cited,
        "supported": supported,
        "no_match": bool(done.get("no_match")),
    }


async def run_answers(
    settings: Settings,
    retriever: Retriever,
    llm: LLM,
    items: Sequence[dict[str, Any]],
    verbose: bool = False,
) -> dict[str, Any]:
    from rag_chat.chat import ChatService
    from rag_chat.memory.local import LocalMemory

    chat = ChatService(
        llm,
        LocalMemory(),
        lambda q, k: retriever.search(q, k, "hybrid"),
        top_k=settings.top_k,
        history_turns=0,
        min_relevance=settings.min_relevance,
        embedder=retriever.embedder,
    )
    rows = []
    pairs = supported_pairs = 0
    seconds: list[float] = []
    for item in items:
        t0 = time.perf_counter()
        reply = chat.start(item["question"], persist=False)
        answer, chunks, done = "", [], {}
        async for event in reply.events():
            if event["type"] == "ai.sources":
                chunks = event["chunks"]
            elif event["type"] == "ai.token":
                answer += event["delta"]
            elif event["type"] == "ai.done":
                done = event
            elif event["type"] == "error":
                raise SystemExit(f"eval: {item['id']}: {event['code']}: {event['message']}")
        seconds.append(time.perf_counter() - t0)
        row = score_answer(item, answer, chunks, done)
        # the checker's verdict on every (sentence, cited source) pair of the answer
        hits = await asyncio.to_thread(
            lambda: [_hit_of(c, retriever) for c in chunks]  # noqa: B023
        )
        check = checker.check(answer, hits, retriever.embedder)
        pairs += len(check.pairs)
        supported_pairs += sum(p.supported for p in check.pairs)
        row["pairs"] = len(check.pairs)
        row["supported_pairs"] = sum(p.supported for p in check.pairs)
        row["answer"] = answer
        rows.append(row)
        if verbose:
            print(
                f"{item['id']:20} fact={row['fact']!s:5} cite={row['citation']!s:5} "
                f"cited={row['cited']} supported={row['supported']} {answer[:160]!r}",
                file=sys.stderr,
            )
    n = len(rows) or 1
    cited_sources = sum(len(r["cited"]) for r in rows)
    supported_sources = sum(len(r["supported"]) for r in rows)
    return {
        "model": llm.model_name,
        "questions": len(rows),
        "right_fact": sum(r["fact"] for r in rows) / n,
        "right_citation": sum(r["citation"] for r in rows) / n,
        "right_supported_citation": sum(r["supported_citation"] for r in rows) / n,
        "fact_and_citation": sum(r["both"] for r in rows) / n,
        "retrieved_right_file": sum(r["retrieved"] for r in rows) / n,
        "answers_citing": sum(bool(r["cited"]) for r in rows) / n,
        "citation_pairs": pairs,
        "citation_precision": supported_pairs / pairs if pairs else None,
        # per answer and cited source, as ai.done reports them (a source counts once per answer)
        "cited_sources": cited_sources,
        "source_precision": supported_sources / cited_sources if cited_sources else None,
        "dont_know": sum(r["no_match"] for r in rows) / n,
        "seconds_per_answer": statistics.mean(seconds) if seconds else 0.0,
        "rows": rows,
    }


def _hit_of(chunk: dict[str, Any], retriever: Retriever) -> Hit:
    """The full chunk behind a source view (the view carries a snippet only)."""
    found = retriever.store.get([chunk["id"]])
    text, meta = found.get(chunk["id"], (chunk.get("snippet") or "", {}))
    return Hit(chunk["id"], float(chunk.get("score") or 0.0), text, meta)


# --- the checker on labelled pairs -----------------------------------------------------------


def labelled_hits(retriever: Retriever, rows: Sequence[dict[str, Any]]) -> list[Hit]:
    """The chunk each labelled pair names: in its file, the one holding its phrase."""
    chunks = retriever.store.chunks()
    out = []
    for row in rows:
        match = [
            h
            for h in chunks
            if same_file(h.metadata.get("source"), row["source"]) and row["chunk"] in h.text
        ]
        if len(match) != 1:
            raise SystemExit(f"eval: {len(match)} chunks of {row['source']} hold {row['chunk']!r}")
        out.append(match[0])
    return out


def checker_scores(
    rows: Sequence[dict[str, Any]], hits: Sequence[Hit], embedder: Embedder | None
) -> list[checker.PairCheck]:
    """The checker's components on every labelled pair (thresholds applied later)."""
    out = []
    for row, hit in zip(rows, hits, strict=True):
        result = checker.check(f"{row['sentence']} [1]", [hit], embedder)
        out.append(result.pairs[0])
    return out


def precision_recall(
    labels: Sequence[bool], predicted: Sequence[bool]
) -> tuple[float, float, float]:
    tp = sum(p and y for p, y in zip(predicted, labels, strict=True))
    fp = sum(p and not y for p, y in zip(predicted, labels, strict=True))
    fn = sum(y and not p for p, y in zip(predicted, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    accuracy = sum(p == y for p, y in zip(predicted, labels, strict=True)) / (len(labels) or 1)
    return precision, recall, accuracy


def decide(p: checker.PairCheck, lex: float, sem: float | None, numbers: bool = True) -> bool:
    if numbers and not p.numbers_ok:
        return False
    if p.lexical >= lex:
        return True
    return sem is not None and p.semantic is not None and p.semantic >= sem


def run_checker(retriever: Retriever) -> dict[str, Any]:
    rows = load("citations.jsonl")
    hits = labelled_hits(retriever, rows)
    labels = [bool(r["supports"]) for r in rows]
    full = checker_scores(rows, hits, retriever.embedder)
    lexical_only = checker_scores(rows, hits, None)
    chosen = precision_recall(labels, [p.supported for p in full])
    alone = precision_recall(labels, [p.supported for p in lexical_only])
    sweep = []
    for lex in (0.4, 0.5, 0.6, 0.7, 0.8, 1.01):
        for sem in (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, None):
            pr = precision_recall(labels, [decide(p, lex, sem) for p in full])
            sweep.append({"lexical": lex, "semantic": sem, "pr": pr})
    without_numbers = precision_recall(
        labels, [decide(p, checker.MIN_LEXICAL, checker.MIN_SEMANTIC, False) for p in full]
    )
    by_kind: dict[str, list[bool]] = {}
    for row, p in zip(rows, full, strict=True):
        by_kind.setdefault(row["kind"], []).append(p.supported == row["supports"])
    return {
        "pairs": len(rows),
        "supported_pairs": sum(labels),
        "thresholds": {
            "lexical": checker.MIN_LEXICAL,
            "semantic": checker.MIN_SEMANTIC,
            "lexical_alone": checker.MIN_LEXICAL_ALONE,
        },
        "chosen": chosen,
        "lexical_alone": alone,
        "without_number_rule": without_numbers,
        "correct_by_kind": {k: (sum(v), len(v)) for k, v in by_kind.items()},
        "sweep": sweep,
        "mistakes": [
            {
                **row,
                "lexical": p.lexical,
                "semantic": p.semantic,
                "numbers_ok": p.numbers_ok,
            }
            for row, p in zip(rows, full, strict=True)
            if p.supported != row["supports"]
        ],
    }


# --- the don't-know threshold ---------------------------------------------------------------


def relevance_of(retriever: Retriever, query: str, k: int) -> tuple[float | None, bool]:
    """The best relevance among the chat's hits, and whether the retriever filled it (when it
    does not, the same cosine is read from a dense ranking of the whole collection)."""
    hits = retriever.search(query, k, "hybrid")
    best = best_relevance(hits)
    if best is not None or not hits:
        return best, True
    dense = {h.id: h.score for h in retriever.dense(query, retriever.store.count())}
    known = [dense[h.id] for h in hits if h.id in dense]
    return (max(known) if known else None), False


def run_relevance(retriever: Retriever, k: int) -> dict[str, Any]:
    on = [r["question"] for r in load("answers.jsonl")] + [
        r["standalone"] for r in load("followups.jsonl")
    ]
    off = load("offtopic.jsonl")
    from_retriever = True

    def best(q: str) -> float:
        nonlocal from_retriever
        value, filled = relevance_of(retriever, q, k)
        from_retriever &= filled
        return value if value is not None else -1.0

    on_scores = [best(q) for q in on]
    off_scores = {r["question"]: (r["kind"], best(r["question"])) for r in off}
    off_all = [s for _, s in off_scores.values()]
    sweep = []
    for i in range(10, 61):
        t = i / 100
        answered = sum(s >= t for s in on_scores) / len(on_scores)
        refused = sum(s < t for s in off_all) / len(off_all)
        sweep.append({"threshold": t, "on_answered": answered, "off_refused": refused})
    return {
        "k": k,
        "relevance_from_retriever": from_retriever,
        "on_topic": _summary(on_scores),
        "off_topic": _summary(off_all),
        "off_general": _summary([s for kind, s in off_scores.values() if kind == "general"]),
        "off_near": _summary([s for kind, s in off_scores.values() if kind == "near"]),
        "lowest_on_topic": sorted(zip(on_scores, on, strict=True))[:5],
        "highest_off_topic": sorted(((s, q) for q, (_, s) in off_scores.items()), reverse=True)[:5],
        "sweep": sweep,
    }


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "min": round(min(values), 4),
        "median": round(statistics.median(values), 4),
        "max": round(max(values), 4),
    }


# --- the command ----------------------------------------------------------------------------


def _print_checker(r: dict[str, Any]) -> None:
    t = r["thresholds"]
    print(f"citation checker: {r['pairs']} labelled pairs ({r['supported_pairs']} supported)")
    for name, pr in (
        (f"lexical >= {t['lexical']} or semantic >= {t['semantic']}, numbers", r["chosen"]),
        (f"lexical alone >= {t['lexical_alone']}, numbers", r["lexical_alone"]),
        ("chosen thresholds without the number rule", r["without_number_rule"]),
    ):
        print(f"  {name:55} precision {pr[0]:.3f} recall {pr[1]:.3f} accuracy {pr[2]:.3f}")
    print(
        "  correct by kind: "
        + ", ".join(f"{k} {a}/{b}" for k, (a, b) in r["correct_by_kind"].items())
    )
    print("  sweep (lexical, semantic): precision / recall / accuracy")
    for row in r["sweep"]:
        p, rec, acc = row["pr"]
        print(f"    {row['lexical']:5} {row['semantic']!s:5}  {p:.3f} {rec:.3f} {acc:.3f}")


def _print_relevance(r: dict[str, Any], chosen: float) -> None:
    src = (
        "Hit.relevance" if r["relevance_from_retriever"] else "dense cosine (hybrid left it unset)"
    )
    print(f"best relevance among the top {r['k']} hybrid hits ({src})")
    for name in ("on_topic", "off_topic", "off_general", "off_near"):
        s = r[name]
        print(
            f"  {name:12} n={s['n']:3} min {s['min']:.3f} median {s['median']:.3f} "
            f"max {s['max']:.3f}"
        )
    print("  lowest on-topic:  " + "; ".join(f"{s:.3f} {q!r}" for s, q in r["lowest_on_topic"]))
    print("  highest off-topic: " + "; ".join(f"{s:.3f} {q!r}" for s, q in r["highest_off_topic"]))
    print("  threshold  on-topic answered  off-topic refused")
    for row in r["sweep"]:
        mark = "  <- RAG_MIN_RELEVANCE" if abs(row["threshold"] - chosen) < 1e-9 else ""
        if round(row["threshold"] * 100) % 5 == 0 or mark:
            t, on, off = row["threshold"], row["on_answered"], row["off_refused"]
            print(f"  {t:9.2f}  {on:17.3f}  {off:17.3f}{mark}")


def _print_answers(r: dict[str, Any]) -> None:
    print(f"answers: {r['questions']} questions, model {r['model']}")
    for key in (
        "right_fact",
        "right_citation",
        "fact_and_citation",
        "right_supported_citation",
        "retrieved_right_file",
        "answers_citing",
        "dont_know",
    ):
        print(f"  {key:26} {r[key]:.3f}")
    prec = r["citation_precision"]
    pairs = r["citation_pairs"]
    print(
        f"  citation precision (checker) {prec:.3f} of {pairs} (sentence, source) pairs, "
        f"{r['source_precision']:.3f} of {r['cited_sources']} cited sources"
        if prec is not None
        else "  citation precision: no citations"
    )
    print(f"  seconds per answer         {r['seconds_per_answer']:.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rag_chat.eval_answers", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--checker", action="store_true", help="the citation checker on labelled pairs")
    p.add_argument("--relevance", action="store_true", help="the don't-know threshold")
    p.add_argument("--data-dir", type=Path, help="ingest into this RAG_DATA_DIR (default: temp)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verbose", action="store_true", help="each answer (on stderr)")
    args = p.parse_args(argv)

    with guide_settings(args.data_dir) as settings:
        retriever = ingest_guide(settings)
        if args.checker:
            result = run_checker(retriever)
            show = _print_checker
        elif args.relevance:
            result = run_relevance(retriever, settings.top_k)
            show = lambda r: _print_relevance(r, settings.min_relevance)  # noqa: E731
        else:
            from rag_chat.llm import build_llm

            llm = build_llm(settings)
            items = load("answers.jsonl", args.limit)

            async def go() -> dict[str, Any]:
                load_llm = getattr(llm, "load", None)
                if load_llm is not None:
                    await load_llm()
                try:
                    return await run_answers(settings, retriever, llm, items, args.verbose)
                finally:
                    await llm.aclose()

            result = asyncio.run(go())
            show = _print_answers
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
