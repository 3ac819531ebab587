"""The retriever: dense (Chroma), keyword (BM25) and hybrid (their fusion).

Hybrid search, chunk level:

1. the query is embedded; Chroma gives the ``candidates`` nearest chunks (ids and cosines only),
   BM25 its ``candidates`` best;
2. fusion: ``convex`` scales each ranker's candidate scores to [0, 1] (min-max over its own
   candidates; a chunk the ranker did not return scores 0) and adds them with ``dense_weight``
   and ``1 - dense_weight``; ``rrf`` is reciprocal-rank fusion;
3. optional dense pseudo-relevance feedback (``prf_chunks`` > 0): the query vector moves toward
   the mean of the top fused chunks' vectors (``prf_weight``), Chroma is asked again, and the
   fusion is redone with the BM25 list;
4. only the k kept chunks are read back (text and metadata), and each hit's ``relevance`` is
   the cosine of the original query and the chunk, one scale whatever the ranker: Chroma's own
   cosine for a dense candidate, the stored vector's for a chunk that only BM25 found.

The defaults are what ``benchmarks/retrieval_quality.py`` chose on SciFact by the aggregate;
README "Retrieval quality" has the figures. All methods are blocking (ONNX Runtime or torch,
Chroma, numpy); the server calls them in a worker thread. The keyword index is reloaded when an
ingest run has swapped in a new one.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rag_chat.retrieval.embedder import Embedder
from rag_chat.retrieval.keyword import KeywordIndex
from rag_chat.retrieval.store import ChunkTexts, Hit, VectorStore, make_client

if TYPE_CHECKING:
    from rag_chat.settings import Settings

Mode = Literal["dense", "bm25", "hybrid"]
RRF_K = 60


@dataclass(frozen=True)
class Fusion:
    method: Literal["convex", "rrf"] = "convex"
    candidates: int = 100  # per ranker, before fusion
    dense_weight: float = 0.5  # convex: the dense share, BM25 gets the rest
    rrf_k: int = RRF_K
    prf_chunks: int = 0  # dense pseudo-relevance feedback from this many top chunks; 0: off
    prf_weight: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Fusion:
        return cls(
            method=settings.fusion,
            candidates=settings.fusion_candidates,
            dense_weight=settings.fusion_dense_weight,
            prf_chunks=settings.prf_chunks,
            prf_weight=settings.prf_weight,
        )


class Retriever:
    def __init__(
        self,
        settings: Settings,
        collection: str | None = None,
        embedder: Embedder | None = None,
        fusion: Fusion | None = None,
    ) -> None:
        self.settings = settings
        self.collection = collection or settings.collection
        self.embedder = embedder or Embedder.from_settings(settings)
        self.store = self._open_store()
        self.fusion = fusion or Fusion.from_settings(settings)
        self._bm25_dir = settings.collection_dir(self.collection) / "bm25"
        self._bm25: KeywordIndex | None = None
        self._bm25_stamp: float | None = None
        self._lock = threading.Lock()

    def _open_store(self, fresh: bool = False) -> VectorStore:
        """The collection; ``fresh``: read from disk again, not from this process's cache."""
        if fresh and not self.settings.chroma_url:
            from chromadb.api.shared_system_client import SharedSystemClient

            # an embedded Chroma keeps one system per path per process, whose vector index
            # lives in memory: a new one reads what other processes wrote since. Clients
            # opened before keep working on the old one (an upload's pipeline, a search in
            # flight) and their writes reach this reader at the next reopen.
            SharedSystemClient.clear_system_cache()
        client = make_client(self.settings.data_dir, self.settings.chroma_url)
        texts = ChunkTexts(self.settings.collection_dir(self.collection) / "manifest.sqlite3")
        return VectorStore(client, self.collection, self.embedder.name, texts)

    # --- keyword index, reloaded after an ingest swapped it; the vectors reopened with it ---
    def keyword_index(self) -> KeywordIndex:
        """The BM25 index. Every ingest run that changed anything rebuilds it last, after its
        vectors are written: when it has changed, an embedded Chroma is reopened too, so
        that dense search sees an ingest from another process (``python -m ingest`` beside
        the server, another instance's upload) as soon as BM25 does."""
        ids_file = self._bm25_dir / "ids.json"
        stamp = ids_file.stat().st_mtime if ids_file.exists() else None
        with self._lock:
            if self._bm25 is None or stamp != self._bm25_stamp:
                if self._bm25 is not None:
                    self.store = self._open_store(fresh=True)
                self._bm25 = KeywordIndex.load(self._bm25_dir)
                self._bm25_stamp = stamp
            return self._bm25

    # --- rankers ---
    def dense(self, query: str, k: int) -> list[Hit]:
        self.keyword_index()  # an ingest since the last search: reopen the vectors
        vec = self.embedder.encode([query])[0]
        return self.store.query(vec, k)

    def dense_many(
        self, queries: Sequence[str], k: int, where: dict[str, Any] | None = None
    ) -> list[list[Hit]]:
        self.keyword_index()
        vecs = self.embedder.encode(list(queries))
        return [self.store.query(v, k, where) for v in vecs]

    def keyword(self, query: str, k: int) -> list[Hit]:
        ranked = self.keyword_index().search(query, k)
        found = self.store.get([cid for cid, _ in ranked])
        return [Hit(cid, s, *found[cid]) for cid, s in ranked if cid in found]

    def hybrid(self, query: str, k: int) -> list[Hit]:
        return self.hybrid_many([(query, k)])[0]

    def hybrid_many(self, requests: Sequence[tuple[str, int]]) -> list[list[Hit]]:
        """``hybrid`` for several (query, k) at once, each getting the hits it would get alone,
        with one Chroma call per step for all of them: the search process answers what queued
        while it searched this way. Each query is still embedded alone: the int8 model
        quantises its activations per call, so a query embedded beside others would get a
        vector that depends on them (cosine 0.987 to its own, measured)."""
        import numpy as np

        if not requests:
            return []
        f = self.fusion
        bm25 = self.keyword_index()  # first: an ingest since the last search reopens the store
        qvecs = [self.embedder.encode([q])[0] for q, _ in requests]
        ns = [max(k, f.candidates) for _, k in requests]
        dense: list[list[tuple[str, float]]] = [[] for _ in requests]
        for n in set(ns):  # the same n gives the same neighbours as alone; chat asks one n
            idx = [i for i, m in enumerate(ns) if m == n]
            ranked = self.store.ranked_many([qvecs[i] for i in idx], n)
            for i, got in zip(idx, ranked, strict=True):
                dense[i] = got
        sparse = [bm25.search(q, n) for (q, _), n in zip(requests, ns, strict=True)]
        fused = [self._fuse(d, s) for d, s in zip(dense, sparse, strict=True)]
        if f.prf_chunks > 0:
            for i, scores in enumerate(fused):
                top = sorted(scores, key=scores.__getitem__, reverse=True)[: f.prf_chunks]
                vecs = self.store.fetch(top)
                if vecs:
                    centroid = np.mean([v for _, _, v in vecs.values()], axis=0)
                    q2 = qvecs[i] + f.prf_weight * centroid
                    q2 = (q2 / max(float(np.linalg.norm(q2)), 1e-9)).astype(np.float32)
                    fused[i] = self._fuse(self.store.ranked(q2, ns[i]), sparse[i])
        tops = [
            sorted(scores, key=scores.__getitem__, reverse=True)[:k]
            for scores, (_, k) in zip(fused, requests, strict=True)
        ]
        found = self.store.get(list(dict.fromkeys(cid for top in tops for cid in top)))
        # relevance is the query-chunk cosine: Chroma gave it for the dense candidates; only
        # chunks that BM25 alone found need their vectors read back
        cosines = [dict(d) for d in dense]
        need = {
            cid
            for top, cosine in zip(tops, cosines, strict=True)
            for cid in top
            if cid in found and cid not in cosine
        }
        vectors = self.store.fetch(sorted(need))
        out: list[list[Hit]] = []
        for top, scores, cosine, qvec in zip(tops, fused, cosines, qvecs, strict=True):
            for cid in top:
                if cid not in cosine and cid in vectors:
                    cosine[cid] = float(vectors[cid][2] @ qvec)
            out.append(
                [
                    Hit(cid, scores[cid], found[cid][0], found[cid][1], cosine.get(cid))
                    for cid in top
                    if cid in found
                ]
            )
        return out

    def _fuse(
        self, dense: list[tuple[str, float]], sparse: list[tuple[str, float]]
    ) -> dict[str, float]:
        f = self.fusion
        scores: dict[str, float] = {}
        if f.method == "rrf":
            for ranked in (dense, sparse):
                for rank, (cid, _) in enumerate(ranked):
                    scores[cid] = scores.get(cid, 0.0) + 1.0 / (f.rrf_k + rank + 1)
            return scores
        for ranked, weight in ((dense, f.dense_weight), (sparse, 1.0 - f.dense_weight)):
            if not ranked:
                continue
            hi = max(s for _, s in ranked)
            lo = min(s for _, s in ranked)
            span = hi - lo
            for cid, s in ranked:
                scaled = (s - lo) / span if span > 0 else 1.0
                scores[cid] = scores.get(cid, 0.0) + weight * scaled
        return scores

    def search(self, query: str, k: int, mode: Mode = "hybrid") -> list[Hit]:
        if mode == "dense":
            return self.dense(query, k)
        if mode == "bm25":
            return self.keyword(query, k)
        return self.hybrid(query, k)
