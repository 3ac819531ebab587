"""Checking an answer's ``[n]`` citations against the sources they point at.

After an answer is complete, every sentence that carries a marker is compared with the source
it cites::

    answer ─► sentences ─► (claim, n) pairs ─► support score ─► per source: supported,
                                                                 unsupported or uncited

A pair is *supported* when the source's text (title, heading and body) backs the claim:

- **lexical**: the share of the claim's content terms (stemmed, stop words removed: the BM25
  index's own ``terms``) that occur in the source;
- **semantic**: the cosine similarity of the claim and the source sentence closest to it
  (one batched encode of the claims and the cited sources' sentences with the app's embedder);
- **numbers**: every number in the claim must occur in the source ("port 9000 [1]" is not
  supported by a source that says 8000, however similar the wording).

Supported = numbers present and (lexical >= ``MIN_LEXICAL`` or semantic >= ``MIN_SEMANTIC``).
The thresholds were chosen on a labelled set of (sentence, source, supports?) pairs from the
bundled guide (``rag_chat/evalsets/citations.jsonl``; ``python -m rag_chat.eval_answers
--checker`` measures them). Without an embedder the check is lexical only
(``MIN_LEXICAL_ALONE``).

A source is *supported* when at least one sentence citing it is supported by it,
*unsupported* when it is cited only by sentences it does not support, *uncited* when nothing
cites it. Everything here is blocking (the embedder); the server runs it in a worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING

from rag_chat.retrieval.keyword import terms

if TYPE_CHECKING:
    from rag_chat.retrieval.embedder import Embedder
    from rag_chat.retrieval.store import Hit

# Chosen on rag_chat/evalsets/citations.jsonl (see the module docstring and README).
MIN_LEXICAL = 0.6
MIN_SEMANTIC = 0.6
MIN_LEXICAL_ALONE = 0.6

MARKER = re.compile(r"\[(\d{1,3})\]")
_MARKERS_ONLY = re.compile(r"^(?:\s*\[\d{1,3}\])+")
# a sentence ends at . ! ? (followed by space) or a line break; list items and headings are
# their own sentences
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_NUMBER = re.compile(r"\d+(?:[.:]\d+)*")
_MARKDOWN = re.compile(r"[*_`#>|]+|^\s*(?:[-+]|\d+[.)])\s+", re.MULTILINE)
_CODE_FENCE = re.compile(r"```.*?(?:```|$)", re.DOTALL)


@dataclass(frozen=True)
class Claim:
    """One sentence of an answer and the sources it cites."""

    text: str  # markers and markdown removed
    cites: tuple[int, ...]


@dataclass(frozen=True)
class PairCheck:
    claim: str
    n: int
    lexical: float
    semantic: float | None
    numbers_ok: bool
    supported: bool


@dataclass
class CitationCheck:
    supported: list[int] = field(default_factory=list)  # cited, and backs a citing sentence
    unsupported: list[int] = field(default_factory=list)  # cited, backs none of its sentences
    uncited: list[int] = field(default_factory=list)  # shown, never cited
    pairs: list[PairCheck] = field(default_factory=list)

    def as_event(self) -> dict[str, list[int]]:
        """The fields ``ai.done`` carries."""
        return {
            "citations": self.supported,
            "unsupported": self.unsupported,
            "uncited": self.uncited,
        }


def cited(text: str, n_sources: int) -> list[int]:
    """Every source number cited in ``text``, in range, sorted."""
    return sorted({int(m) for m in MARKER.findall(text) if 1 <= int(m) <= n_sources})


def _plain(text: str) -> str:
    text = MARKER.sub(" ", text)
    text = _MARKDOWN.sub(" ", text)
    return " ".join(text.split())


def claims(answer: str, n_sources: int) -> list[Claim]:
    """The sentences of ``answer`` that cite something, with what they cite.

    A marker that opens a sentence ("… on port 8000. [1] It also …") belongs to the sentence
    before it, the usual place for a citation after the full stop. Code blocks are skipped.
    """
    answer = _CODE_FENCE.sub("\n", answer)
    pieces = [p for p in _SENTENCE_END.split(answer) if p and p.strip()]
    texts: list[str] = []
    cites: list[list[int]] = []
    for piece in pieces:
        lead = _MARKERS_ONLY.match(piece)
        if lead and texts:
            cites[-1].extend(int(m) for m in MARKER.findall(lead.group(0)))
            piece = piece[lead.end() :]
        texts.append(piece)
        cites.append([int(m) for m in MARKER.findall(piece)])
    out: list[Claim] = []
    for text, ns in zip(texts, cites, strict=True):
        valid = tuple(sorted({n for n in ns if 1 <= n <= n_sources}))
        if valid:
            out.append(Claim(_plain(text), valid))
    return out


def source_text(hit: Hit) -> str:
    meta = hit.metadata
    head = " ".join(str(meta[k]) for k in ("title", "heading") if meta.get(k))
    return f"{head}\n{hit.text}" if head else hit.text


def _source_sentences(text: str) -> list[str]:
    parts = [_plain(p) for p in _SENTENCE_END.split(text)]
    parts = [p for p in parts if len(p) > 2]
    # neighbouring sentences together too: a claim often merges two short source sentences
    pairs = [f"{a} {b}" for a, b in pairwise(parts)]
    return (parts + pairs) or [_plain(text)]


def lexical_support(claim: str, source: str) -> float:
    """The share of the claim's content terms found in the source (0 for a claim with none)."""
    words = set(terms(claim))
    if not words:
        return 0.0
    return len(words & set(terms(source))) / len(words)


