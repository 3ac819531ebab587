"""Retrieval evaluation on a BEIR-format dataset, through the real ingest + retrieval pipeline.

    python -m rag_chat.eval ../shared/datasets/scifact --split train
    python -m rag_chat.eval ../shared/datasets/scifact --split train --url http://127.0.0.1:8000

The corpus is ingested (incrementally: a second run embeds nothing) into its own collection,
then every query with judgements is run, in process through the same ``Retriever`` the server
uses, or with ``--url`` through a running server's ``POST /api/search`` (start it with
``RAG_COLLECTION`` set to the collection this command names). Scores are at document level: a
document's score is its best chunk's. Metrics: nDCG@10 (graded gains from the qrels),
Recall@10, Recall@100, MRR@10.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rag_chat.retrieval.embedder import Embedder
from rag_chat.retrieval.search import Retriever
from rag_chat.retrieval.store import Hit
from rag_chat.settings import Settings

# Chunks asked of a ranker per query: enough distinct documents for Recall@100.
CHUNK_DEPTH = 300
HTTP_DEPTH = 200  # /api/search's largest k


class DatasetError(Exception):
    pass


@dataclass(frozen=True)
class Dataset:
    corpus: Path
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def load_dataset(folder: Path, split: str) -> Dataset:
    corpus = folder / "corpus.jsonl"
    qfile = folder / "queries.jsonl"
    qrels_file = folder / "qrels" / f"{split}.tsv"
    for f in (corpus, qfile, qrels_file):
        if not f.is_file():
            raise DatasetError(
                f"{f} not found: a BEIR folder has corpus.jsonl, queries.jsonl "
                f"and qrels/{split}.tsv"
            )
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with qrels_file.open() as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            qrels[row["query-id"]][row["corpus-id"]] = int(row["score"])
    queries = {}
    with qfile.open() as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                if str(rec["_id"]) in qrels:
                    queries[str(rec["_id"])] = rec["text"]
    return Dataset(corpus, queries, dict(qrels))


def doc_ranking(hits: Sequence[Hit]) -> list[tuple[str, float]]:
    """Best chunk score per document, best first."""
    best: dict[str, float] = {}
    for h in hits:
        doc = str(h.metadata.get("doc_id", h.id))
        if doc not in best or h.score > best[doc]:
            best[doc] = h.score
    return sorted(best.items(), key=lambda kv: kv[1], reverse=True)


def metrics(run: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    ndcg = r10 = r100 = mrr = 0.0
    for qid, rel in qrels.items():
        ranked = run.get(qid, [])
        gains = [rel.get(d, 0) for d in ranked[:10]]
        dcg = sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(gains))
        ideal = sorted(rel.values(), reverse=True)[:10]
        idcg = sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(ideal))
        ndcg += dcg / idcg if idcg else 0.0
        relevant = {d for d, g in rel.items() if g > 0}
        r10 += len(relevant & set(ranked[:10])) / len(relevant)
        r100 += len(relevant & set(ranked[:100])) / len(relevant)
        mrr += next((1.0 / (i + 1) for i, d in enumerate(ranked[:10]) if d in relevant), 0.0)
    n = len(qrels) or 1
    return {"nDCG@10": ndcg / n, "Recall@10": r10 / n, "Recall@100": r100 / n, "MRR@10": mrr / n}


EvalMode = Literal["dense", "dense-first", "bm25", "hybrid"]


def search_http(url: str, query: str, k: int, mode: str) -> list[Hit]:
    import httpx

    r = httpx.post(
        f"{url.rstrip('/')}/api/search", json={"query": query, "k": k, "mode": mode}, timeout=60
    )
    r.raise_for_status()
    return [
        Hit(str(c["id"]), float(c["score"]), "", {"doc_id": str(c["doc_id"])})
        for c in r.json()["results"]
    ]


def evaluate(
    retriever: Retriever, data: Dataset, mode: EvalMode, url: str | None = None
) -> tuple[dict[str, float], float]:
    """``dense-first`` ranks each document by its first chunk only: the published MTEB protocol
    (one embedding of title + text, truncated at the model's 256 tokens), through our pipeline."""
    qids = list(data.queries)
    t0 = time.perf_counter()
    if url is not None and mode != "dense-first":
        results = [search_http(url, data.queries[q], HTTP_DEPTH, mode) for q in qids]
    elif mode in ("dense", "dense-first"):
        where = {"position": 0} if mode == "dense-first" else None
        results = retriever.dense_many([data.queries[q] for q in qids], CHUNK_DEPTH, where)
    else:
        results = [retriever.search(data.queries[q], CHUNK_DEPTH, mode) for q in qids]  # type: ignore[arg-type]
    per_query_ms = (time.perf_counter() - t0) * 1000 / max(1, len(qids))
    run = {q: [d for d, _ in doc_ranking(hits)] for q, hits in zip(qids, results, strict=True)}
    qrels = {q: data.qrels[q] for q in qids}
    return metrics(run, qrels), per_query_ms


def ingest_for_eval(
    settings: Settings,
    paths: Sequence[Path],
    embedder: Embedder | None = None,
    progress: bool | None = False,
) -> Retriever:
    """Ingest ``paths`` through the real pipeline (a second run on the same data dir embeds
    nothing), say what it did on stderr, and return a retriever over the result."""
    from ingest.pipeline import Pipeline

    pipeline = Pipeline(settings, progress=progress)
    if embedder is not None:
        pipeline.embedder = embedder
    report = pipeline.run(list(paths))
    for path, msg in report.errors:
        print(f"eval: {path}: {msg}", file=sys.stderr)
    print(
        f"ingest: {report.chunks_added} chunks embedded, {report.files_unchanged} files "
        f"unchanged, {report.seconds:.1f}s",
        file=sys.stderr,
    )
    return Retriever(settings, embedder=pipeline.embedder)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rag_chat.eval", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("dataset", type=Path, help="a BEIR-format folder")
    p.add_argument("--split", default="test", help="qrels split (qrels/SPLIT.tsv); default test")
    p.add_argument(
        "--mode",
        nargs="+",
        default=["dense-first", "dense", "bm25", "hybrid"],
        choices=["dense-first", "dense", "bm25", "hybrid"],
        help="dense-first: each document ranked by its first chunk only (the published protocol)",
    )
    p.add_argument("--collection", help="collection for the corpus (default: beir-FOLDERNAME)")
    p.add_argument(
        "--backend",
        choices=["torch", "onnx", "onnx-int8"],
        help="embedding backend (default: RAG_EMBEDDING_BACKEND); int8 gets its own collection",
    )
    p.add_argument(
        "--url",
        help="query a running server's POST /api/search instead (started on the same collection)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)

    try:
        data = load_dataset(args.dataset, args.split)
    except DatasetError as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 2
    settings = Settings()
    if args.backend:
        settings = settings.model_copy(update={"embedding_backend": args.backend})
    suffix = "-int8" if settings.embedding_backend == "onnx-int8" else ""
    collection = args.collection or f"beir-{args.dataset.resolve().name}{suffix}"
    settings = settings.model_copy(update={"collection": collection})

    retriever = ingest_for_eval(settings, [data.corpus], progress=None)
    results = {}
    for mode in args.mode:
        scores, ms = evaluate(retriever, data, mode, args.url)
        results[mode] = {**scores, "ms_per_query": ms}
    if args.json:
        print(
            json.dumps(
                {
                    "dataset": str(args.dataset),
                    "split": args.split,
                    "queries": len(data.queries),
                    "results": results,
                },
                indent=2,
            )
        )
    else:
        print(f"{args.dataset.name} ({args.split}, {len(data.queries)} queries, document level)")
        print(f"{'mode':8} {'nDCG@10':>8} {'R@10':>7} {'R@100':>7} {'MRR@10':>7} {'ms/query':>9}")
        for mode, r in results.items():
            print(
                f"{mode:8} {r['nDCG@10']:8.4f} {r['Recall@10']:7.4f} {r['Recall@100']:7.4f} "
                f"{r['MRR@10']:7.4f} {r['ms_per_query']:9.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
