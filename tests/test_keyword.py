"""The keyword index's own BM25 build against bm25s's, on the bundled guide's real text.

``KeywordIndex.from_terms`` computes bm25s's score matrix with array arithmetic instead of
bm25s's loop per token; these tests hold it to bm25s's own ``index()`` over the entries
``with_neighbours`` writes out: the same score for every (term, entry), bit for bit, and the
same search results, saved and loaded included.
"""

from __future__ import annotations

import re
from pathlib import Path

import bm25s
import numpy as np
import pytest

from rag_chat.retrieval.keyword import KeywordIndex, terms, with_neighbours

GUIDE = Path(__file__).resolve().parent.parent / "data" / "guide"
QUESTIONS = [
    "How do I ingest PDF files?",
    "Which port does the server listen on by default?",
    "resume a WebSocket conversation after a network failure",
    "rate limits per user",
    "nginx several instances",
    "hybrid retrieval fusion weights",
    "journal snapshots",  # no such words: nothing
]


def guide_chunks() -> tuple[list[str], list[str], list[list[str]]]:
    """Chunk ids, document keys and terms: every paragraph of every guide file, in order,
    and after each file's second paragraph one with no terms (a rule, "----")."""
    ids, docs, own = [], [], []
    for path in sorted(GUIDE.iterdir()):
        paras = re.split(r"\n\s*\n", path.read_text())
        for i, para in enumerate([*paras[:2], "----", *paras[2:]]):
            ids.append(f"{path.name}#{i}")
            docs.append(path.name)
            own.append(terms(para))
    return ids, docs, own


def reference(entries: list[list[str]]) -> bm25s.BM25:
    bm25 = bm25s.BM25()
    bm25.index(entries, show_progress=False)
    return bm25


def scores_by_term(bm25: bm25s.BM25) -> dict[str, tuple[list[int], list[float]]]:
    """Each term's column of the score matrix: (entries, scores)."""
    s = bm25.scores
    out = {}
    for term, col in bm25.vocab_dict.items():
        if col < len(s["indptr"]) - 1:
            a, b = s["indptr"][col], s["indptr"][col + 1]
            out[term] = (s["indices"][a:b].tolist(), s["data"][a:b].tolist())
    return out


@pytest.mark.parametrize("neighbours", [0, 1, 2])
def test_the_score_matrix_is_bm25s_own_bit_for_bit(neighbours: int) -> None:
    ids, docs, own = guide_chunks()
    assert len(ids) > 200 and any(not t for t in own) and len(set(docs)) == 8
    ours = KeywordIndex.from_terms(ids, docs, own, neighbours)._bm25
    theirs = reference(with_neighbours(docs, own, neighbours))
    assert ours.scores["num_docs"] == theirs.scores["num_docs"] == len(ids)
    assert set(ours.vocab_dict) == set(theirs.vocab_dict)  # the empty token "" included
    ours_cols, theirs_cols = scores_by_term(ours), scores_by_term(theirs)
    assert ours_cols == theirs_cols  # same entries, same float32 scores, every term
    for key in ("data", "indices", "indptr"):
        assert ours.scores[key].dtype == theirs.scores[key].dtype


def test_neighbours_stay_inside_their_document() -> None:
    # two documents side by side: "b0" is the first chunk of d2 and must not lend its terms
    # to the last chunk of d1
    ids = ["a0", "a1", "b0", "b1"]
    docs = ["d1", "d1", "d2", "d2"]
    own = [["apple"], ["pear"], ["plum"], ["fig", "fig"]]
    index = KeywordIndex.from_terms(ids, docs, own, 1)
    assert [i for i, _ in index.search("plum", 5)] == ["b0", "b1"]
    assert [i for i, _ in index.search("pear", 5)] == ["a1", "a0"]
    ref = reference(with_neighbours(docs, own, 1))
    assert scores_by_term(index._bm25) == scores_by_term(ref)


def test_search_gives_what_bm25s_gives_saved_and_loaded(tmp_path: Path) -> None:
    ids, docs, own = guide_chunks()
    index = KeywordIndex.from_terms(ids, docs, own, 1)
    index.save(tmp_path / "bm25")
    loaded = KeywordIndex.load(tmp_path / "bm25")
    old = KeywordIndex(ids, reference(with_neighbours(docs, own, 1)))
    found = 0
    for q in QUESTIONS:
        want = old.search(q, 10)
        assert index.search(q, 10) == want
        assert loaded.search(q, 10) == want
        found += bool(want)
    assert found == len(QUESTIONS) - 1  # every question but the last finds something


def test_entries_without_any_term_make_an_index_that_finds_nothing(tmp_path: Path) -> None:
    # (bm25s's own build divides by an average length of 0 here)
    for own in ([[], []], []):
        index = KeywordIndex.from_terms(
            [f"c{i}" for i in range(len(own))], ["d"] * len(own), own, 1
        )
        assert index.search("anything at all", 5) == []
        index.save(tmp_path / "bm25")
        assert KeywordIndex.load(tmp_path / "bm25").search("anything at all", 5) == []
    one = KeywordIndex.build(["only"], [["word", "word"]])
    hits = one.search("word", 5)
    assert [i for i, _ in hits] == ["only"] and np.isfinite(hits[0][1])


@pytest.mark.parametrize("neighbours", [0, 1, 2])
def test_an_index_from_stored_term_ids_is_the_one_from_the_terms(neighbours: int) -> None:
    """What ingest rebuilds from (each chunk's terms as ids into the manifest's vocabulary,
    whose ids follow no particular order and include terms no chunk uses any more) gives the
    index ``from_terms`` gives: the same arrays and vocabulary."""
    from array import array

    ids, docs, own = guide_chunks()
    words = sorted({t for ts in own for t in ts}, reverse=True)  # not first-appearance order
    vocabulary = ["unused-a", *words[: len(words) // 2], "unused-b", *words[len(words) // 2 :]]
    at = {t: i for i, t in enumerate(vocabulary)}
    blobs = [array("i", [at[t] for t in ts]).tobytes() for ts in own]
    ours = KeywordIndex.from_term_ids(ids, docs, blobs, vocabulary, neighbours)._bm25
    want = KeywordIndex.from_terms(ids, docs, own, neighbours)._bm25
    assert ours.vocab_dict == want.vocab_dict and "unused-a" not in ours.vocab_dict
    for key in ("data", "indices", "indptr"):
        assert ours.scores[key].dtype == want.scores[key].dtype
        assert np.array_equal(ours.scores[key], want.scores[key]), key
    assert ours.scores["num_docs"] == want.scores["num_docs"]
    # no terms at all
    empty = KeywordIndex.from_term_ids(["c0", "c1"], ["d", "d"], [b"", b""], vocabulary, 1)
    assert empty.search("anything at all", 5) == []