def numbers_ok(claim: str, source: str) -> bool:
    have = set(_NUMBER.findall(source))
    return all(n in have for n in _NUMBER.findall(claim))


def check(
    answer: str,
    hits: Sequence[Hit],
    embedder: Embedder | None = None,
    *,
    min_lexical: float | None = None,
    min_semantic: float = MIN_SEMANTIC,
) -> CitationCheck:
    """Judge every citation of ``answer`` against ``hits`` (source ``n`` is ``hits[n-1]``)."""
    n_sources = len(hits)
    found = claims(answer, n_sources)
    sources = {n: source_text(hits[n - 1]) for c in found for n in c.cites}
    if min_lexical is None:
        min_lexical = MIN_LEXICAL if embedder is not None else MIN_LEXICAL_ALONE
    semantic: dict[tuple[int, int], float] = {}
    if embedder is not None and found:
        semantic = _semantic(found, sources, embedder)
    result = CitationCheck()
    backed: set[int] = set()
    for i, c in enumerate(found):
        for n in c.cites:
            lex = lexical_support(c.text, sources[n])
            sem = semantic.get((i, n))
            nums = numbers_ok(c.text, sources[n])
            ok = (
                nums
                and bool(terms(c.text))
                and (lex >= min_lexical or (sem is not None and sem >= min_semantic))
            )
            result.pairs.append(PairCheck(c.text, n, round(lex, 4), sem, nums, ok))
            if ok:
                backed.add(n)
    cited_any = {n for c in found for n in c.cites}
    result.supported = sorted(backed)
    result.unsupported = sorted(cited_any - backed)
    result.uncited = [n for n in range(1, n_sources + 1) if n not in cited_any]
    return result


def _semantic(
    found: Sequence[Claim], sources: dict[int, str], embedder: Embedder
) -> dict[tuple[int, int], float]:
    """Cosine of each (claim, cited source): the best over the source's sentences."""
    spans: dict[int, tuple[int, int]] = {}
    texts = [c.text or "-" for c in found]
    for n, text in sources.items():
        sentences = _source_sentences(text)
        spans[n] = (len(texts), len(texts) + len(sentences))
        texts.extend(sentences)
    vectors = embedder.encode(texts)  # L2-normalised: dot product = cosine
    out: dict[tuple[int, int], float] = {}
    for i, c in enumerate(found):
        for n in c.cites:
            a, b = spans[n]
            out[(i, n)] = round(float((vectors[a:b] @ vectors[i]).max()), 4)
    return out
