"""Ingest throughput on a BEIR corpus next to the raw embedding model, measured in one run.

    .venv/bin/python benchmarks/ingest_throughput.py [corpus.jsonl] [--limit DOCS]
                     [--backend torch|onnx|onnx-int8] [--flush-chunks N]

Prints, for the same chunk texts (the corpus in 4 segments, the two sides alternating):
  raw       the embedding model alone, same backend (the ceiling for an ingest pipeline)
  pipeline  python -m ingest's pipeline: parse, chunk, embed, write Chroma + manifest + BM25
and the ratio pipeline/raw in chunks per second, then the wall time of a second, no-change
``python -m ingest`` run (a fresh process, as a user would run it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ingest.pipeline as pipeline_module  # noqa: E402
from ingest.loaders import load  # noqa: E402
from ingest.pipeline import Pipeline  # noqa: E402
from rag_chat.settings import Settings  # noqa: E402

SEGMENTS = 4


def main() -> int:
    default = ROOT.parent / "shared" / "datasets" / "scifact" / "corpus.jsonl"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path, nargs="?", default=default)
    p.add_argument("--limit", type=int, help="only the first N documents")
    p.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"])
    p.add_argument(
        "--flush-chunks",
        type=int,
        help="embed and write in batches of this many chunks (the pipeline's FLUSH_CHUNKS, "
        "2048): smaller batches overlap the writer with the next batch's embedding",
    )
    args = p.parse_args()
    corpus = args.corpus
    if not corpus.is_file():
        print(f"corpus not found: {corpus} (pass a BEIR corpus.jsonl)", file=sys.stderr)
        return 2
    lines = [line for line in corpus.read_text().splitlines() if line.strip()][: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        parts_dir = Path(tmp) / "parts"
        parts_dir.mkdir()
        size = -(-len(lines) // SEGMENTS)
        parts = []
        for i in range(SEGMENTS):
            part = parts_dir / f"part{i}.jsonl"
            part.write_text("\n".join(lines[i * size : (i + 1) * size]) + "\n")
            parts.append(part)
        settings = Settings(data_dir=Path(tmp) / "state", collection="bench")
        if args.backend:
            settings = settings.model_copy(update={"embedding_backend": args.backend})
        if settings.embedding_cache_dir is None:  # reuse the export of the project's data dir
            cache = ROOT / "data" / ".rag" / "models"
            settings = settings.model_copy(update={"embedding_cache_dir": cache})
        if args.flush_chunks:
            pipeline_module.FLUSH_CHUNKS = args.flush_chunks
        pipeline = Pipeline(settings, progress=False)
        emb = pipeline.embedder
        emb.encode(["warm up the model"] * 8)  # load the weights outside the timings

        # Raw encoding and the pipeline alternate over segments of the corpus, so that any
        # change in machine load falls on both sides alike.
        raw = full = embed = write = opened = waited = keyword = 0.0
        n_docs = n_chunks = n_tokens = 0
        for i, part in enumerate(parts):
            docs = load(part)
            texts = [
                c.embed_text
                for d in docs
                for c in pipeline.chunker.chunk(d, f"{part.resolve()}#{d.doc_id}")
            ]
            n_docs += len(docs)
            n_chunks += len(texts)
            n_tokens += sum(pipeline.chunker.tok.count_many(texts)) + 2 * len(texts)  # type: ignore[attr-defined]
            order = ("raw", "pipeline") if i % 2 == 0 else ("pipeline", "raw")
            for side in order:
                t0 = time.perf_counter()
                if side == "raw":
                    emb.encode(texts)
                    raw += time.perf_counter() - t0
                else:
                    report = pipeline.run([part])
                    full += time.perf_counter() - t0
                    assert report.ok and report.chunks_added == len(texts), report
                    embed += report.embed_seconds
                    write += report.write_seconds
                    opened += report.open_seconds
                    waited += report.writer_wait_seconds
                    keyword += report.keyword_seconds

        env = {
            **os.environ,
            "RAG_DATA_DIR": str(settings.data_dir),
            "RAG_COLLECTION": "bench",
            "RAG_EMBEDDING_BACKEND": settings.embedding_backend,
        }
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "ingest", str(parts_dir), "-q"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        again = time.perf_counter() - t0

    print(f"corpus: {corpus} — {n_docs} documents, {n_chunks} chunks, {n_tokens} tokens")
    print(f"embedding backend: {settings.embedding_backend}")
    print(f"{'':10}{'seconds':>9}{'docs/s':>9}{'chunks/s':>10}{'tokens/s':>10}")
    for name, secs in (("raw", raw), ("pipeline", full)):
        print(
            f"{name:10}{secs:9.1f}{n_docs / secs:9.1f}{n_chunks / secs:10.1f}"
            f"{n_tokens / secs:10.0f}"
        )
    print(f"pipeline / raw throughput: {raw / full:.3f}")
    print(
        f"pipeline time: embedding {embed:.2f}s, waiting for the writer {waited:.2f}s, "
        f"keyword index {keyword:.2f}s, the rest (hashing, parsing, chunking) "
        f"{full - embed - waited - keyword:.2f}s; the writer thread's own work (Chroma, "
        f"manifest, BM25 terms) {write:.2f}s and opening the store {opened:.2f}s, beside the "
        f"rest; flush batches of {pipeline_module.FLUSH_CHUNKS} chunks (writes overlap "
        f"embedding only across batches)"
    )
    print(f"second run, nothing changed ({n_docs} documents, fresh process, wall): {again:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
