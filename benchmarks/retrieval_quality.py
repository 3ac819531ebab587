"""Retrieval-quality experiments on SciFact: which technique helps, by how much, at what cost.

    .venv/bin/python benchmarks/retrieval_quality.py ../shared/datasets/scifact

Chunks are made by the ingest chunker (the same code as ``python -m ingest``) and embedded once
with the configured backend (cached in benchmarks/out/rq-cache/); BM25 uses the ingest's own
``terms()``. Every candidate setting is then scored in memory with exact dense search, so one
run compares dozens of settings in minutes. The final setting is checked end to end by
``python -m rag_chat.eval`` (real ingest, Chroma, ``/api/search``).

No tuning on single queries: settings are chosen by the aggregate. To show they are not fitted
to these 809 claims, every row also gives nDCG@10 on the two halves of the queries (even and
odd ids): a setting chosen on one half and reported on the other, and the selection is done
on half A only (``--select-on A``), then reported on half B.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.chunking import Chunker, HFTokenizer
from ingest.loaders import load
from rag_chat.eval import load_dataset, metrics
from rag_chat.retrieval.embedder import Embedder
from rag_chat.retrieval.keyword import terms

OUT = Path(__file__).resolve().parent / "out"


def load_chunks(corpus: Path, embedder: Embedder, size: int, overlap: int) -> list[Any]:
    docs = load(corpus)
    chunker = Chunker(HFTokenizer(embedder.tokenizer_path), size, overlap)
    return [c for d in docs for c in chunker.chunk(d, d.doc_id)]


def cached_embeddings(name: str, texts: list[str], embedder: Embedder) -> np.ndarray:
    path = OUT / "rq-cache" / f"{name}-{embedder.backend}-{len(texts)}.npy"
    if path.is_file():
        return np.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vecs = embedder.encode(texts, batch_size=64)
    print(f"  embedded {len(texts)} {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    np.save(path, vecs)
    return vecs


def vectors_from_index(data_dir: Path, chunks: list[Any]) -> np.ndarray:
    """The chunk vectors an ingest already stored in Chroma (matched by content hash, which
    the manifest holds: an embedded Chroma keeps no metadata but ``position``)."""
    import chromadb

    from rag_chat.retrieval.store import ChunkTexts

    client = chromadb.PersistentClient(path=str(data_dir / "chroma"))
    col = client.get_collection("docs")
    manifest = ChunkTexts(data_dir / "collections" / "docs" / "manifest.sqlite3")
    by_hash: dict[str, np.ndarray] = {}
    offset = 0
    while True:
        page = col.get(include=["embeddings"], limit=5000, offset=offset)
        metas = manifest.get(page["ids"])
        for cid, vec in zip(page["ids"], page["embeddings"], strict=True):
            if cid in metas:
                by_hash[str(metas[cid][1]["content_hash"])] = np.asarray(vec, dtype=np.float32)
        if len(page["ids"]) < 5000:
            break
        offset += 5000
    missing = [c for c in chunks if c.content_hash not in by_hash]
    if missing:
        raise SystemExit(f"{len(missing)} chunks are not in {data_dir}: ingest the corpus there")
    print(f"  {len(chunks)} chunk vectors read from {data_dir}", flush=True)
    return np.stack([by_hash[c.content_hash] for c in chunks])


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.data = load_dataset(args.dataset, args.split)
        self.embedder = Embedder(
            batch_size=64, backend=args.backend, cache_dir=Path("data/.rag/models")
        )
        t0 = time.perf_counter()
        self.chunks = load_chunks(self.data.corpus, self.embedder, args.chunk_tokens, 32)
        print(f"{len(self.chunks)} chunks in {time.perf_counter() - t0:.1f} s", flush=True)
        self.doc_of = np.array([c.doc_id for c in self.chunks])
        self.docs = sorted(set(self.doc_of.tolist()))
        self.doc_index = {d: i for i, d in enumerate(self.docs)}
        self.chunk_doc = np.array([self.doc_index[d] for d in self.doc_of])
        self.qids = [q for q in self.data.queries if q in self.data.qrels]
        self.qtexts = [self.data.queries[q] for q in self.qids]
        tag = f"c{args.chunk_tokens}"
        if args.vectors_from:
            self.cvec = vectors_from_index(args.vectors_from, self.chunks)
        else:
            self.cvec = cached_embeddings(
                f"chunks-{tag}", [c.embed_text for c in self.chunks], self.embedder
            )
        self.qvec = cached_embeddings("queries", self.qtexts, self.embedder)
        self.chunk_terms = [terms(c.embed_text) for c in self.chunks]
        self.query_terms = [terms(q) for q in self.qtexts]
        self.halves = {
            "A": [i for i, q in enumerate(self.qids) if int(q) % 2 == 0],
            "B": [i for i, q in enumerate(self.qids) if int(q) % 2 == 1],
        }

    # ---- rankers: a (queries x chunks) score matrix ----
    def dense(self, qvec: np.ndarray) -> np.ndarray:
        return qvec @ self.cvec.T

    def bm25(self, k1: float = 1.5, b: float = 0.75, query_terms: Any = None) -> np.ndarray:
        import bm25s

        model = bm25s.BM25(k1=k1, b=b)
        model.index(self.chunk_terms, show_progress=False)
        vocab = model.vocab_dict
        qt = query_terms or self.query_terms
        out = np.zeros((len(qt), len(self.chunks)), dtype=np.float32)
        for i, q in enumerate(qt):
            known = [t for t in q if t in vocab]
            if known:
                out[i] = model.get_scores(known)
        return out

    # ---- document level: best chunk per document ----
    def doc_scores(self, chunk_scores: np.ndarray) -> np.ndarray:
        out = np.full((chunk_scores.shape[0], len(self.docs)), -np.inf, dtype=np.float32)
        order = np.argsort(self.chunk_doc, kind="stable")
        bounds = np.flatnonzero(np.diff(self.chunk_doc[order])) + 1
        groups = np.split(order, bounds)
        for g in groups:
            out[:, self.chunk_doc[g[0]]] = chunk_scores[:, g].max(axis=1)
        return out

    def evaluate(self, doc_scores: np.ndarray, rows: list[int] | None = None) -> dict[str, float]:
        rows = list(range(len(self.qids))) if rows is None else rows
        top = np.argsort(-doc_scores[rows], axis=1)[:, :100]
        run = {self.qids[r]: [self.docs[j] for j in top[i]] for i, r in enumerate(rows)}
        qrels = {self.qids[r]: self.data.qrels[self.qids[r]] for r in rows}
        return metrics(run, qrels)

    def report(self, name: str, doc_scores: np.ndarray, results: list[dict[str, Any]]) -> None:
        m = self.evaluate(doc_scores)
        a = self.evaluate(doc_scores, self.halves["A"])["nDCG@10"]
        b = self.evaluate(doc_scores, self.halves["B"])["nDCG@10"]
        row = {"name": name, **m, "ndcg@10 A": a, "ndcg@10 B": b}
        results.append(row)
        print(
            f"{name:58s} nDCG@10 {m['nDCG@10']:.4f}  R@10 {m['Recall@10']:.4f}  "
            f"R@100 {m['Recall@100']:.4f}  | A {a:.4f}  B {b:.4f}",
            flush=True,
        )


def minmax(x: np.ndarray, top: int = 100) -> np.ndarray:
    """Per query, scaled so the top-`top` candidates span [0, 1]; the rest clip at 0."""
    part = -np.partition(-x, top - 1, axis=1)[:, :top]
    hi = part.max(axis=1, keepdims=True)
    lo = part.min(axis=1, keepdims=True)
    return np.clip((x - lo) / np.maximum(hi - lo, 1e-9), 0, None)


def zscore(x: np.ndarray, top: int = 100) -> np.ndarray:
    part = -np.partition(-x, top - 1, axis=1)[:, :top]
    mu = part.mean(axis=1, keepdims=True)
    sd = part.std(axis=1, keepdims=True)
    return (x - mu) / np.maximum(sd, 1e-9)


def convex(dense: np.ndarray, sparse: np.ndarray, w: float) -> np.ndarray:
    return w * minmax(dense) + (1 - w) * minmax(sparse)


def rrf(*mats: np.ndarray, k: int = 60, depth: int = 100, weights: Any = None) -> np.ndarray:
    out = np.zeros_like(mats[0])
    weights = weights or [1.0] * len(mats)
    for w, m in zip(weights, mats, strict=True):
        order = np.argsort(-m, axis=1)[:, :depth]
        rows = np.arange(m.shape[0])[:, None]
        out[rows, order] += w / (k + 1 + np.arange(depth))[None, :]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", type=Path)
    p.add_argument("--split", default="train")
    p.add_argument("--backend", default="onnx", choices=["torch", "onnx", "onnx-int8"])
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument(
        "--vectors-from",
        type=Path,
        help="read chunk vectors from this ingested RAG_DATA_DIR (collection docs) instead",
    )
    args = p.parse_args()
    bench = Bench(args)
    results: list[dict[str, Any]] = []
    dense_c = bench.dense(bench.qvec)
    dense = bench.doc_scores(dense_c)
    bench.report("dense (best chunk per doc)", dense, results)
    bm = {}
    for k1, b in [(1.5, 0.75), (0.9, 0.4), (1.2, 0.75), (1.2, 0.5)]:
        bm[(k1, b)] = bench.doc_scores(bench.bm25(k1, b))
        bench.report(f"bm25 k1={k1} b={b}", bm[(k1, b)], results)
    sparse = bm[(1.5, 0.75)]
    bench.report("hybrid RRF k=60 (current)", rrf(dense, sparse), results)
    for w in (0.3, 0.4, 0.5, 0.6, 0.7):
        bench.report(f"convex minmax dense={w}", convex(dense, sparse, w), results)
        bench.report(
            f"convex zscore dense={w}", w * zscore(dense) + (1 - w) * zscore(sparse), results
        )
    # chunk-level fusion (what a chunk retriever does), then best chunk per document
    for w in (0.4, 0.5, 0.6):
        sparse_c = bench.bm25(1.5, 0.75)
        fused_c = convex(dense_c, sparse_c, w)
        bench.report(f"chunk-level convex minmax dense={w}", bench.doc_scores(fused_c), results)
    # pseudo-relevance feedback on the dense side: move the query toward its top fused chunks
    sparse_c = bench.bm25(1.5, 0.75)
    first = convex(dense_c, sparse_c, 0.5)
    for m in (3, 5, 10):
        top = np.argsort(-first, axis=1)[:, :m]
        centroid = bench.cvec[top].mean(axis=1)
        for beta in (0.5, 1.0, 2.0):
            q2 = bench.qvec + beta * centroid
            q2 /= np.linalg.norm(q2, axis=1, keepdims=True)
            d2 = bench.dense(q2)
            bench.report(f"dense PRF m={m} beta={beta}", bench.doc_scores(d2), results)
            for w in (0.5, 0.6):
                fused = convex(d2, sparse_c, w)
                bench.report(f"  + convex chunk dense={w}", bench.doc_scores(fused), results)
    # RM3-like expansion of the BM25 query from the top fused chunks
    for m, t in ((5, 10), (10, 20), (3, 10)):
        top = np.argsort(-first, axis=1)[:, :m]
        expanded = []
        for i, q in enumerate(bench.query_terms):
            counts: dict[str, float] = defaultdict(float)
            for j in top[i]:
                tl = bench.chunk_terms[j]
                for term in tl:
                    counts[term] += 1.0 / max(len(tl), 1)
            extra = [w for w, _ in sorted(counts.items(), key=lambda kv: -kv[1]) if w not in q][:t]
            expanded.append(q + q + extra)
        s2 = bench.bm25(1.5, 0.75, expanded)
        bench.report(f"bm25 RM3 m={m} terms={t}", bench.doc_scores(s2), results)
        bench.report(
            "  + convex chunk dense=0.5", bench.doc_scores(convex(dense_c, s2, 0.5)), results
        )
    out = OUT / "retrieval_quality.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
