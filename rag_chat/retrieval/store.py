"""The Chroma vector store: embedded ``PersistentClient`` by default, ``HttpClient`` for a server.

Chroma is always handed our own embeddings (its default embedding function would download a
model) and its telemetry is off. A collection records the embedding model it was built with;
opening it with another model is refused, since mixing vector spaces silently ruins retrieval.

A chunk's text and metadata are read from the ingest manifest (``ChunkTexts``) where it has
them: ingest stores no text in an embedded Chroma, whose local store builds a full-text
(trigram) index of every text it holds — nothing here queries it, and it cost three quarters of
ingest's writes — and of the metadata only ``position`` (what ``where`` filters use: the
metadata index cost as much as the vectors). A chunk the manifest has no text for (an index
ingested before it kept them, or a Chroma server, which keeps texts and all metadata for
readers on other machines) is read from Chroma as before.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

Metadata = dict[str, str | int | float | bool]


class StoreError(Exception):
    pass


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # the ranker's score: cosine (dense), BM25, or the fused score (hybrid)
    text: str
    metadata: Metadata
    # cosine similarity of the query and this chunk, on one scale whatever the ranker: what
    # "is anything relevant at all?" is judged on. None where the ranker did not compute it.
    relevance: float | None = None


def make_client(data_dir: Path, chroma_url: str | None = None) -> Any:
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False, allow_reset=True)
    if chroma_url:
        url = urlparse(chroma_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise StoreError(f"RAG_CHROMA_URL must look like http://host:port, not {chroma_url!r}")
        return chromadb.HttpClient(
            host=url.hostname,
            port=url.port or (443 if url.scheme == "https" else 8000),
            ssl=url.scheme == "https",
            settings=chroma_settings,
        )
    path = data_dir / "chroma"
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=chroma_settings)


class ChunkTexts:
    """Read-only access to the texts and metadata of chunks in the ingest manifest (a SQLite
    file in WAL mode: reads never wait for an ingest writing it). Opened on first use; a
    manifest that does not exist yet reads as empty and is looked for again next time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _open(self) -> sqlite3.Connection | None:
        if self._db is None and self.path.is_file():
            db = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
            columns = {row[1] for row in db.execute("PRAGMA table_info(chunks)")}
            if "text" not in columns:  # from before manifests kept texts: Chroma has them (and
                db.close()  # the next ingest adds them here: look again next time)
                return None
            self._db = db
        return self._db

    def get(self, ids: Sequence[str]) -> dict[str, tuple[str, Metadata]]:
        if not ids:
            return {}
        with self._lock:
            db = self._open()
            if db is None:
                return {}
            out: dict[str, tuple[str, Metadata]] = {}
            for i in range(0, len(ids), 500):  # SQLite's limit on bound parameters
                part = ids[i : i + 500]
                marks = ",".join("?" * len(part))
                rows = db.execute(
                    f"SELECT id, text, meta FROM chunks WHERE id IN ({marks}) AND text IS NOT NULL",
                    list(part),
                )
                for cid, text, meta in rows:
                    out[cid] = (text, json.loads(meta) if meta else {})
            return out


