"""An upload job of many files into a big index: the keyword index rebuilt once per job (what
rag_chat/uploads.py does) next to once per file (what it did before), measured in one run.

    .venv/bin/python benchmarks/upload_job.py [--data-dir D] [--files 20] [--rounds 2]

Each round copies the index in ``--data-dir`` twice (default: benchmarks/out/scifact-index,
built by ``python -m ingest ../shared/datasets/scifact/corpus.jsonl data/``), writes ``--files``
new Markdown files (SciFact abstracts with a marker that makes each file new) and ingests them
file by file into each copy, as an upload job does, through the real pipeline (real model,
Chroma, manifest, BM25), the two sides alternating which goes first:

  per file  Pipeline.run([file]) for each: the keyword index rebuilt after every file
  per job   Pipeline.run([file], keyword=False) for each, then refresh_keyword_index() once

and prints each side's wall time, how much of it went to rebuilding the keyword index, and
the ratio. Both copies end with the same chunks in their keyword index (checked).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest.pipeline import Pipeline  # noqa: E402
from rag_chat.retrieval.embedder import Embedder  # noqa: E402
from rag_chat.retrieval.keyword import KeywordIndex  # noqa: E402
from rag_chat.settings import Settings  # noqa: E402


def write_files(folder: Path, n: int, round_no: int) -> list[Path]:
    corpus = ROOT.parent / "shared" / "datasets" / "scifact" / "corpus.jsonl"
    records = []
    if corpus.is_file():
        with corpus.open() as fh:
            for line, _ in zip(fh, range(n), strict=False):
                records.append(json.loads(line))
    guide = sorted((ROOT / "data" / "guide").glob("*.md"))
    while len(records) < n:  # without the dataset: the project's own guide
        page = guide[len(records) % len(guide)]
        records.append({"title": page.stem, "text": page.read_text()})
    folder.mkdir(parents=True)
    paths = []
    for i, rec in enumerate(records):
        path = folder / f"upload-{round_no}-{i:02d}.md"
        path.write_text(
            f"# {rec['title']}\n\nUpload marker r{round_no}f{i} quux{round_no}x{i}.\n\n"
            f"{rec['text']}\n"
        )
        paths.append(path)
    return paths


def keyword_ids(settings: Settings) -> list[str]:
    return list(KeywordIndex.load(settings.collection_dir() / "bm25").ids)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "out" / "scifact-index")
    p.add_argument("--files", type=int, default=20, help="files per job (the upload limit: 20)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    base = Settings(data_dir=args.data_dir)
    if not (base.collection_dir() / "manifest.sqlite3").is_file():
        print(
            f"no index in {args.data_dir}: build one with RAG_DATA_DIR={args.data_dir} "
            "python -m ingest ../shared/datasets/scifact/corpus.jsonl data/",
            file=sys.stderr,
        )
        return 2
    cache = base.embedding_cache_dir or args.data_dir / "models"
    emb = Embedder.from_settings(base.model_copy(update={"embedding_cache_dir": cache}))
    emb.encode(["warm up the model"] * 8)
    start = len(keyword_ids(base))

    wall = {"per file": 0.0, "per job": 0.0}
    rebuild = {"per file": 0.0, "per job": 0.0}
    rebuilds = {"per file": 0, "per job": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            files = write_files(Path(tmp) / f"files{r}", args.files, r)
            order = ["per file", "per job"] if r % 2 == 0 else ["per job", "per file"]
            ends = []
            for side in order:
                state = Path(tmp) / f"state-{r}-{side.replace(' ', '-')}"
                shutil.copytree(args.data_dir, state, ignore=shutil.ignore_patterns("models"))
                settings = base.model_copy(update={"data_dir": state, "embedding_cache_dir": cache})
                pipe = Pipeline(settings, embedder=emb, progress=False)
                t0 = time.perf_counter()
                for f in files:
                    report = pipe.run([f], prune=False, keyword=side == "per file")
                    assert report.ok and report.chunks_added > 0, report.errors
                    rebuild[side] += report.keyword_seconds
                    rebuilds[side] += report.keyword_seconds > 0
                took = pipe.refresh_keyword_index()
                wall[side] += time.perf_counter() - t0
                if took is not None:
                    rebuild[side] += took
                    rebuilds[side] += 1
                ends.append(sorted(keyword_ids(settings)))
                shutil.rmtree(state)
            assert ends[0] == ends[1] and len(ends[0]) > start, "the two sides differ"
            print(f"round {r + 1}: {args.files} files, keyword index {start:,} → {len(ends[0]):,}")

    jobs = args.rounds
    print(f"\nindex: {args.data_dir} ({start:,} chunks); {jobs} jobs of {args.files} files each")
    print(f"{'':10}{'s/job':>8}{'rebuilds/job':>14}{'rebuild s/job':>15}")
    for side in ("per file", "per job"):
        print(
            f"{side:10}{wall[side] / jobs:8.2f}{rebuilds[side] / jobs:14.1f}"
            f"{rebuild[side] / jobs:15.2f}"
        )
    print(f"per job / per file wall time: {wall['per job'] / wall['per file']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
