"""What storing chunk texts in an embedded Chroma costs: the same vectors and metadata upserted
with and without their texts, side by side (alternating, in fresh collections).

    .venv/bin/python benchmarks/chroma_texts.py [corpus.jsonl] [--docs 1500] [--rounds 2]
    .venv/bin/python benchmarks/chroma_texts.py --metadata [--docs 1500] [--rounds 3]

Chroma's local store builds a full-text (trigram) index of every text it holds; rag_chat keeps
chunk texts in the ingest manifest instead (see rag_chat/retrieval/store.py). Also prints
whether Chroma's FTS tables filled when its ``Schema`` asked for no full-text index.

``--metadata``: the same vectors (no texts) with the nine metadata fields ingest gives a chunk,
with ``position`` alone (what an embedded Chroma gets now: the manifest holds the rest), and
with none.
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BATCH = 375


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    default = ROOT.parent / "shared" / "datasets" / "scifact" / "corpus.jsonl"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path, nargs="?", default=default)
    p.add_argument("--docs", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--metadata", action="store_true", help="compare metadata, not texts")
    args = p.parse_args()
    if not args.corpus.is_file():
        print(f"corpus not found: {args.corpus} (pass a BEIR corpus.jsonl)", file=sys.stderr)
        return 2
    import chromadb
    from chromadb import FtsIndexConfig, Schema, VectorIndexConfig
    from chromadb.config import Settings

    with args.corpus.open() as f:
        records = [json.loads(line) for _, line in zip(range(args.docs), f, strict=False)]
    texts = [f"{r.get('title', '')}\n{r.get('text', '')}" for r in records]
    vectors = np.random.default_rng(0).standard_normal((len(texts), 384)).astype(np.float32)
    metas = [{"source": "corpus", "doc_id": str(r["_id"]), "position": 0} for r in records]
    if args.metadata:
        return compare_metadata(records, vectors, args.rounds)
    print(f"{len(texts)} texts, {sum(map(len, texts)):,} characters; upserted {BATCH} at a time")
    for round_ in range(args.rounds):
        sides = ["with texts", "without", "with texts, Schema: no FTS"]
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            with tempfile.TemporaryDirectory() as tmp:
                client = chromadb.PersistentClient(
                    path=tmp, settings=Settings(anonymized_telemetry=False)
                )
                if side.endswith("no FTS"):
                    schema = Schema()
                    schema.create_index(
                        config=VectorIndexConfig(space="cosine", embedding_function=None)
                    )
                    schema.delete_index(config=FtsIndexConfig(), key="#document")
                    col = client.create_collection("bench", schema=schema, embedding_function=None)
                else:
                    col = client.create_collection(
                        "bench", metadata={"hnsw:space": "cosine"}, embedding_function=None
                    )
                t0, c0 = time.perf_counter(), cpu()
                for i in range(0, len(texts), BATCH):
                    col.upsert(
                        ids=[str(j) for j in range(i, min(i + BATCH, len(texts)))],
                        embeddings=vectors[i : i + BATCH],
                        documents=None if side == "without" else texts[i : i + BATCH],
                        metadatas=metas[i : i + BATCH],
                    )
                wall, used = time.perf_counter() - t0, cpu() - c0
                db = sqlite3.connect(f"{tmp}/chroma.sqlite3")
                fts = db.execute("SELECT COUNT(*) FROM embedding_fulltext_search").fetchone()[0]
                db.close()
                print(
                    f"round {round_ + 1}  {side:28} {wall:6.2f} s wall  {used:6.2f} s CPU  "
                    f"full-text rows {fts}"
                )
    return 0


def compare_metadata(records: list[dict[str, Any]], vectors: np.ndarray, rounds: int) -> int:
    import chromadb
    from chromadb.config import Settings

    full = [
        {
            "source": "../shared/datasets/scifact/corpus.jsonl",
            "doc_id": str(r["_id"]),
            "title": str(r.get("title", ""))[:200],
            "heading": "",
            "position": 0,
            "content_hash": f"{i:032x}",
            "tokens": 200,
            "kind": "jsonl",
        }
        for i, r in enumerate(records)
    ]
    sides: dict[str, list[dict[str, Any]] | None] = {
        "all nine fields": full,
        "position only": [{"position": m["position"]} for m in full],
        "none": None,
    }
    print(f"{len(records)} vectors, no texts; upserted {BATCH} at a time")
    for round_ in range(rounds):
        names = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
        for side in names:
            metas = sides[side]
            with tempfile.TemporaryDirectory() as tmp:
                client = chromadb.PersistentClient(
                    path=tmp, settings=Settings(anonymized_telemetry=False)
                )
                col = client.create_collection(
                    "bench", metadata={"hnsw:space": "cosine"}, embedding_function=None
                )
                t0, c0 = time.perf_counter(), cpu()
                for i in range(0, len(records), BATCH):
                    j = min(i + BATCH, len(records))
                    col.upsert(
                        ids=[str(n) for n in range(i, j)],
                        embeddings=vectors[i:j],
                        metadatas=None if metas is None else metas[i:j],  # type: ignore[arg-type]
                    )
                wall, used = time.perf_counter() - t0, cpu() - c0
                print(f"round {round_ + 1}  {side:16} {wall:6.2f} s wall  {used:6.2f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
