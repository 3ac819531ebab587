"""The ingest manifest: what is in the index, keyed by content hashes, in one SQLite file.

- ``files``: each ingested file's sha256, so an unchanged file costs one hash and nothing else.
  A file is recorded only when all of its documents landed without error, so a file with a bad
  record is looked at (and reported) again on the next run.
- ``docs``: each document (a file, or one record of a ``.jsonl`` corpus) with its hash.
- ``chunks``: the chunks that make up each document, with their stemmed terms, their text and
  their metadata (JSON): the source of truth for the vector store's ids, the input to the BM25
  index, and what a search reads a hit's text and metadata from (an embedded Chroma holds only
  vectors and metadata: storing a text there builds Chroma's full-text index of it, which
  nothing here queries and which cost three quarters of ingest's writes).
- ``vocab``: every stemmed term ever written, with a lasting id; a chunk keeps its terms as
  those ids too (``term_ids``), so rebuilding the BM25 index splits and looks up no strings.
- ``meta``: the ``dirty`` flag, set while a run mutates the index. A run that finds it set (a
  crash, Ctrl-C) reconciles the vector store with this manifest before doing anything else.

Write order that keeps it consistent: vectors are upserted before the manifest commits them, and
old vectors are deleted only after the manifest forgot them; whatever a crash leaves in the
vector store that the manifest does not list is deleted by the next run.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS docs (
    doc_key TEXT PRIMARY KEY, path TEXT NOT NULL, doc_id TEXT NOT NULL, sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS docs_path ON docs(path);
CREATE TABLE IF NOT EXISTS chunks (
    id TEXT PRIMARY KEY, doc_key TEXT NOT NULL, position INTEGER NOT NULL, terms TEXT NOT NULL,
    text TEXT, meta TEXT, term_ids BLOB
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_key);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_VOCAB = "CREATE TABLE IF NOT EXISTS vocab (id INTEGER PRIMARY KEY, term TEXT NOT NULL UNIQUE)"
# a chunk's terms as ids into ``vocab``: C ints, as ``array("i")`` writes them
TERM_ID_TYPECODE = "i"


@dataclass(frozen=True)
class ChunkRow:
    id: str
    position: int
    terms: str
    text: str | None = None
    meta: str | None = None  # JSON
    term_ids: bytes | None = None  # ``terms`` as vocabulary ids (Manifest.encode_terms)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection to the manifest at ``path`` (None while there is none), for
    readers beside the ingest that writes it (WAL mode: they never wait for it)."""
    if not path.is_file():
        yield None
        return
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        yield db
    finally:
        db.close()


def encode_meta(meta: Mapping[str, str | int | float | bool]) -> str:
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":"))


