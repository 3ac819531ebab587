"""The retriever: dense (Chroma), keyword (BM25) and hybrid (reciprocal-rank fusion).

All methods are blocking (torch, Chroma, numpy); the server calls them in a worker thread.
The keyword index is reloaded when an ingest run has swapped in a new one.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rag_chat.retrieval.embedder import Embedder
from rag_chat.retrieval.keyword import KeywordIndex
from rag_chat.retrieval.store import Hit, VectorStore, make_client

if TYPE_CHECKING:
    from rag_chat.settings import Settings

Mode = Literal["dense", "bm25", "hybrid"]
RRF_K = 60


@dataclass(frozen=True)
class Fusion:
    candidates: int = 100  # per ranker, before fusion
    rrf_k: int = RRF_K
    dense_weight: float = 1.0
    bm25_weight: float = 1.0


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
        self.embedder = embedder or Embedder(
            settings.embedding_model, settings.embedding_batch_size
        )
        self.store = VectorStore(
            make_client(settings.data_dir, settings.chroma_url), self.collection, self.embedder.name
        )
        self.fusion = fusion or Fusion()
        self._bm25_dir = settings.collection_dir(self.collection) / "bm25"
        self._bm25: KeywordIndex | None = None
        self._bm25_stamp: float | None = None
        self._lock = threading.Lock()

    # --- keyword index, reloaded after an ingest swapped it ---
    def keyword_index(self) -> KeywordIndex:
        ids_file = self._bm25_dir / "ids.json"
        stamp = ids_file.stat().st_mtime if ids_file.exists() else None
        with self._lock:
            if self._bm25 is None or stamp != self._bm25_stamp:
                self._bm25 = KeywordIndex.load(self._bm25_dir)
                self._bm25_stamp = stamp
            return self._bm25

    # --- rankers ---
    def dense(self, query: str, k: int) -> list[Hit]:
        vec = self.embedder.encode([query])[0]
        return self.store.query(vec, k)

    def dense_many(
        self, queries: Sequence[str], k: int, where: dict[str, Any] | None = None
    ) -> list[list[Hit]]:
        vecs = self.embedder.encode(list(queries))
        return [self.store.query(v, k, where) for v in vecs]

    def keyword(self, query: str, k: int) -> list[Hit]:
        ranked = self.keyword_index().search(query, k)
        found = self.store.get([cid for cid, _ in ranked])
        return [Hit(cid, s, *found[cid]) for cid, s in ranked if cid in found]

    def hybrid(self, query: str, k: int) -> list[Hit]:
        n = max(k, self.fusion.candidates)
        dense = self.dense(query, n)
        sparse = self.keyword_index().search(query, n)
        return self._fuse(dense, sparse, k)

    def _fuse(self, dense: list[Hit], sparse: list[tuple[str, float]], k: int) -> list[Hit]:
        f = self.fusion
        scores: dict[str, float] = {}
        for rank, hit in enumerate(dense):
            scores[hit.id] = scores.get(hit.id, 0.0) + f.dense_weight / (f.rrf_k + rank + 1)
        for rank, (cid, _) in enumerate(sparse):
            scores[cid] = scores.get(cid, 0.0) + f.bm25_weight / (f.rrf_k + rank + 1)
        top = sorted(scores, key=lambda c: scores[c], reverse=True)[:k]
        known = {h.id: h for h in dense}
        missing = self.store.get([c for c in top if c not in known])
        out = []
        for cid in top:
            if cid in known:
                h = known[cid]
                out.append(Hit(cid, scores[cid], h.text, h.metadata))
            elif cid in missing:
                out.append(Hit(cid, scores[cid], *missing[cid]))
        return out

    def search(self, query: str, k: int, mode: Mode = "hybrid") -> list[Hit]:
        if mode == "dense":
            return self.dense(query, k)
        if mode == "bm25":
            return self.keyword(query, k)
        return self.hybrid(query, k)
