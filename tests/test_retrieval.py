"""The retriever's hybrid search and the embedding backends, with the real model and real Chroma."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rag_chat.retrieval.embedder import BACKENDS, Embedder, EmbedderError
from rag_chat.retrieval.search import Fusion, Retriever
from rag_chat.settings import Settings

TEXTS = [
    "How do I ingest PDF files into the knowledge base?",
    "Redis keeps the conversation memory and the room event logs.",
    "The WebSocket protocol sends ai.token events while the answer streams.",
    "Paracetamol overdose damages the liver.",
    "x",
]
# similarities closer than this are a tie at int8 precision: the quantised model moves a
# vector by up to 0.03 in cosine (asserted below)
INT8_TIE = 0.05


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Embedder]:
    cache = tmp_path_factory.mktemp("onnx")
    return {b: Embedder(backend=b, cache_dir=cache) for b in BACKENDS}


def test_onnx_backends_compute_the_same_model(backends: dict[str, Embedder]) -> None:
    ref = backends["torch"].encode(TEXTS)
    fp32 = backends["onnx"].encode(TEXTS)
    int8 = backends["onnx-int8"].encode(TEXTS)
    assert fp32.shape == int8.shape == ref.shape == (len(TEXTS), 384)
    for vecs in (fp32, int8):
        assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    # fp32 ONNX is the same function; int8 weights move vectors a little, not the ranking
    assert (fp32 * ref).sum(axis=1).min() > 0.9999
    cos_int8 = (int8 * ref).sum(axis=1)
    assert cos_int8.min() > 0.97 and cos_int8.mean() > 0.985
    # the order of any two similarities that differ by more than int8's own error: unrelated
    # texts sit within a few hundredths of each other near 0, and their order there depends
    # on the CPU's int8 kernels (it flipped between two of these machines)
    sims_ref = ref[:4] @ ref[:4].T
    sims_int8 = int8[:4] @ int8[:4].T
    checked = 0
    for row in range(4):
        for a in range(4):
            for b in range(4):
                if sims_ref[row, a] - sims_ref[row, b] > INT8_TIE:
                    assert sims_int8[row, a] > sims_int8[row, b], (row, a, b)
                    checked += 1
    assert checked >= 12  # each text first to itself, and the related pair above the rest
    # batch composition does not change a vector (padding is masked out of the mean)
    alone = backends["onnx"].encode([TEXTS[0]])[0]
    assert float(alone @ fp32[0]) > 0.99999


def test_encoding_token_ids_gives_the_same_vectors(backends: dict[str, Embedder]) -> None:
    """The ingest hands the chunker's token ids to the encoder instead of the texts."""
    from ingest.chunking import HFTokenizer

    tok = HFTokenizer(backends["onnx-int8"].tokenizer_path)
    texts = [*TEXTS, "a very long text " * 200]  # past the 256-token window: cut the same way
    ids = [tok.ids(t) for t in texts]
    assert len(ids[-1]) > 256
    for name in ("onnx", "onnx-int8", "torch"):
        emb = backends[name]
        assert np.array_equal(emb.encode_tokenized(texts, ids), emb.encode(texts)), name


def test_the_export_is_cached_and_reused(tmp_path: Path, backends: dict[str, Embedder]) -> None:
    backends["onnx-int8"].load()
    files = sorted(p.name for p in backends["onnx"].cache_dir.iterdir())
    assert any(f.endswith(".int8.onnx") for f in files) and any(
        f.endswith(".onnx") and ".int8" not in f for f in files
    )
    assert not [f for f in files if f.endswith(".tmp")]
    again = Embedder(backend="onnx", cache_dir=backends["onnx"].cache_dir)
    before = {p: p.stat().st_mtime_ns for p in again.cache_dir.iterdir()}
    again.encode(["cached"])
    assert {p: p.stat().st_mtime_ns for p in again.cache_dir.iterdir()} == before


def test_an_unknown_backend_is_refused_in_one_line() -> None:
    with pytest.raises(EmbedderError, match="unknown embedding backend 'tpu'"):
        Embedder(backend="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embedding_backend"):
        Settings(embedding_backend="tpu", _env_file=None)  # type: ignore[arg-type,call-arg]


@pytest.fixture(scope="module")
def retriever(guide_index: Path, embedder: Embedder) -> Retriever:
    return Retriever(Settings(data_dir=guide_index, _env_file=None), embedder=embedder)  # type: ignore[call-arg]


