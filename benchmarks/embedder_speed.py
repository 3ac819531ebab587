"""The embedding backends side by side: torch (sentence-transformers), ONNX Runtime fp32 and int8.

    .venv/bin/python benchmarks/embedder_speed.py [--chunks 512] [--queries 200] [--rounds 3]

The same all-MiniLM-L6-v2 weights, the same texts: real SciFact chunks made by the ingest
chunker (batch throughput, as ingest embeds) and SciFact claims one at a time (query latency, as
the server embeds a question). Backends take turns within each round, so a busy machine slows
them alike; ratios are against torch measured in the same run. Also printed: how close each
backend's vectors are to torch's (cosine). Retrieval quality per backend comes from
``python -m rag_chat.eval ... --backend`` (the SciFact nDCG@10 the issue asks to keep within 0.005).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.chunking import Chunker, HFTokenizer
from ingest.loaders import load
from rag_chat.retrieval.embedder import BACKENDS, Embedder

OUT = Path(__file__).resolve().parent / "out"
SCIFACT = Path(
    os.environ.get("SCIFACT_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, default=SCIFACT, help="a BEIR folder (SciFact)")
    p.add_argument("--chunks", type=int, default=512, help="chunks per batch-throughput round")
    p.add_argument("--queries", type=int, default=200, help="single queries per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    if not (args.dataset / "corpus.jsonl").is_file():
        print(f"{args.dataset}/corpus.jsonl not found: pass --dataset", file=sys.stderr)
        return 2

    embedders = {
        b: Embedder(batch_size=args.batch_size, backend=b, cache_dir=Path("data/.rag/models"))
        for b in BACKENDS
    }
    ref = embedders["torch"]
    docs = load(args.dataset / "corpus.jsonl")
    chunker = Chunker(HFTokenizer(ref.tokenizer_path), 256, 32)
    chunks = [c.embed_text for d in docs[: args.chunks] for c in chunker.chunk(d, d.doc_id)]
    chunks = chunks[: args.chunks]
    queries = [
        json.loads(line)["text"] for line in (args.dataset / "queries.jsonl").open() if line.strip()
    ][: args.queries]
    for name, e in embedders.items():
        t0 = time.perf_counter()
        e.load()
        e.encode(chunks[:8])
        print(f"{name:10s} loaded in {time.perf_counter() - t0:.1f} s", flush=True)

    batch_s: dict[str, list[float]] = {b: [] for b in BACKENDS}
    query_ms: dict[str, list[float]] = {b: [] for b in BACKENDS}
    vectors: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for name, e in embedders.items():
            t0 = time.perf_counter()
            vectors[name] = e.encode(chunks)
            batch_s[name].append(time.perf_counter() - t0)
            for q in queries:
                t1 = time.perf_counter()
                e.encode([q])
                query_ms[name].append((time.perf_counter() - t1) * 1000)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    base = statistics.median(batch_s["torch"])
    base_q = statistics.median(query_ms["torch"])
    print()
    print(f"{len(chunks)} SciFact chunks per batch round, {len(queries)} single queries per round")
    print(
        f"{'backend':10s} {'chunks/s':>9s} {'x torch':>8s} {'query p50':>10s} {'p99':>8s} "
        f"{'x torch':>8s} {'cos vs torch (mean/min)':>24s}"
    )
    rows = {}
    for name in BACKENDS:
        med = statistics.median(batch_s[name])
        qs = sorted(query_ms[name])
        q50 = statistics.median(qs)
        q99 = qs[int(0.99 * (len(qs) - 1))]
        cos = (vectors[name] * vectors["torch"]).sum(axis=1)
        rows[name] = {
            "chunks_per_s": len(chunks) / med,
            "speedup_batch": base / med,
            "query_p50_ms": q50,
            "query_p99_ms": q99,
            "speedup_query": base_q / q50,
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
        }
        print(
            f"{name:10s} {len(chunks) / med:9.1f} {base / med:8.2f} {q50:8.1f}ms {q99:6.1f}ms "
            f"{base_q / q50:8.2f} {cos.mean():15.5f} / {cos.min():.5f}"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "embedder_speed.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
