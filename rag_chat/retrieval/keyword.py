"""BM25 keyword index (bm25s over Snowball-stemmed terms), stored beside the vector index.

Ingest keeps each chunk's terms in its manifest (as ids into its vocabulary of terms too) and
rebuilds this index at the end of a run that changed anything; the chat side only loads it. A
rebuild from stored term ids costs no parsing, no tokenising and no string handling. The index
is written to a fresh folder and swapped in with a rename, so a reader never sees half an index.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

_WORD = re.compile(r"(?u)\b\w\w+\b")


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


class _Stemmer(threading.local):
    """PyStemmer objects are not thread-safe: one per thread."""

    def __init__(self) -> None:
        import Stemmer

        self.stemmer = Stemmer.Stemmer("english")


_stemmer: _Stemmer | None = None


def terms(text: str) -> list[str]:
    """Lower-cased, stop-word-free, stemmed terms: the same for chunks and queries."""
    global _stemmer
    if _stemmer is None:
        _stemmer = _Stemmer()
    stop = _stopwords()
    words = [w for w in _WORD.findall(text.lower()) if w not in stop]
    return list(_stemmer.stemmer.stemWords(words))


def with_neighbours(
    doc_keys: Sequence[str], term_lists: Sequence[list[str]], n: int
) -> list[list[str]]:
    """BM25 entries: each chunk's terms, counted twice, plus those of ``n`` chunks of the same
    document on each side (the lists come grouped by document, in order; ``n`` 0: as they are).
    A question's words spread over a short document (an abstract cut in two) still meet in
    one entry, while a word's own chunk outranks its neighbours and a long document's chunk
    stays local."""
    if n <= 0:
        return [list(t) for t in term_lists]
    out = []
    for i, own in enumerate(term_lists):
        merged = list(own) * 2
        for j in range(max(0, i - n), min(len(term_lists), i + n + 1)):
            if j != i and doc_keys[j] == doc_keys[i]:
                merged += term_lists[j]
        out.append(merged)
    return out


class KeywordIndex:
    """A loaded BM25 index: chunk ids in index order plus the bm25s scores."""

    def __init__(self, ids: list[str], bm25: Any) -> None:
        self.ids = ids
        self._bm25 = bm25
        self.params: dict[str, Any] = {}  # how the entries were built (ingest's settings)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, ids: Sequence[str], term_lists: Sequence[Sequence[str]]) -> KeywordIndex:
        """The index of these entries, as they are (no neighbours)."""
        return cls.from_terms(ids, ids, term_lists, 0)

    @classmethod
    def from_terms(
        cls,
        ids: Sequence[str],
        doc_keys: Sequence[str],
        own_terms: Sequence[Sequence[str]],
        neighbours: int,
    ) -> KeywordIndex:
        """The index of ``with_neighbours(doc_keys, own_terms, neighbours)``, built without
        writing those entries out: each chunk's terms are counted once, and an entry's counts
        are its own (twice, with neighbours) plus its neighbours', as sparse matrices. The
        scores are bm25s's own, bit for bit (its default Lucene BM25, k1 1.5, b 0.75,
        float32; tests/test_keyword.py), and bm25s saves, loads and searches them as before.
        bm25s's own build walks every token of every entry in Python: 0.78-0.91 s at 10,097
        chunks against 0.15 s here (benchmarks/README.md), paid by every ingest that changes
        anything, whatever it changed."""
        import bm25s

        bm25 = bm25s.BM25()
        if ids:
            bm25.scores, bm25.vocab_dict = _bm25_scores(
                doc_keys, own_terms, neighbours, k1=bm25.k1, b=bm25.b
            )
            bm25.unique_token_ids_set = set(bm25.vocab_dict.values())
            bm25.nonoccurrence_array = None
        return cls(list(ids), bm25)

    @classmethod
    def from_term_ids(
        cls,
        ids: Sequence[str],
        doc_keys: Sequence[str],
        term_ids: Sequence[bytes],
        vocabulary: Sequence[str],
        neighbours: int,
    ) -> KeywordIndex:
        """``from_terms`` from each chunk's terms kept as ids into ``vocabulary`` (the ingest
        manifest's: C ints, ``array("i")``), splitting and looking up no strings. Its columns
        follow the terms' first appearance, as ``from_terms`` orders them: the same index, bit
        for bit (tests/test_keyword.py)."""
        import bm25s
        import numpy as np

        bm25 = bm25s.BM25()
        if ids:
            width = np.dtype(np.intc).itemsize
            lengths = np.fromiter((len(b) // width for b in term_ids), np.int64, len(term_ids))
            flat = np.frombuffer(b"".join(term_ids), dtype=np.intc)
            if flat.size:
                used, first = np.unique(flat, return_index=True)
                columns = used[np.argsort(first, kind="stable")]  # by first appearance
                remap = np.empty(int(used[-1]) + 1, dtype=np.int32)
                remap[columns] = np.arange(len(columns), dtype=np.int32)
                flat = remap[flat]
                vocab = {vocabulary[t]: i for i, t in enumerate(columns.tolist())}
            else:
                flat, vocab = flat.astype(np.int32), {}
            bm25.scores, bm25.vocab_dict = _bm25_from_ids(
                doc_keys, flat, lengths, vocab, neighbours, k1=bm25.k1, b=bm25.b
            )
            bm25.unique_token_ids_set = set(bm25.vocab_dict.values())
            bm25.nonoccurrence_array = None
        return cls(list(ids), bm25)

    def save(self, folder: Path) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(folder.name + ".tmp")
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if self.ids:
            self._bm25.save(str(tmp))
        (tmp / "ids.json").write_text(json.dumps(self.ids))
        (tmp / "params.json").write_text(json.dumps(self.params))
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def saved_params(folder: Path) -> dict[str, Any]:
        """The build settings a saved index records ({} when it records none)."""
        try:
            params: dict[str, Any] = json.loads((folder / "params.json").read_text())
        except (OSError, ValueError):
            return {}
        return params

    @classmethod
    def load(cls, folder: Path) -> KeywordIndex:
        import bm25s

        ids_file = folder / "ids.json"
        if not ids_file.is_file():
            return cls.build([], [])
        ids: list[str] = json.loads(ids_file.read_text())
        if not ids:
            return cls.build([], [])
        return cls(ids, bm25s.BM25.load(str(folder)))

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """Top-k (chunk id, BM25 score), best first; chunks sharing no term are left out."""
        import numpy as np

        q = terms(query)
        if not self.ids or not q:
            return []
        ids = self._bm25.get_tokens_ids(q)
        if not ids:
            return []
        scores = self._bm25.get_scores_from_ids(ids)
        k = min(k, len(self.ids))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self.ids[i], float(scores[i])) for i in top if scores[i] > 0]


def _bm25_scores(
    doc_keys: Sequence[str],
    own_terms: Sequence[Sequence[str]],
    neighbours: int,
    *,
    k1: float,
    b: float,
) -> tuple[dict[str, Any], dict[str, int]]:
    """bm25s's eager score matrix (``scores``: CSC arrays, a column per term, a row per
    entry) and vocabulary for the entries of ``with_neighbours``, with sparse matrices: the
    chunks' term counts C (a row per chunk), the entries' counts A @ C where A holds 2 on its
    diagonal (an entry's own terms count twice) and 1 for each neighbour of the same document
    within ``neighbours`` places; C alone when ``neighbours`` is 0."""
    import numpy as np

    lengths = np.fromiter(map(len, own_terms), dtype=np.int64, count=len(own_terms))
    flat = list(itertools.chain.from_iterable(own_terms))
    vocab = {term: i for i, term in enumerate(dict.fromkeys(flat))}
    term_ids = np.fromiter(map(vocab.__getitem__, flat), dtype=np.int32, count=len(flat))
    return _bm25_from_ids(doc_keys, term_ids, lengths, vocab, neighbours, k1=k1, b=b)


def _bm25_from_ids(
    doc_keys: Sequence[str],
    term_ids: Any,
    lengths: Any,
    vocab: dict[str, int],
    neighbours: int,
    *,
    k1: float,
    b: float,
) -> tuple[dict[str, Any], dict[str, int]]:
    """``_bm25_scores`` from the chunks' terms as columns (``term_ids``: every chunk's in a
    row, int32, ``lengths`` per chunk) and ``vocab`` (term → column)."""
    import numpy as np
    import scipy.sparse as sp

    n = len(lengths)
    n_vocab = len(vocab)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    counts = sp.csr_matrix(
        (np.ones(len(term_ids), dtype=np.int32), term_ids, starts), shape=(n, n_vocab)
    )
    counts.sum_duplicates()  # a (chunk, term) pair once, with its count
    if neighbours > 0:
        codes = np.fromiter(
            map({k: i for i, k in enumerate(dict.fromkeys(doc_keys))}.__getitem__, doc_keys),
            dtype=np.int64,
            count=n,
        )
        bands, offsets = [np.full(n, 2, dtype=np.int32)], [0]
        for step in range(1, min(neighbours, n - 1) + 1):
            same = (codes[:-step] == codes[step:]).astype(np.int32)
            bands += [same, same]
            offsets += [step, -step]
        mix = sp.diags(bands, offsets, shape=(n, n), format="csr", dtype=np.int32)
        mix.eliminate_zeros()
        counts = mix @ counts
    entries = counts.tocsc()  # per term, its entries in order: bm25s's layout
    entries.sum_duplicates()
    rows = entries.indices
    tf = entries.data.astype(np.float32)
    df = np.diff(entries.indptr)
    cols = np.repeat(np.arange(n_vocab), df)
    doc_len = np.bincount(rows, weights=tf, minlength=n)
    avg_len = doc_len.mean()
    # bm25s: idf per term in double, kept as float32; each score in double, kept as float32
    idf = np.log(1 + (n - df + 0.5) / (df + 0.5)).astype(np.float32)
    tfc = tf / (k1 * ((1 - b) + b * doc_len[rows] / avg_len) + tf)
    data = (idf[cols] * tfc).astype(np.float32)
    vocab[""] = n_vocab  # bm25s's "empty token", past the last column, as its index() adds it
    scores = {
        "data": data,
        "indices": rows.astype(np.int32),
        "indptr": entries.indptr.astype(np.int64),
        "num_docs": n,
    }
    return scores, vocab