def test_hybrid_hits_carry_the_query_chunk_cosine(retriever: Retriever, embedder: Embedder) -> None:
    query = "How do I ingest PDF files?"
    hits = retriever.search(query, 8)
    assert len(hits) == 8
    assert hits[0].metadata["source"] == "data/guide/ingesting.md"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    qvec = embedder.encode([query])[0]
    for h in hits:
        assert h.relevance is not None and -1.0 <= h.relevance <= 1.0
    # relevance is the stored chunk vector (title + heading + body) against the query
    stored = retriever.store.fetch([h.id for h in hits])
    for h in hits:
        assert h.relevance == pytest.approx(float(stored[h.id][2] @ qvec), abs=1e-5)
    # an off-topic question is far from everything: the scale the "don't know" check uses
    off = retriever.search("What is the boiling point of tungsten in kelvin?", 5)
    best_off = max(h.relevance or -1.0 for h in off)
    assert best_off < hits[0].relevance - 0.2  # type: ignore[operator]


def test_convex_fusion_keeps_what_either_ranker_alone_finds(retriever: Retriever) -> None:
    # an exact rare term: BM25's strength
    query = "RAG_LLM_BASE_URL"
    bm25_top = retriever.keyword(query, 1)[0]
    assert bm25_top.id in [h.id for h in retriever.search(query, 5)]
    # words in no document: BM25 has nothing, and the dense ranking comes through unchanged
    para = "forgetful chatbot amnesia yesterday"
    assert retriever.keyword(para, 5) == []
    assert [h.id for h in retriever.search(para, 5)] == [h.id for h in retriever.dense(para, 5)]


def test_relevance_of_a_chunk_only_bm25_found_is_its_stored_cosine(
    retriever: Retriever, embedder: Embedder
) -> None:
    # few candidates: the kept chunks mix dense ones (Chroma's cosine) and BM25-only ones
    # (their vectors are read back): one scale for both
    narrow = Retriever(retriever.settings, embedder=embedder, fusion=Fusion(candidates=1))
    query = "RAG_LLM_BASE_URL and the Redis memory"
    hits = narrow.search(query, 6)
    dense_ids = {h.id for h in narrow.dense(query, 6)}
    assert any(h.id not in dense_ids for h in hits) and any(h.id in dense_ids for h in hits)
    qvec = embedder.encode([query])[0]
    stored = retriever.store.fetch([h.id for h in hits])
    for h in hits:
        assert h.relevance == pytest.approx(float(stored[h.id][2] @ qvec), abs=1e-5)


@pytest.mark.parametrize(
    "fusion",
    [Fusion(method="rrf"), Fusion(prf_chunks=3, prf_weight=1.0), Fusion(dense_weight=1.0)],
    ids=["rrf", "prf", "dense-only-weight"],
)
def test_other_fusion_settings_work(retriever: Retriever, fusion: Fusion) -> None:
    other = Retriever(retriever.settings, embedder=retriever.embedder, fusion=fusion)
    hits = other.search("How do I ingest PDF files?", 5)
    assert len(hits) == 5 and hits[0].metadata["source"] == "data/guide/ingesting.md"
    assert all(h.relevance is not None for h in hits)
    if fusion.dense_weight == 1.0 and fusion.method == "convex":
        # all the weight on the dense side: the order is the dense order
        dense = [h.id for h in other.dense("How do I ingest PDF files?", 5)]
        assert [h.id for h in hits][:3] == dense[:3]


@pytest.mark.parametrize(
    "fusion",
    [Fusion(), Fusion(method="rrf"), Fusion(prf_chunks=3), Fusion(candidates=1)],
    ids=["default", "rrf", "prf", "one-candidate"],
)
def test_queries_searched_together_get_what_each_gets_alone(
    retriever: Retriever, fusion: Fusion
) -> None:
    """The search process answers the questions that queued while it searched in one
    ``hybrid_many``: one Chroma call per step for all of them, the same hits as alone."""
    other = Retriever(retriever.settings, embedder=retriever.embedder, fusion=fusion)
    requests = [
        ("How do I ingest PDF files?", 5),
        ("Which Redis settings are there?", 3),
        ("forgetful chatbot amnesia yesterday", 5),  # nothing for BM25
        ("How do I ingest PDF files?", 8),  # the same question, another k
        ("RAG_LLM_BASE_URL and the Redis memory", 1),
    ]
    together = other.hybrid_many(requests)
    assert len(together) == len(requests)
    for (query, k), hits in zip(requests, together, strict=True):
        alone = other.search(query, k)
        assert hits and [(h.id, h.score, h.text, h.metadata) for h in hits] == [
            (h.id, h.score, h.text, h.metadata) for h in alone
        ]
        assert [h.relevance for h in hits] == pytest.approx([h.relevance for h in alone])
    assert other.hybrid_many([]) == []
