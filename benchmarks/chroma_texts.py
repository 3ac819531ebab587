"""What storing chunk texts in an embedded Chroma costs: the same vectors and metadata upserted
with and without their texts, side by side (alternating, in fresh collections).

    .venv/bin/python benchmarks/chroma_texts.py [corpus.jsonl] [--docs 1500] [--rounds 2]

Chroma's local store builds a full-text (trigram) index of every text it holds; rag_chat keeps
chunk texts in the ingest manifest instead (see rag_chat/retrieval/store.py). Also prints
whether Chroma's FTS tables filled when its ``Schema`` asked for no full-text index.
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


if __name__ == "__main__":
    sys.exit(main())
