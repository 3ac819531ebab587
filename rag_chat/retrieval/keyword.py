"""BM25 keyword index (bm25s over Snowball-stemmed terms), stored beside the vector index.

Ingest keeps each chunk's terms in its manifest and rebuilds this index at the end of a run
that changed anything; the chat side only loads it. A rebuild from stored terms costs no
parsing and no tokenising. The index is written to a fresh folder and swapped in with a rename,
so a reader never sees half an index.
"""

from __future__ import annotations

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
    def build(cls, ids: Sequence[str], term_lists: Sequence[list[str]]) -> KeywordIndex:
        import bm25s

        bm25 = bm25s.BM25()
        if ids:
            bm25.index([list(t) for t in term_lists], show_progress=False)
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