class Manifest:
    def __init__(self, path: Path, migrate: bool = True) -> None:
        """``migrate`` False (a dry run): leave a manifest from an older version as it is."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # one writer at a time is guaranteed by the ingest lock; readers may be other processes
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(chunks)")}
        if "text" not in columns and migrate:  # from before chunks kept their text
            with self._txn():
                self.db.execute("ALTER TABLE chunks ADD COLUMN text TEXT")
                self.db.execute("ALTER TABLE chunks ADD COLUMN meta TEXT")
                if self.db.execute("SELECT 1 FROM chunks LIMIT 1").fetchone():
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES ('texts_missing', '1')")
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(chunks)")}
        if migrate:  # from before terms were kept as ids too
            if "term_ids" not in columns:
                self.db.execute("ALTER TABLE chunks ADD COLUMN term_ids BLOB")
            self.db.execute(_VOCAB)
        self._vocab: dict[str, int] | None = None  # loaded on first use
        self._next_id = 0
        self._new_terms: list[tuple[int, str]] = []  # assigned, written with the next commit

    def close(self) -> None:
        self.db.close()

    # --- files ---
    def file_hash(self, path: str) -> str | None:
        row = self.db.execute("SELECT sha256 FROM files WHERE path=?", (path,)).fetchone()
        return row[0] if row else None

    def file_paths(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT path FROM files UNION SELECT path FROM docs")]

    # --- docs ---
    def docs_of(self, path: str) -> dict[str, str]:
        """doc_key -> sha256 for every document of a file."""
        return dict(self.db.execute("SELECT doc_key, sha256 FROM docs WHERE path=?", (path,)))

    def chunks_of(self, doc_key: str) -> dict[str, ChunkRow]:
        rows = self.db.execute("SELECT id, position, terms FROM chunks WHERE doc_key=?", (doc_key,))
        return {r[0]: ChunkRow(*r) for r in rows}

    def chunk_ids_of_path(self, path: str) -> list[str]:
        rows = self.db.execute(
            "SELECT c.id FROM chunks c JOIN docs d ON c.doc_key=d.doc_key WHERE d.path=?", (path,)
        )
        return [r[0] for r in rows]

    def all_chunk_ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT id FROM chunks")}

    def iter_terms(self) -> Iterator[tuple[str, str, str, bytes | None]]:
        """(chunk id, doc_key, terms, term ids or None), each document's chunks together and
        in order."""
        yield from self.db.execute(
            "SELECT id, doc_key, terms, term_ids FROM chunks ORDER BY doc_key, position, id"
        )

    # --- the terms' vocabulary: ids that keep, so a keyword rebuild splits no strings ---
    def encode_terms(self, terms: Sequence[str]) -> bytes:
        """``terms`` as vocabulary ids; a new term gets the next id, written to the vocabulary
        with the next commit (``commit_docs`` / ``set_term_ids``) — the rows that use it are
        written with it, so a failed commit leaves no row pointing at a missing term."""
        from array import array

        vocab = self._load_vocab()
        ids = array(TERM_ID_TYPECODE)
        for term in terms:
            tid = vocab.get(term)
            if tid is None:
                tid = vocab[term] = self._next_id
                self._next_id += 1
                self._new_terms.append((tid, term))
            ids.append(tid)
        return ids.tobytes()

    def vocab_terms(self) -> list[str]:
        """Every term of the vocabulary, by id (what ``encode_terms`` has assigned so far)."""
        vocab = self._load_vocab()
        terms = [""] * self._next_id
        for term, tid in vocab.items():
            terms[tid] = term
        return terms

    def set_term_ids(self, rows: Sequence[tuple[str, bytes]]) -> None:
        """(chunk id, term ids) of chunks already listed (a manifest from before term ids)."""
        with self._txn():
            self._write_new_terms()
            self.db.executemany(
                "UPDATE chunks SET term_ids=? WHERE id=?", [(b, i) for i, b in rows]
            )
        self._new_terms.clear()

    def _load_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = {t: i for i, t in self.db.execute("SELECT id, term FROM vocab")}
            self._next_id = max(self._vocab.values(), default=-1) + 1
        return self._vocab

    def _write_new_terms(self) -> None:
        if self._new_terms:
            self.db.executemany("INSERT INTO vocab(id, term) VALUES (?,?)", self._new_terms)

    def without_text(self, after: str, limit: int) -> list[str]:
        """Ids past ``after``, in order, of chunks whose text is not here (ingested before the
        manifest kept texts)."""
        rows = self.db.execute(
            "SELECT id FROM chunks WHERE text IS NULL AND id > ? ORDER BY id LIMIT ?",
            (after, limit),
        )
        return [r[0] for r in rows]

    def set_texts(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """(id, text, meta JSON) of chunks already listed."""
        with self._txn():
            self.db.executemany(
                "UPDATE chunks SET text=?, meta=? WHERE id=?", [(t, m, i) for i, t, m in rows]
            )

    def counts(self) -> tuple[int, int, int]:
        files = self.db.execute("SELECT COUNT(DISTINCT path) FROM docs").fetchone()[0]
        docs = self.db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
        chunks = self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        return int(files), int(docs), int(chunks)

    # --- writes: each call is one transaction ---
    def commit_docs(
        self,
        docs: Iterable[tuple[str, str, str, str, list[ChunkRow]]],
        files: Iterable[tuple[str, str, int, int]] = (),
        removed_docs: Iterable[str] = (),
        removed_files: Iterable[str] = (),
    ) -> None:
        """Replace documents (doc_key, path, doc_id, sha256, chunks) and record finished files."""
        with self._txn():
            self._write_new_terms()
            for doc_key, path, doc_id, sha, rows in docs:
                self.db.execute("DELETE FROM chunks WHERE doc_key=?", (doc_key,))
                self.db.executemany(
                    "INSERT OR REPLACE INTO chunks(id, doc_key, position, terms, text, meta, "
                    "term_ids) VALUES (?,?,?,?,?,?,?)",
                    [
                        (r.id, doc_key, r.position, r.terms, r.text, r.meta, r.term_ids)
                        for r in rows
                    ],
                )
                self.db.execute(
                    "INSERT OR REPLACE INTO docs(doc_key, path, doc_id, sha256) VALUES (?,?,?,?)",
                    (doc_key, path, doc_id, sha),
                )
            for doc_key in removed_docs:
                self.db.execute("DELETE FROM chunks WHERE doc_key=?", (doc_key,))
                self.db.execute("DELETE FROM docs WHERE doc_key=?", (doc_key,))
            for path in removed_files:
                self.db.execute(
                    "DELETE FROM chunks WHERE doc_key IN (SELECT doc_key FROM docs WHERE path=?)",
                    (path,),
                )
                self.db.execute("DELETE FROM docs WHERE path=?", (path,))
                self.db.execute("DELETE FROM files WHERE path=?", (path,))
            self.db.executemany(
                "INSERT OR REPLACE INTO files(path, sha256, size, mtime_ns) VALUES (?,?,?,?)",
                list(files),
            )
        self._new_terms.clear()  # in the vocabulary now (a rolled-back commit keeps them due)

    def forget_file_hash(self, path: str) -> None:
        with self._txn():
            self.db.execute("DELETE FROM files WHERE path=?", (path,))

    # --- meta ---
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str | None) -> None:
        with self._txn():
            if value is None:
                self.db.execute("DELETE FROM meta WHERE key=?", (key,))
            else:
                self.db.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?,?)", (key, value)
                )

    def _txn(self) -> _Txn:
        return _Txn(self.db)


class _Txn:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
