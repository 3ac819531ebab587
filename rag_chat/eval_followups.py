"""Follow-up questions: does the rewritten follow-up retrieve as well as the standalone question?

    python -m rag_chat.eval_followups [--k 5] [--data-dir DIR] [--limit N] [--json] [--verbose]

For each pair of ``rag_chat/evalsets/followups.jsonl`` (a first question, a follow-up that
leans on it, the same follow-up written out standalone, and the file/section it needs), the
guide is searched the way the chat does (hybrid retrieval) with

- ``standalone``: the follow-up as a self-contained question (the upper bound),
- ``raw``: the follow-up as typed,
- ``rewritten``: what the chat searches for: ``rag_chat.chat.rewrite_query`` given the first
  question as history,
- ``rewritten-v1``: the first rewrite rule (the whole previous question prepended, fewer
  follow-up cues), kept for comparison,

and scored at chunk level: a chunk is relevant when it comes from a target file and, where one
is named, from the target section. (Pairs of kind ``switch`` change the topic instead: a
rewrite must leave them alone; they are scored apart.) Recall@k is the share of follow-ups
with a relevant chunk in the top k (k = 5 = ``RAG_TOP_K``, what the model sees, and others);
MRR@10 is the mean reciprocal rank of the first relevant chunk. The guide is ingested through
the real pipeline into its own collection (``guide-eval``), in ``--data-dir`` or a temporary
folder.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rag_chat.chat import rewrite_query
from rag_chat.evalsets import guide_settings, ingest_guide, load, relevant, same_file
from rag_chat.memory import StoredMessage
from rag_chat.retrieval.store import Hit

DEPTH = 10  # chunks retrieved per query (MRR@10, Recall@1..10)
KS = (1, 3, 5, 10)
MODES = ("standalone", "raw", "rewritten", "rewritten-v1")

_FOLLOW_UP_V1 = re.compile(
    r"^(and|also|but|so|what about|how about|why|then)\b|"
    r"\b(it|its|it's|they|them|their|this|that|these|those|he|she|his|her|the same|there)\b",
    re.IGNORECASE,
)


def rewrite_v1(history: Sequence[StoredMessage], text: str) -> str:
    """The first rewrite rule, for comparison: the whole previous question, then the
    follow-up."""
    if not (_FOLLOW_UP_V1.search(text) or len(text.split()) <= 3):
        return text
    previous = [m.get("content", "") for m in history if m.get("role") == "user"]
    return f"{previous[-1]} {text}" if previous else text


def history_of(first: str) -> list[StoredMessage]:
    """The conversation before the follow-up: the first question and an (unused) answer."""
    return [
        {"role": "user", "content": first},
        {"role": "assistant", "content": "(answer)"},
    ]


def queries(pair: dict[str, Any], rewrite: Callable[..., str] = rewrite_query) -> dict[str, str]:
    history = history_of(pair["first"])
    return {
        "standalone": pair["standalone"],
        "raw": pair["follow_up"],
        "rewritten": rewrite(history, pair["follow_up"]),
        "rewritten-v1": rewrite_v1(history, pair["follow_up"]),
    }


def first_relevant(hits: Sequence[Hit], targets: list[dict[str, str]]) -> int | None:
    """1-based rank of the first relevant chunk, or None."""
    return next((i for i, h in enumerate(hits, 1) if relevant(h, targets)), None)


def first_relevant_file(hits: Sequence[Hit], targets: list[dict[str, str]]) -> int | None:
    return next(
        (
            i
            for i, h in enumerate(hits, 1)
            if any(same_file(h.metadata.get("source"), t["source"]) for t in targets)
        ),
        None,
    )


def scores(ranks: Sequence[int | None], ks: Sequence[int] = KS) -> dict[str, float]:
    n = len(ranks) or 1
    out = {f"R@{k}": sum(1 for r in ranks if r is not None and r <= k) / n for k in ks}
    out["MRR@10"] = sum(1.0 / r for r in ranks if r is not None and r <= DEPTH) / n
    return out


def evaluate(
    search: Callable[[str, int], list[Hit]],
    pairs: Sequence[dict[str, Any]],
    rewrite: Callable[..., str] = rewrite_query,
) -> dict[str, Any]:
    """Ranks per mode and pair, and the aggregate scores."""
    ranks: dict[str, list[int | None]] = {m: [] for m in MODES}
    file_ranks: dict[str, list[int | None]] = {m: [] for m in ranks}
    per_pair = []
    for pair in pairs:
        row: dict[str, Any] = {"id": pair["id"]}
        for mode, query in queries(pair, rewrite).items():
            hits = search(query, DEPTH)
            r = first_relevant(hits, pair["targets"])
            ranks[mode].append(r)
            file_ranks[mode].append(first_relevant_file(hits, pair["targets"]))
            row[mode] = r
            row[f"{mode}_query"] = query
        per_pair.append(row)
    table = {m: {**scores(ranks[m]), "file R@5": scores(file_ranks[m])["R@5"]} for m in ranks}
    return {"pairs": len(pairs), "results": table, "per_pair": per_pair}


def print_table(title: str, result: dict[str, Any]) -> None:
    cols = [f"R@{k}" for k in KS] + ["MRR@10", "file R@5"]
    print(f"{title}: {result['pairs']} pairs, chunk level (file and section), hybrid")
    print(f"{'query':13} " + " ".join(f"{c:>8}" for c in cols))
    for mode, r in result["results"].items():
        print(f"{mode:13} " + " ".join(f"{r[c]:8.3f}" for c in cols))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rag_chat.eval_followups", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--data-dir", type=Path, help="ingest into this RAG_DATA_DIR (default: temp)")
    p.add_argument("--limit", type=int, help="only the first N pairs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verbose", action="store_true", help="every pair's ranks and queries")
    args = p.parse_args(argv)

    pairs = load("followups.jsonl", args.limit)
    follow_ups = [p for p in pairs if p.get("kind", "follow-up") == "follow-up"]
    switches = [p for p in pairs if p.get("kind") == "switch"]
    with guide_settings(args.data_dir) as settings:
        retriever = ingest_guide(settings)
        t0 = time.perf_counter()

        def search(q: str, k: int) -> list[Hit]:
            return retriever.search(q, k, "hybrid")

        result = evaluate(search, follow_ups)
        result["switches"] = evaluate(search, switches) if switches else None
        result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        if not args.verbose:
            result["per_pair"] = None
            if result["switches"]:
                result["switches"]["per_pair"] = None
        print(json.dumps(result, indent=2))
        return 0
    print_table("follow-ups", result)
    if result["switches"]:
        print_table("topic switches (the second question stands alone)", result["switches"])
    if args.verbose:
        rows = result["per_pair"] + (result["switches"] or {}).get("per_pair", [])
        for row in rows:
            ranks = " ".join(f"{m}={row[m]}" for m in MODES)
            print(f"{row['id']:18} {ranks}  {row['rewritten_query']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
