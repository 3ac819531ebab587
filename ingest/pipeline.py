"""One ingest run: walk → hash → load → chunk → embed → write, incrementally and crash-safe.

::

    main thread                                    writer thread (one, in order)
    ───────────                                    ─────────────────────────────
    walk paths, sha256 each file                   for each batch:
    unchanged file hash?  → skip (no parsing)        upsert new vectors (Chroma)
    load → documents → chunk (tokenizer only)        update moved chunks' metadata
    new chunk ids (content-addressed) → batch        commit docs/chunks/files (manifest)
    batch full → embed (torch) → queue ────────►     delete vectors the manifest dropped
    end: prune vanished files, flush, join  ──►    then: rebuild BM25 from the manifest

Embedding overlaps with the vector store's writes. A document's new chunks are in the store
before its old ones leave, so a reader never sees half a document. A crash leaves the
manifest's ``dirty`` flag set; the next run reconciles the store with the manifest first.
A run may leave the keyword index's rebuild to a later one (``keyword=False``: an upload job
of many files rebuilds it once, at its end); the manifest then marks it stale, and the next
run that rebuilds clears the mark.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.chunking import Chunk, Chunker, HFTokenizer
from ingest.loaders import Document, LoadError, is_supported, load
from ingest.manifest import ChunkRow, Manifest, encode_meta, read_only
from rag_chat.settings import Settings

# Chunks gathered before one embedding call: big enough that sorting by length inside
# sentence-transformers keeps padding low, small enough to keep memory flat.
FLUSH_CHUNKS = 2048
# documents of one file chunked together (Chunker.chunk_many: paragraphs tokenised in batches)
CHUNK_GROUP_DOCS = 256
CHUNK_PARAMS_VERSION = "1"
# manifest meta: a run with keyword=False changed chunks the keyword index does not have yet
_KEYWORD_STALE = "keyword_stale"


class IngestError(Exception):
    """A run that cannot start (bad settings, a busy lock); str() is the one-line reason."""


class IngestBusy(IngestError):
    pass


@dataclass
class Report:
    files_added: int = 0
    files_updated: int = 0
    files_unchanged: int = 0
    files_deleted: int = 0
    files_failed: int = 0
    files_ignored: int = 0
    docs_changed: int = 0
    chunks_added: int = 0
    chunks_kept: int = 0
    chunks_deleted: int = 0
    tokens_embedded: int = 0
    embed_seconds: float = 0.0
    write_seconds: float = 0.0  # the writer thread's batches: vector store, manifest, terms
    open_seconds: float = 0.0  # the writer thread opening the vector store (beside the rest)
    writer_wait_seconds: float = 0.0  # this thread waiting for the writer (a full queue, the end)
    keyword_seconds: float = 0.0  # rebuilding the keyword index from the manifest
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)
    planned: list[tuple[str, str]] = field(default_factory=list)  # (action, path) for --dry-run
    interrupted: bool = False
    reconciled: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors and not self.interrupted

    def fail(self, path: str, message: str) -> None:
        self.errors.append((path, message))


@dataclass
class _DocWork:
    doc_key: str
    path: str
    doc: Document
    sha: str
    source: str
    chunks: list[Chunk]
    new: list[Chunk]  # to embed
    kept: list[Chunk]  # already embedded; metadata refreshed
    stale: list[str]  # ids to delete once committed


@dataclass
class _Batch:
    docs: list[_DocWork] = field(default_factory=list)
    files: list[tuple[str, str, int, int]] = field(default_factory=list)
    removed_docs: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    vectors: Any = None

    def new_chunks(self) -> list[tuple[_DocWork, Chunk]]:
        return [(w, c) for w in self.docs for c in w.new]

    def empty(self) -> bool:
        return not (self.docs or self.files or self.removed_docs or self.removed_files)


def display_path(path: Path, root: Path | None = None) -> str:
    """The path users see (and a file's doc_id): relative to ``root`` or the working dir."""
    try:
        return str(path.relative_to((root or Path.cwd()).resolve()))
    except ValueError:
        return str(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        collection: str | None = None,
        *,
        batch_size: int | None = None,
        progress: bool | None = None,
        log: Callable[[str], None] = print,
        embedder: Any = None,
        display_root: Path | None = None,
    ) -> None:
        from rag_chat.retrieval.embedder import Embedder, EmbedderError

        self.settings = settings
        self.collection = collection or settings.collection
        self.dir = settings.collection_dir(self.collection)
        self.progress = progress
        self.log = log
        self.display_root = display_root
        try:
            # the server hands over its own, already loaded (uploads from the browser)
            self.embedder = embedder or Embedder.from_settings(settings, batch_size)
            window = self.embedder.max_tokens
        except EmbedderError as exc:
            raise IngestError(str(exc)) from exc
        if settings.chunk_tokens > window:
            raise IngestError(
                f"RAG_CHUNK_TOKENS={settings.chunk_tokens} exceeds the embedding model's window of "
                f"{window} tokens: chunks would be truncated"
            )
        self._chunker: Chunker | None = None
        self._store: Any = None
        self.params = (
            f"{CHUNK_PARAMS_VERSION}:{self.embedder.name}:{settings.chunk_tokens}:"
            f"{settings.chunk_overlap}"
        )

    # --- lazily built parts: a no-change run never loads torch, Chroma or the tokenizer ---
    @property
    def chunker(self) -> Chunker:
        if self._chunker is None:
            tok = HFTokenizer(self.embedder.tokenizer_path)
            self._chunker = Chunker(tok, self.settings.chunk_tokens, self.settings.chunk_overlap)
        return self._chunker

    @property
    def store(self) -> Any:
        if self._store is None:
            from rag_chat.retrieval.store import StoreError, VectorStore, make_client

            try:
                client = make_client(self.settings.data_dir, self.settings.chroma_url)
                self._store = VectorStore(client, self.collection, self.embedder.name)
            except StoreError as exc:
                raise IngestError(str(exc)) from exc
        return self._store

    def _load_embedder(self) -> None:
        import numpy  # noqa: F401 - see _sync: imported by this thread before the writer's

        load = getattr(self.embedder, "load", None)  # the server's is loaded; fakes have none
        if load is not None:
            load()
        self.chunker  # noqa: B018 - the tokenizer

    # --- entry point ---
    def run(
        self,
        paths: Iterable[str | Path],
        *,
        dry_run: bool = False,
        prune: bool = True,
        reset: bool = False,
        keyword: bool = True,
    ) -> Report:
        """Sync ``paths`` into the collection. ``keyword=False`` leaves the keyword index's
        rebuild to a later run or to :meth:`refresh_keyword_index` (an upload of many files
        rebuilds it once, not once per file); until then the manifest marks it stale, and
        searches see neither the new chunks' keywords nor, in an embedded Chroma, their
        vectors (both are picked up when the rebuilt index is swapped in)."""
        started = time.perf_counter()
        report = Report()
        files, scopes = self._collect(paths, report)
        if dry_run:
            path = self.dir / "manifest.sqlite3"
            manifest = Manifest(path, migrate=False) if path.exists() else None
            try:
                self._plan(files, scopes, manifest, report, prune, reset)
            finally:
                if manifest:
                    manifest.close()
            report.seconds = time.perf_counter() - started
            return report

        with self._locked():
            if reset:
                self._reset()
            manifest = Manifest(self.dir / "manifest.sqlite3")
            try:
                self._sync(files, scopes, manifest, report, prune, keyword)
            finally:
                manifest.close()
        report.seconds = time.perf_counter() - started
        return report

    @staticmethod
    def keyword_index_marked_stale(settings: Settings, collection: str | None = None) -> bool:
        """A ``keyword=False`` run left the collection's keyword index behind its chunks (an
        upload job cut off before its end): read-only, for a server's start-up check."""
        import sqlite3

        with read_only(settings.collection_dir(collection) / "manifest.sqlite3") as db:
            if db is None:
                return False
            try:
                row = db.execute("SELECT 1 FROM meta WHERE key = ?", (_KEYWORD_STALE,)).fetchone()
            except sqlite3.Error:
                return False
        return row is not None

    def refresh_keyword_index(self) -> float | None:
        """Rebuild the keyword index if a ``keyword=False`` run left it stale (or it was built
        with other settings). Returns the seconds it took, or None when it was up to date."""
        path = self.dir / "manifest.sqlite3"
        if not path.exists():
            return None
        with self._locked():
            manifest = Manifest(path)
            try:
                if manifest.get_meta(_KEYWORD_STALE) is None and not self._keyword_index_stale():
                    return None
                t0 = time.perf_counter()
                self.rebuild_keyword_index(manifest)
                manifest.set_meta(_KEYWORD_STALE, None)
                return time.perf_counter() - t0
            finally:
                manifest.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The ingest lock: one writer per data dir (the CLI, each instance's uploads)."""
        from filelock import FileLock, Timeout

        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.settings.data_dir / "ingest.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout as exc:
            raise IngestBusy(
                f"another ingest is running on {self.settings.data_dir} (it holds "
                f"{lock.lock_file}); wait for it to finish, then run again"
            ) from exc
        try:
            yield
        finally:
            lock.release()

    def _reset(self) -> None:
        from rag_chat.retrieval.store import make_client

        client = make_client(self.settings.data_dir, self.settings.chroma_url)
        if any(getattr(c, "name", c) == self.collection for c in client.list_collections()):
            client.delete_collection(self.collection)
        shutil.rmtree(self.dir, ignore_errors=True)
        self._store = None

    # --- walking ---
    def _collect(
        self, paths: Iterable[str | Path], report: Report
    ) -> tuple[list[tuple[Path, str]], list[Path]]:
        state = self.settings.data_dir.resolve()
        files: dict[Path, str] = {}
        scopes: list[Path] = []
        for raw in paths:
            p = Path(raw).expanduser()
            if not p.exists():
                report.fail(str(raw), "no such file or directory")
                continue
            ap = p.resolve()
            if ap.is_dir():
                scopes.append(ap)
                for root, dirs, names in os.walk(ap):
                    rootp = Path(root)
                    dirs[:] = sorted(
                        d
                        for d in dirs
                        if not d.startswith(".")
                        and not _inside(rootp / d, state)
                        and d not in ("node_modules", "__pycache__")
                    )
                    for name in sorted(names):
                        fp = rootp / name
                        if name.startswith(".") or not fp.is_file():
                            continue
                        if is_supported(fp):
                            files.setdefault(fp, display_path(fp, self.display_root))
                        else:
                            report.files_ignored += 1
            elif ap.is_file():
                files.setdefault(ap, display_path(ap, self.display_root))
            else:
                report.fail(str(raw), "not a regular file or directory")
        return list(files.items()), scopes

    def _vanished(
        self, manifest: Manifest, files: list[tuple[Path, str]], scopes: list[Path]
    ) -> list[str]:
        present = {str(p) for p, _ in files}
        gone = []
        for path in manifest.file_paths():
            if path in present:
                continue
            if any(_inside(Path(path), s) for s in scopes):
                gone.append(path)
        return gone

    # --- dry run ---
    def _plan(
        self,
        files: list[tuple[Path, str]],
        scopes: list[Path],
        manifest: Manifest | None,
        report: Report,
        prune: bool,
        reset: bool,
    ) -> None:
        for path, shown in files:
            key = str(path)
            known = None if (manifest is None or reset) else manifest.file_hash(key)
            had_docs = bool(manifest and not reset and manifest.docs_of(key))
            try:
                digest = sha256_file(path)
            except OSError as exc:
                report.files_failed += 1
                report.fail(shown, f"cannot read: {exc.strerror or exc}")
                continue
            if known == digest:
                report.files_unchanged += 1
                continue
            try:
                docs = load(path, shown)
            except LoadError as exc:
                report.files_failed += 1
                report.fail(shown, str(exc))
                continue
            keyed = [(d, self._doc_key(key, d, len(docs))) for d in docs]
            n = sum(
                len(chunks)
                for i in range(0, len(keyed), CHUNK_GROUP_DOCS)
                for chunks in self.chunker.chunk_many(keyed[i : i + CHUNK_GROUP_DOCS])
            )
            report.chunks_added += n
            if had_docs:
                report.files_updated += 1
                report.planned.append(("update", f"{shown} ({len(docs)} doc(s), {n} chunks)"))
            else:
                report.files_added += 1
                report.planned.append(("add", f"{shown} ({len(docs)} doc(s), {n} chunks)"))
        if manifest is not None and prune and not reset:
            for gone in self._vanished(manifest, files, scopes):
                report.files_deleted += 1
                report.planned.append(("delete", display_path(Path(gone))))

    # --- the real run ---
    def _sync(
        self,
        files: list[tuple[Path, str]],
        scopes: list[Path],
        manifest: Manifest,
        report: Report,
        prune: bool,
        keyword: bool = True,
    ) -> None:
        if manifest.get_meta("params") not in (None, self.params):
            raise IngestError(
                f"collection {self.collection!r} was built with other chunking or model settings "
                f"({manifest.get_meta('params')}); ingest with --reset or another --collection"
            )
        dirty = manifest.get_meta("dirty") is not None
        if dirty:
            report.reconciled = self._reconcile(manifest)
        if manifest.get_meta("texts_missing") is not None:
            self._copy_texts(manifest)

        writer = _Writer(self, manifest, report)
        batches = _Batcher(self, writer, report)
        changed = dirty
        bar = self._bar(len(files))
        try:
            for path, shown in files:
                key = str(path)
                try:
                    st = path.stat()
                    digest = sha256_file(path)
                except OSError as exc:
                    report.files_failed += 1
                    report.fail(shown, f"cannot read: {exc.strerror or exc}")
                    bar.update(1)
                    continue
                if manifest.file_hash(key) == digest:
                    report.files_unchanged += 1
                    bar.update(1)
                    continue
                if not changed:
                    manifest.set_meta("dirty", "1")
                    manifest.set_meta("params", self.params)
                    changed = True
                    # something will be written: the writer opens the store (importing
                    # Chroma: ~1.5 s) while this thread parses, chunks and embeds. This
                    # thread imports the embedder's libraries first: two threads importing
                    # numpy at once can each find it half-initialised ("partially
                    # initialized module"), which failed an ingest in CI.
                    self._load_embedder()
                    writer.prepare()
                self._process_file(path, key, shown, st, digest, manifest, batches, report)
                bar.update(1)
            if prune:
                for gone in self._vanished(manifest, files, scopes):
                    if not changed:
                        manifest.set_meta("dirty", "1")
                        changed = True
                    batches.current.stale.extend(manifest.chunk_ids_of_path(gone))
                    batches.current.removed_files.append(gone)
                    report.files_deleted += 1
            batches.flush()
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            bar.close()
            writer.close()
        if writer.error is not None:
            raise writer.error
        if report.interrupted:
            return
        if not keyword:
            if changed:  # store and manifest agree; only the keyword index lags
                manifest.set_meta(_KEYWORD_STALE, "1")
                manifest.set_meta("dirty", None)
            return
        if changed or manifest.get_meta(_KEYWORD_STALE) is not None or self._keyword_index_stale():
            t0 = time.perf_counter()
            self.rebuild_keyword_index(manifest)
            report.keyword_seconds += time.perf_counter() - t0
            manifest.set_meta(_KEYWORD_STALE, None)
            manifest.set_meta("dirty", None)

    def _process_file(
        self,
        path: Path,
        key: str,
        shown: str,
        st: os.stat_result,
        digest: str,
        manifest: Manifest,
        batches: _Batcher,
        report: Report,
    ) -> None:
        old_docs = manifest.docs_of(key)
        try:
            docs = load(path, shown)
        except LoadError as exc:
            report.files_failed += 1
            report.fail(shown, str(exc))
            return
        record_errors = [e for d in docs for e in d.errors]
        for err in record_errors[:5]:
            report.fail(shown, err)
        if len(record_errors) > 5:
            report.fail(shown, f"... and {len(record_errors) - 5} more bad records")
        touched = False
        seen: set[str] = set()
        changed: list[tuple[Document, str, str]] = []
        for doc in docs:
            doc_key = self._doc_key(key, doc, len(docs))
            seen.add(doc_key)
            sha = self._doc_hash(doc)
            if old_docs.get(doc_key) != sha:
                changed.append((doc, doc_key, sha))
        for start in range(0, len(changed), CHUNK_GROUP_DOCS):
            group = changed[start : start + CHUNK_GROUP_DOCS]
            chunked = self.chunker.chunk_many([(doc, doc_key) for doc, doc_key, _ in group])
            for (doc, doc_key, sha), chunks in zip(group, chunked, strict=True):
                touched = True
                old = manifest.chunks_of(doc_key)
                new_ids = {c.id for c in chunks}
                work = _DocWork(
                    doc_key,
                    key,
                    doc,
                    sha,
                    shown,
                    chunks,
                    new=[c for c in chunks if c.id not in old],
                    kept=[c for c in chunks if c.id in old],
                    stale=[cid for cid in old if cid not in new_ids],
                )
                batches.add(work)
                report.docs_changed += 1
        for doc_key in old_docs.keys() - seen:
            touched = True
            batches.current.removed_docs.append(doc_key)
            batches.current.stale.extend(manifest.chunks_of(doc_key))
        if record_errors:
            report.files_failed += 1
        else:
            # the file is recorded with (or after) the batch holding its last document
            batches.current.files.append((key, digest, st.st_size, st.st_mtime_ns))
            if not old_docs:
                report.files_added += 1
            elif touched:
                report.files_updated += 1
            else:
                report.files_unchanged += 1

    @staticmethod
    def _doc_key(path_key: str, doc: Document, n_docs: int) -> str:
        return f"{path_key}#{doc.doc_id}" if doc.kind == "jsonl" else path_key

    def _doc_hash(self, doc: Document) -> str:
        h = hashlib.sha256(self.params.encode())
        h.update(doc.doc_id.encode() + b"\0" + doc.title.encode() + b"\0" + doc.kind.encode())
        for s in doc.sections:
            h.update(b"\1" + "\x1f".join(s.heading_path).encode() + b"\0" + str(s.page).encode())
            h.update(b"\0" + s.text.encode())
        return h.hexdigest()

    def _embed(self, batch: _Batch, report: Report) -> _Batch:
        new = batch.new_chunks()
        texts = [c.embed_text for _, c in new]
        if texts:
            t0 = time.perf_counter()
            tokenized = getattr(self.embedder, "encode_tokenized", None)
            if tokenized and all(c.token_ids for _, c in new):  # the chunker's tokens, reused
                batch.vectors = tokenized(texts, [c.token_ids for _, c in new])
            else:
                batch.vectors = self.embedder.encode(texts)
            report.embed_seconds += time.perf_counter() - t0
            report.tokens_embedded += sum(c.tokens for _, c in new)
        return batch

    def _reconcile(self, manifest: Manifest) -> int:
        """After a crash: drop vectors the manifest does not list; re-queue docs whose vectors
        went missing. Returns how many vectors were dropped."""
        in_store = self.store.all_ids()
        known = manifest.all_chunk_ids()
        orphans = sorted(in_store - known)
        if orphans:
            self.store.delete(orphans)
        missing = known - in_store
        if missing:
            rows = manifest.db.execute(
                f"SELECT DISTINCT d.path FROM chunks c JOIN docs d ON c.doc_key=d.doc_key "
                f"WHERE c.id IN ({','.join('?' * len(missing))})",
                list(missing),
            ).fetchall()
            for (path,) in rows:
                manifest.commit_docs([], removed_files=[path])
        return len(orphans)

    def _copy_texts(self, manifest: Manifest) -> None:
        """A manifest from before chunks kept their text: copy each from Chroma, once. Until
        then searches read them from Chroma, as before."""
        after = ""
        while ids := manifest.without_text(after, 2000):
            found = self.store.get(ids)
            manifest.set_texts(
                [(cid, text, encode_meta(meta)) for cid, (text, meta) in found.items()]
            )
            after = ids[-1]
        manifest.set_meta("texts_missing", None)

    def rebuild_keyword_index(self, manifest: Manifest) -> None:
        """BM25 over each chunk with ``keyword_neighbours`` neighbours of the same document on
        each side (``with_neighbours``). On SciFact this lifts the fused nDCG@10
        (benchmarks/retrieval_views.py; README)."""
        from rag_chat.retrieval.keyword import KeywordIndex

        ids, docs, blobs = [], [], []
        missing: list[tuple[str, bytes]] = []  # chunks written before terms were kept as ids
        for cid, doc_key, t, term_ids in manifest.iter_terms():
            if term_ids is None:
                term_ids = manifest.encode_terms(t.split())
                missing.append((cid, term_ids))
            ids.append(cid)
            docs.append(doc_key)
            blobs.append(term_ids)
        if missing:  # once: the next rebuild reads them
            manifest.set_term_ids(missing)
        index = KeywordIndex.from_term_ids(
            ids, docs, blobs, manifest.vocab_terms(), self.settings.keyword_neighbours
        )
        index.params = self._keyword_params()
        index.save(self.dir / "bm25")

    def _keyword_params(self) -> dict[str, int]:
        n = self.settings.keyword_neighbours
        return {"neighbours": n, "own_weight": 2 if n else 1}

    def _keyword_index_stale(self) -> bool:
        """The saved BM25 index was built with other keyword settings (or by an older version)."""
        from rag_chat.retrieval.keyword import KeywordIndex

        folder = self.dir / "bm25"
        if not (folder / "ids.json").is_file():
            return False
        return KeywordIndex.saved_params(folder) != self._keyword_params()

    def _bar(self, total: int) -> Any:
        from tqdm import tqdm

        disable = self.progress is False or (self.progress is None and total < 20)
        return tqdm(
            total=total,
            unit="file",
            desc="ingest",
            disable=disable or None,
            leave=False,
            dynamic_ncols=True,
        )


class _Batcher:
    """Gathers documents into batches of about FLUSH_CHUNKS new chunks, even inside one big
    file (a 5,000-record corpus commits as it goes), embeds each full batch and queues it."""

    def __init__(self, pipeline: Pipeline, writer: _Writer, report: Report) -> None:
        self.p = pipeline
        self.writer = writer
        self.report = report
        self.current = _Batch()
        self.pending = 0

    def add(self, work: _DocWork) -> None:
        self.current.docs.append(work)
        self.pending += len(work.new)
        if self.pending >= FLUSH_CHUNKS:
            self.flush()

    def flush(self) -> None:
        if not self.current.empty():
            self.writer.put(self.p._embed(self.current, self.report))
        self.current = _Batch()
        self.pending = 0


_PREPARE = "prepare"


class _Writer:
    """The single writer: keeps the store and the manifest in the crash-safe order."""

    def __init__(self, pipeline: Pipeline, manifest: Manifest, report: Report) -> None:
        self.p = pipeline
        self.manifest = manifest
        self.report = report
        self.q: queue.Queue[_Batch | str | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="ingest-writer", daemon=True)
        self.thread.start()

    def put(self, batch: _Batch) -> None:
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self.q.put(batch)
        self.report.writer_wait_seconds += time.perf_counter() - t0

    def prepare(self) -> None:
        """Open the vector store and load the keyword terms' stemmer now, in this thread,
        so that the first batch's write does not wait for them."""
        self.q.put(_PREPARE)

    def close(self) -> None:
        t0 = time.perf_counter()
        self.q.put(None)
        self.thread.join()
        self.report.writer_wait_seconds += time.perf_counter() - t0

    def _loop(self) -> None:
        from rag_chat.retrieval.keyword import terms

        while (batch := self.q.get()) is not None:
            if self.error is not None:
                continue
            t0 = time.perf_counter()
            try:
                if isinstance(batch, str):
                    self.p.store  # noqa: B018 - opens it
                    terms("warm up")
                    self.report.open_seconds += time.perf_counter() - t0
                    continue
                self._write(batch, terms)
            except BaseException as exc:  # surfaced to the main thread
                self.error = exc
            self.report.write_seconds += time.perf_counter() - t0

    def _write(self, batch: _Batch, terms: Callable[[str], list[str]]) -> None:
        store = self.p.store
        # A Chroma server keeps the texts and metadata (other machines read them from it); an
        # embedded one keeps neither: both are in the manifest (see rag_chat.retrieval.store),
        # and Chroma holds the vectors and the one field a search filters on (``position``:
        # rag_chat.eval's dense-first). Its metadata index costs as much as the vectors:
        # upserting 1,500 chunks took 0.84-0.98 s with the nine fields, 0.62-0.65 s with
        # position alone (benchmarks/chroma_texts.py --metadata).
        full = bool(self.p.settings.chroma_url)

        def meta(w: _DocWork, c: Chunk) -> dict[str, str | int]:
            return c.metadata(w.source, w.doc.kind) if full else {"position": c.position}

        new = batch.new_chunks()
        if new:
            store.upsert(
                [c.id for _, c in new],
                batch.vectors,
                [c.text for _, c in new] if full else None,
                [meta(w, c) for w, c in new],
            )
        kept = [(w, c) for w in batch.docs for c in w.kept]
        if kept:
            store.update_metadata([c.id for _, c in kept], [meta(w, c) for w, c in kept])
        self.manifest.commit_docs(
            [
                (
                    w.doc_key,
                    w.path,
                    w.doc.doc_id,
                    w.sha,
                    [
                        ChunkRow(
                            c.id,
                            c.position,
                            " ".join(words),
                            c.text,
                            encode_meta(c.metadata(w.source, w.doc.kind)),
                            self.manifest.encode_terms(words),
                        )
                        for c in w.chunks
                        for words in (terms(c.embed_text),)
                    ],
                )
                for w in batch.docs
            ],
            files=batch.files,
            removed_docs=batch.removed_docs,
            removed_files=batch.removed_files,
        )
        stale = batch.stale + [cid for w in batch.docs for cid in w.stale]
        if stale:
            store.delete(stale)
        self.report.chunks_added += len(new)
        self.report.chunks_kept += len(kept)
        self.report.chunks_deleted += len(stale)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False