class VectorStore:
    def __init__(
        self, client: Any, collection: str, model_name: str, texts: ChunkTexts | None = None
    ) -> None:
        self.client = client
        self.name = collection
        self.model_name = model_name
        self.texts = texts
        self.collection = client.get_or_create_collection(
            name=collection,
            metadata={"hnsw:space": "cosine", "embedding_model": model_name},
            embedding_function=None,
        )
        stored = (self.collection.metadata or {}).get("embedding_model")
        if stored and stored != model_name:
            raise StoreError(
                f"collection {collection!r} was built with the embedding model {stored!r}, "
                f"not {model_name!r}: ingest with --reset, or use another --collection"
            )
        self._max_batch = (
            int(client.get_max_batch_size()) if hasattr(client, "get_max_batch_size") else 5000
        )

    def count(self) -> int:
        return int(self.collection.count())

    def upsert(
        self,
        ids: Sequence[str],
        embeddings: npt.NDArray[np.float32],
        documents: Sequence[str] | None,
        metadatas: Sequence[Metadata],
    ) -> None:
        """``documents`` None: the texts are kept elsewhere (the manifest), not in Chroma."""
        for i in range(0, len(ids), self._max_batch):
            j = i + self._max_batch
            self.collection.upsert(
                ids=list(ids[i:j]),
                embeddings=embeddings[i:j],
                documents=None if documents is None else list(documents[i:j]),
                metadatas=list(metadatas[i:j]),
            )

    def update_metadata(self, ids: Sequence[str], metadatas: Sequence[Metadata]) -> None:
        for i in range(0, len(ids), self._max_batch):
            j = i + self._max_batch
            self.collection.update(ids=list(ids[i:j]), metadatas=list(metadatas[i:j]))

    def delete(self, ids: Sequence[str]) -> None:
        for i in range(0, len(ids), self._max_batch):
            self.collection.delete(ids=list(ids[i : i + self._max_batch]))

    def all_ids(self) -> set[str]:
        ids: set[str] = set()
        offset = 0
        while True:
            page = self.collection.get(include=[], limit=self._max_batch, offset=offset)
            ids.update(page["ids"])
            if len(page["ids"]) < self._max_batch:
                return ids
            offset += self._max_batch

    def get(self, ids: Sequence[str]) -> dict[str, tuple[str, Metadata]]:
        """Text and metadata of these chunks: the manifest's (0.23 ms p50 for 5 chunks), else
        Chroma's — without their embeddings, which cost several times more to read back (3.3
        vs 0.8 ms p50 for 5 chunks of a 10,097-chunk collection, under load); ``fetch`` reads
        them."""
        if not ids:
            return {}
        found = self.texts.get(ids) if self.texts is not None else {}
        rest = [cid for cid in ids if cid not in found]
        if rest:
            res = self.collection.get(ids=rest, include=["documents", "metadatas"])
            for cid, doc, meta in zip(res["ids"], res["documents"], res["metadatas"], strict=True):
                found[cid] = (doc or "", dict(meta or {}))
        return found

    def chunks(self) -> list[Hit]:
        """Every chunk of the collection with its text and metadata (score 0)."""
        ids: list[str] = []
        offset = 0
        while True:
            page = self.collection.get(include=[], limit=self._max_batch, offset=offset)
            ids += page["ids"]
            if len(page["ids"]) < self._max_batch:
                break
            offset += self._max_batch
        found = self.get(ids)
        return [Hit(cid, 0.0, *found[cid]) for cid in ids if cid in found]

    def query(
        self, embedding: npt.NDArray[np.float32], k: int, where: dict[str, Any] | None = None
    ) -> list[Hit]:
        """The k nearest chunks with their text and metadata (score and relevance: cosine)."""
        res = self.collection.query(
            query_embeddings=[embedding],
            n_results=k,  # more than the collection holds is fine: fewer come back
            where=where,
            include=["distances"],
        )
        ranked = list(zip(res["ids"][0], res["distances"][0], strict=True))
        found = self.get([cid for cid, _ in ranked])
        return [
            Hit(cid, 1.0 - float(dist), *found[cid], 1.0 - float(dist))
            for cid, dist in ranked
            if cid in found
        ]

    def ranked(self, embedding: npt.NDArray[np.float32], k: int) -> list[tuple[str, float]]:
        """The k nearest chunk ids and cosines, nothing else read: a fusion's candidates."""
        return self.ranked_many([embedding], k)[0]

    def ranked_many(
        self, embeddings: Sequence[npt.NDArray[np.float32]], k: int
    ) -> list[list[tuple[str, float]]]:
        """``ranked`` for several queries in one call: each gets the neighbours it would get
        alone, for about half the CPU per query from 4 queries on (Chroma's own work per call
        outweighs the index search)."""
        if not embeddings:
            return []
        res = self.collection.query(
            query_embeddings=list(embeddings), n_results=k, include=["distances"]
        )
        return [
            [(cid, 1.0 - float(d)) for cid, d in zip(ids, dists, strict=True)]
            for ids, dists in zip(res["ids"], res["distances"] or [], strict=True)
        ]

    def fetch(self, ids: Sequence[str]) -> dict[str, tuple[str, Metadata, npt.NDArray[np.float32]]]:
        """Text, metadata and embedding of these chunks (the few a fusion kept)."""
        import numpy as np

        if not ids:
            return {}
        res = self.collection.get(ids=list(ids), include=["embeddings"])
        found = self.get(res["ids"])
        return {
            cid: (*found[cid], np.asarray(vec, dtype=np.float32))
            for cid, vec in zip(res["ids"], res["embeddings"], strict=True)
            if cid in found
        }

    def drop(self) -> None:
        self.client.delete_collection(self.name)
