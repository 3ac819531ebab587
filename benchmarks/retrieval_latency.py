"""Hybrid retrieval latency at 10,000 and 100,000 chunks, in-process and through /api/search.

    .venv/bin/python benchmarks/retrieval_latency.py --data-dir DIR [--collection NAME]
                     [--sizes 10000,100000] [--queries 300] [--k 5] [--no-http]
                     [--vectors perturbed|random] [--rebuild]

The indexes. ``--data-dir`` is a real ingested index (SciFact: see benchmarks/README.md), the
*seed*. An index of S chunks holds the seed's chunks as they are (up to S of them) plus, to make
up the rest, SYNTHETIC chunks: each a perturbed copy of a random seed chunk, written straight
into a Chroma collection and a BM25 index through the classes the ingest pipeline uses
(``VectorStore.upsert``, ``KeywordIndex.from_terms(...).save``, the same ``terms``) without
embedding anything:

  vector  ``perturbed`` (default): the seed chunk's real vector plus Gaussian noise,
          renormalised (cosine 0.80-0.94 to its parent), so the vector space keeps the seed's
          neighbourhoods; ``random``: a random unit vector (no structure at all: a pessimistic
          case for the HNSW graph)
  text    about 70 % of the parent's sentences, in order, plus one or two sentences of another
          seed chunk (the BM25 postings grow like a ten times bigger corpus of the same field)

Built indexes are kept in benchmarks/out/retrieval-index/ and reused while the seed and the
parameters are unchanged (``--rebuild`` builds them again). The seed itself is measured too
("ingested").

The measurement: ``Retriever.search(query, k, "hybrid")`` (what every answer runs: MiniLM
query embedding, Chroma top 100, BM25 top 100, convex fusion, texts of the top k, and the
vectors of those only BM25 found)
in this process, and ``POST /api/search`` on a ``python -m rag_chat`` per index (a token server
as its LLM; Redis DB 14, own prefix, deleted afterwards), for ``--queries`` SciFact queries
(the guide's questions when SciFact is absent), after a warm-up. The indexes take turns query
by query, and in-process and HTTP take turns in which goes first, so that drift in the
machine's load hits them all. Then the stages one by one (embed, Chroma, BM25, fuse) for a
breakdown. Goal: p50 ≤ 20 ms at 100,000 chunks.
Without ``--data-dir`` the seed is the bundled guide (data/, a few dozen chunks): a smoke run.
Raw samples: benchmarks/out/retrieval_latency.json; plot: retrieval_latency.png.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._bench import (  # noqa: E402
    OUT,
    delete_prefix,
    dist,
    fmt,
    guide_index,
    index_chunks,
    new_prefix,
    pct,
    plot_distributions,
    queries,
    save_json,
    start_rag_chat,
    start_token_server,
    verdict,
    wait_ready,
)
from ingest.manifest import ChunkRow, Manifest, encode_meta  # noqa: E402
from rag_chat.retrieval.embedder import Embedder  # noqa: E402
from rag_chat.retrieval.keyword import KeywordIndex, terms  # noqa: E402
from rag_chat.retrieval.search import Retriever  # noqa: E402
from rag_chat.retrieval.store import ChunkTexts, VectorStore, make_client  # noqa: E402
from rag_chat.settings import Settings  # noqa: E402

BUILD_VERSION = "4"  # 2: BM25 entries with their neighbours; 3: texts in the manifest;
# 4: an embedded Chroma gets position only, as ingest writes it
SYNTH_COLLECTION = "bench"
WRITE_BATCH = 10_000
GOAL_P50_MS = 20.0
GOAL_AT = 100_000
WARMUP = 5
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)")


@dataclass
class Level:
    name: str
    data_dir: Path
    collection: str
    chunks: int
    real: int
    synthetic: int
    retriever: Any = None
    search_ms: list[float] = field(default_factory=list)
    http_ms: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)


def settings_for(data_dir: Path, collection: str) -> Settings:
    return Settings(data_dir=data_dir, collection=collection, _env_file=None)  # type: ignore[call-arg]


# --- building the synthetic indexes ---


@dataclass
class Seed:
    ids: list[str]
    vectors: np.ndarray
    texts: list[str]
    metas: list[dict[str, Any]]
    key: str


def read_seed(data_dir: Path, collection: str, embedder: Embedder) -> Seed:
    manifest = settings_for(data_dir, collection).collection_dir() / "manifest.sqlite3"
    store = VectorStore(make_client(data_dir), collection, embedder.name, ChunkTexts(manifest))
    ids: list[str] = []
    vecs: list[Any] = []
    offset, page = 0, 5000
    while True:
        got = store.collection.get(include=["embeddings"], limit=page, offset=offset)
        ids += got["ids"]
        vecs += list(got["embeddings"])
        if len(got["ids"]) < page:
            break
        offset += page
    found = store.get(ids)  # texts and metadata: the manifest's (or Chroma's, an older index)
    texts = [found.get(cid, ("", {}))[0] for cid in ids]
    metas = [dict(found.get(cid, ("", {}))[1]) for cid in ids]
    order = np.argsort(ids)  # a stable order, whatever Chroma returns
    ids = [ids[i] for i in order]
    key = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
    return Seed(
        ids,
        np.asarray([vecs[i] for i in order], dtype=np.float32),
        [texts[i] for i in order],
        [metas[i] for i in order],
        key,
    )


def bm25_text(text: str, meta: dict[str, Any]) -> str:
    # the pipeline indexes a chunk's embed_text: its title/heading context, then the body
    context = " > ".join(str(x) for x in (meta.get("title"), meta.get("heading")) if x)
    return f"{context}\n{text}" if context else text


def synthesize(seed: Seed, size: int, vectors: str, rng: np.random.Generator) -> Seed:
    n_seed = len(seed.ids)
    real = min(size, n_seed)
    ids, texts, metas = seed.ids[:real], seed.texts[:real], seed.metas[:real]
    out_vecs = [seed.vectors[:real]]
    extra = size - real
    if extra > 0:
        dim = seed.vectors.shape[1]
        parents = rng.integers(0, n_seed, extra)
        others = rng.integers(0, n_seed, extra)
        noise = rng.standard_normal((extra, dim)).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        if vectors == "random":
            vecs = noise
        else:
            scale = rng.uniform(0.35, 0.75, (extra, 1)).astype(np.float32)
            vecs = seed.vectors[parents] + scale * noise
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        out_vecs.append(vecs)
        ids, texts, metas = list(ids), list(texts), list(metas)
        split = [_SENTENCE.split(t) for t in seed.texts]
        for j in range(extra):
            sentences = split[parents[j]]
            keep = [s for s in sentences if rng.random() < 0.7] or sentences[:1]
            donor = split[others[j]]
            for _ in range(int(rng.integers(1, 3))):
                keep.insert(int(rng.integers(0, len(keep) + 1)), donor[rng.integers(len(donor))])
            text = " ".join(keep)
            digest = hashlib.sha256(text.encode()).hexdigest()
            meta = dict(seed.metas[parents[j]])
            meta["doc_id"] = f"{meta.get('doc_id', 'doc')}~syn{j}"
            meta["content_hash"] = digest
            ids.append(f"syn{real + j:07d}-{digest[:12]}")
            texts.append(text)
            metas.append(meta)
    return Seed(ids, np.concatenate(out_vecs), texts, metas, seed.key)


def build_index(
    seed: Seed, size: int, vectors: str, embedder: Embedder, rebuild: bool
) -> tuple[Path, int, int]:
    """The data dir of an index of ``size`` chunks (built now, or reused); (dir, real, synth)."""
    real = min(size, len(seed.ids))
    params = {
        "version": BUILD_VERSION,
        "seed": seed.key,
        "size": size,
        "vectors": vectors,
        "model": embedder.name,
    }
    folder = OUT / "retrieval-index" / f"{seed.key}-{size}-{vectors}"
    marker = folder / "built.json"
    if not rebuild and marker.is_file() and json.loads(marker.read_text()) == params:
        return folder, real, size - real
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(size)
    synth = synthesize(seed, size, vectors, rng)
    settings = settings_for(folder, SYNTH_COLLECTION)
    store = VectorStore(make_client(folder), SYNTH_COLLECTION, embedder.name)
    for i in range(0, size, WRITE_BATCH):
        j = i + WRITE_BATCH
        # as ingest writes an embedded Chroma: vectors and position; texts and metadata in
        # the manifest
        positions = [{"position": int(m.get("position", 0))} for m in synth.metas[i:j]]
        store.upsert(synth.ids[i:j], synth.vectors[i:j], None, positions)
        print(f"  {size:,}: {min(j, size):,} chunks written to Chroma", end="\r", flush=True)
    # the entries an ingest writes: each document's chunks in order, with their neighbours
    order = sorted(
        range(size),
        key=lambda i: (str(synth.metas[i].get("doc_id")), int(synth.metas[i].get("position", 0))),
    )
    docs = [str(synth.metas[i].get("doc_id")) for i in order]
    own = [terms(bm25_text(synth.texts[i], synth.metas[i])) for i in order]
    by_doc: dict[str, list[ChunkRow]] = {}
    for i, doc_id, words in zip(order, docs, own, strict=True):
        meta = synth.metas[i]
        row = ChunkRow(
            synth.ids[i],
            int(meta.get("position", 0)),
            " ".join(words),
            synth.texts[i],
            encode_meta(meta),
        )
        by_doc.setdefault(doc_id, []).append(row)
    manifest = Manifest(settings.collection_dir() / "manifest.sqlite3")
    try:
        manifest.commit_docs([(d, "synthetic", d, "", rows) for d, rows in by_doc.items()])
    finally:
        manifest.close()
    KeywordIndex.from_terms(
        [synth.ids[i] for i in order], docs, own, settings.keyword_neighbours
    ).save(settings.collection_dir() / "bm25")
    marker.write_text(json.dumps(params))
    print(
        f"\r  built {size:,} chunks ({real:,} real + {size - real:,} synthetic, {vectors} vectors) "
        f"in {time.perf_counter() - t0:.0f} s: {folder}"
    )
    return folder, real, size - real


# --- measuring ---


def timed_stages(r: Retriever, query: str, k: int) -> dict[str, float]:
    """The steps of Retriever.hybrid, one by one (ms)."""
    n = max(k, r.fusion.candidates)
    t0 = time.perf_counter()
    vec = r.embedder.encode([query])[0]
    t1 = time.perf_counter()
    dense = r.store.ranked(vec, n)
    t2 = time.perf_counter()
    sparse = r.keyword_index().search(query, n)
    t3 = time.perf_counter()
    fused = r._fuse(dense, sparse)
    top = sorted(fused, key=fused.__getitem__, reverse=True)[:k]
    t4 = time.perf_counter()
    found = r.store.get(top)
    cosine = dict(dense)
    r.store.fetch([cid for cid in top if cid in found and cid not in cosine])
    t5 = time.perf_counter()
    return {
        "embed": (t1 - t0) * 1000,
        "chroma": (t2 - t1) * 1000,
        "bm25": (t3 - t2) * 1000,
        "fuse": (t4 - t3) * 1000,
        "fetch k": (t5 - t4) * 1000,
    }


def measure(
    levels: list[Level], asked: list[str], k: int, breakdown: int, servers: list[Any]
) -> None:
    """Query by query, the indexes taking turns; for each, in-process then over HTTP (or the
    other way round, alternately); then the stages one by one."""
    client = httpx.Client(timeout=60, trust_env=False)

    def over_http(url: str, q: str, n: int) -> float:
        t = time.perf_counter()
        r = client.post(url + "/api/search", json={"query": q, "k": k, "mode": "hybrid"})
        ms = (time.perf_counter() - t) * 1000
        r.raise_for_status()
        assert len(r.json()["results"]) == min(k, n), r.text[:200]
        return ms

    def in_process(lv: Level, q: str) -> float:
        t = time.perf_counter()
        hits = lv.retriever.search(q, k, "hybrid")
        ms = (time.perf_counter() - t) * 1000
        assert len(hits) == min(k, lv.chunks), (lv.name, len(hits))
        return ms

    pairs: list[tuple[Level, Any]] = list(zip(levels, servers or [None] * len(levels), strict=True))
    try:
        for lv, srv in pairs:
            for q in asked[:WARMUP]:
                in_process(lv, q)
                if srv is not None:
                    over_http(srv.url, q, lv.chunks)
        for i, q in enumerate(asked):
            for lv, srv in pairs[i % len(pairs) :] + pairs[: i % len(pairs)]:
                if srv is not None and i % 2:
                    lv.http_ms.append(over_http(srv.url, q, lv.chunks))
                lv.search_ms.append(in_process(lv, q))
                if srv is not None and not i % 2:
                    lv.http_ms.append(over_http(srv.url, q, lv.chunks))
    finally:
        client.close()
    for i, q in enumerate(asked[:breakdown]):
        for lv, _ in pairs[i % len(pairs) :] + pairs[: i % len(pairs)]:
            for stage, ms in timed_stages(lv.retriever, q, k).items():
                lv.stages.setdefault(stage, []).append(ms)


@contextlib.contextmanager
def search_servers(levels: list[Level], enabled: bool) -> Iterator[list[Any]]:
    """A ``python -m rag_chat`` per index (a token server as their LLM), ready; none when
    ``enabled`` is false."""
    if not enabled:
        yield []
        return
    prefix = new_prefix("retrieval")
    with tempfile.TemporaryDirectory(prefix="retrieval-") as tmp:
        log_dir = Path(tmp)
        token = start_token_server(log_dir, 8, 0)
        servers = []
        try:
            wait_ready([token], "/v1/models", 60)
            for i, lv in enumerate(levels):
                url = token.url + "/v1"
                name = f"rag_chat-{i}"
                servers.append(
                    start_rag_chat(log_dir, lv.data_dir, lv.collection, url, prefix, name=name)
                )
            wait_ready(servers, "/readyz")
            yield servers
        finally:
            for srv in servers:
                srv.stop()
            token.stop()
            delete_prefix(prefix)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="the seed: a real ingested RAG_DATA_DIR")
    parser.add_argument("--collection", default="docs", help="its collection (default docs)")
    parser.add_argument("--sizes", default="10000,100000", help="index sizes in chunks")
    parser.add_argument("--queries", type=int, default=300, help="queries measured (300)")
    parser.add_argument("--k", type=int, default=Settings(_env_file=None).top_k)  # type: ignore[call-arg]
    parser.add_argument("--breakdown", type=int, default=100, help="queries for the stages")
    parser.add_argument("--vectors", choices=["perturbed", "random"], default="perturbed")
    parser.add_argument("--no-http", dest="http", action="store_false", help="skip /api/search")
    parser.add_argument("--rebuild", action="store_true", help="build the indexes again")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    smoke = args.data_dir is None
    if not smoke:
        queries(1, scifact=True)  # before anything is built: SciFact's questions must be there
    seed_dir = guide_index() if smoke else args.data_dir.resolve()
    backend = Settings(_env_file=None).embedding_backend  # type: ignore[call-arg]
    embedder = Embedder(backend=backend, cache_dir=ROOT / "data" / ".rag" / "models")
    print(f"embedding backend: {backend} (RAG_EMBEDDING_BACKEND)", flush=True)
    print(f"seed: {seed_dir} (collection {args.collection!r})", flush=True)
    seed = read_seed(seed_dir, args.collection, embedder)
    if not seed.ids:
        print("the seed collection is empty (--data-dir / --collection?)", file=sys.stderr)
        return 2
    n_seed = len(seed.ids)
    levels = [Level("ingested", seed_dir, args.collection, n_seed, n_seed, 0)]
    for size in sizes:
        folder, real, synth = build_index(seed, size, args.vectors, embedder, args.rebuild)
        levels.append(Level(f"{size:,}", folder, SYNTH_COLLECTION, size, real, synth))
    del seed
    for lv in levels:
        lv.retriever = Retriever(settings_for(lv.data_dir, lv.collection), embedder=embedder)
        found, bm25 = lv.retriever.store.count(), index_chunks(lv.data_dir, lv.collection)
        assert found == lv.chunks and bm25 == lv.chunks, (lv.name, found, bm25)
    asked = queries(args.queries, scifact=not smoke)
    print(f"measuring {len(asked)} queries × {len(levels)} indexes …", flush=True)
    with search_servers(levels, args.http) as servers:
        measure(levels, asked, args.k, args.breakdown, servers)

    print(
        f"\nhybrid retrieval, k={args.k} (100 candidates from each ranker), {len(asked)} "
        f"{'SciFact queries' if len(asked) > 10 else 'queries'}, in-process "
        "Retriever.search and POST /api/search"
    )
    stage_names = list(levels[0].stages)
    header = f"{'index':>10}{'chunks':>9}{'synthetic':>11}{'p50 ms':>9}{'p90':>9}{'p99':>9}"
    header += f"{'http p50':>10}{'p99':>9}  " + " ".join(f"{s:>12}" for s in stage_names)
    print(header + "  (stages: p50 ms)")
    for lv in levels:
        row = (
            f"{lv.name:>10}{lv.chunks:>9,}{lv.synthetic:>11,}{fmt(pct(lv.search_ms, 50)):>9}"
            f"{fmt(pct(lv.search_ms, 90)):>9}{fmt(pct(lv.search_ms, 99)):>9}"
            f"{fmt(pct(lv.http_ms, 50)):>10}{fmt(pct(lv.http_ms, 99)):>9}  "
        )
        print(row + " ".join(f"{fmt(pct(lv.stages[s], 50), 2):>12}" for s in stage_names))
    if any(lv.synthetic for lv in levels):
        print(
            f"SYNTHETIC chunks ({args.vectors} vectors) were inserted directly into Chroma and "
            "BM25, not embedded: see the script's docstring"
        )
    goal = [lv for lv in levels if lv.chunks == GOAL_AT]
    if goal:
        p50 = pct(goal[0].search_ms, 50)
        print(
            f"goal p50 ≤ {GOAL_P50_MS:g} ms at {GOAL_AT:,} chunks: {fmt(p50)} ms, "
            f"{verdict(p50 <= GOAL_P50_MS)}"
        )
    else:
        print(f"(no {GOAL_AT:,}-chunk index in --sizes: the goal is not checked)")
    if smoke:
        print("SMOKE RUN: the seed is the guide (data/), not an ingested SciFact index")

    path = save_json(
        "retrieval_latency.json",
        {
            "args": {**vars(args), "data_dir": str(seed_dir)},
            "levels": [
                {
                    "name": lv.name,
                    "data_dir": lv.data_dir,
                    "chunks": lv.chunks,
                    "real": lv.real,
                    "synthetic": lv.synthetic,
                    "search_ms": dist(lv.search_ms),
                    "http_ms": dist(lv.http_ms),
                    "stages_ms": {s: dist(v) for s, v in lv.stages.items()},
                    "samples": {
                        "search_ms": lv.search_ms,
                        "http_ms": lv.http_ms,
                        "stages_ms": lv.stages,
                    },
                }
                for lv in levels
            ],
        },
    )
    plot = plot_distributions(
        "retrieval_latency.png",
        f"hybrid retrieval latency, in-process (k={args.k})",
        {f"{lv.name} chunks": lv.search_ms for lv in levels},
        "ms",
        goal=GOAL_P50_MS,
        log_x=True,
    )
    print(f"\nraw samples: {path}" + (f"; plot: {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
