"""Structure-aware chunking measured in the embedding model's own tokens.

A document's sections (heading boundaries) are never mixed in one chunk. Inside a section,
paragraphs are packed greedily; a paragraph too long for one chunk is cut at sentences, and a
sentence too long is cut at token boundaries (using the tokenizer's character offsets, so the
original casing and spacing survive). Consecutive pieces of one section overlap by up to
``overlap`` tokens.

Each chunk is embedded together with a context prefix (document title and heading path); the
prefix, the body and the model's special tokens together fit ``max_tokens``, so nothing is ever
silently truncated by the embedding model.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ingest.loaders import Document, Section


class Tokenizer(Protocol):
    def count(self, text: str) -> int: ...

    def offsets(self, text: str) -> list[tuple[int, int]]: ...


class HFTokenizer:
    """The embedding model's tokenizer, loaded from its ``tokenizer.json`` (no torch needed).

    ``composable``: the tokens of ``a + whitespace + b`` are those of ``a`` then those of ``b``
    — true of a BERT tokenizer (a character-wise normaliser, words split at whitespace and
    punctuation before WordPiece sees them), which is what lets the chunker put a chunk's
    token ids together from the pieces it tokenised to cut it, instead of tokenising every
    chunk again (a third of chunking's time). Any other tokenizer: each chunk is tokenised."""

    def __init__(self, tokenizer_json: Path, special_tokens: int = 2) -> None:
        import json

        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(tokenizer_json))
        self._tok.no_truncation()
        self._tok.no_padding()
        # [CLS] and [SEP] for BERT-style models: counted against the window
        self.special_tokens = special_tokens
        config = json.loads(self._tok.to_str())

        def kind(part: str) -> str | None:
            return (config.get(part) or {}).get("type")

        self.composable = (
            kind("normalizer") == "BertNormalizer"
            and kind("pre_tokenizer") == "BertPreTokenizer"
            and kind("model") == "WordPiece"
        )
        # the special tokens around a text's own, from the post-processor ([CLS] … [SEP])
        bare = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a").ids
        at = next((i for i in range(len(full)) if full[i : i + len(bare)] == bare), None)
        if at is None or len(full) - len(bare) != special_tokens:
            self.composable = False
            at = 0
        self.head: tuple[int, ...] = tuple(full[:at])
        self.tail: tuple[int, ...] = tuple(full[at + len(bare) :])

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets, no special tokens."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)

    def encode_many(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """``encode`` of each text, in one call: the library tokenises them on every core,
        without a round trip through Python for each."""
        return [(e.ids, e.offsets) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encs]

    def offsets(self, text: str) -> list[tuple[int, int]]:
        return list(self._tok.encode(text, add_special_tokens=False).offsets)

    def ids(self, text: str) -> list[int]:
        """The token ids the embedding model runs on: special tokens added, nothing cut."""
        return list(self._tok.encode(text).ids)


@dataclass(frozen=True)
class Chunk:
    id: str
    doc_id: str
    title: str
    text: str  # the body, shown to users as the snippet
    embed_text: str  # context prefix + body: what is embedded
    heading_path: tuple[str, ...]
    page: int | None
    position: int
    content_hash: str
    tokens: int  # tokens of embed_text, special tokens included
    # embed_text's token ids, special tokens included, when the tokenizer gives them: the
    # ingest embeds these instead of tokenizing the text a second time
    token_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def metadata(self, source: str, kind: str) -> dict[str, str | int]:
        meta: dict[str, str | int] = {
            "source": source,
            "doc_id": self.doc_id,
            "title": self.title,
            "heading": " > ".join(self.heading_path),
            "position": self.position,
            "content_hash": self.content_hash,
            "tokens": self.tokens,
            "kind": kind,
        }
        if self.page is not None:
            meta["page"] = self.page
        return meta


_Unit = tuple[str, int, str, list[int] | None]  # text, tokens, joiner before it, ids (or None)

# chunk_many tokenises the sections ahead in batches of about this much text
PRIME_CHARS = 200_000

_SENTENCE = re.compile(r"(?<=[.!?。])\s+(?=\S)")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


class Chunker:
    def __init__(
        self,
        tokenizer: Tokenizer,
        max_tokens: int = 256,
        overlap: int = 32,
        special_tokens: int = 2,
    ) -> None:
        if overlap >= max_tokens // 2:
            raise ValueError(f"chunk overlap ({overlap}) must be under half the chunk size")
        self.tok = tokenizer
        self.max_tokens = max_tokens
        self.overlap = overlap
        self.special = special_tokens
        # chunk_many: every (title, section) of its documents in order, the next one to
        # chunk, the first not tokenised yet, and the tokens of the window tokenised ahead
        # (paragraph or context prefix -> ids, offsets)
        self._queue: list[tuple[str, Section]] = []
        self._at = self._next = 0
        self._primed: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}

    def chunk_many(self, docs: Sequence[tuple[Document, str]]) -> list[list[Chunk]]:
        """``chunk`` of each (document, key), the same chunks, with paragraphs and context
        prefixes tokenised in batches (where the tokenizer can: ``encode_many``) rather than
        one call each: 40% of chunking's time on two cores. A batch is the sections ahead,
        across documents, up to ``PRIME_CHARS`` of text (at least one section): memory stays
        flat however large a document is."""
        if getattr(self.tok, "encode_many", None) is not None:
            self._queue = [(doc.title, s) for doc, _ in docs for s in doc.sections]
        try:
            return [self.chunk(doc, key) for doc, key in docs]
        finally:
            self._queue, self._primed = [], {}
            self._at = self._next = 0

    def _prime(self) -> None:
        """Before chunking the section at ``_at`` of chunk_many's queue: if it is not
        tokenised yet, tokenise the window of sections from it in one batch."""
        if self._at >= len(self._queue) or self._at < self._next:
            return
        texts: dict[str, None] = {}
        size = 0
        end = self._at
        while end < len(self._queue) and (end == self._at or size < PRIME_CHARS):
            title, section = self._queue[end]
            if prefix := self._prefix(title, section):
                texts[prefix] = None
            for para in _PARAGRAPH.split(section.text):
                if para := para.strip():
                    texts[para] = None
            size += len(section.text)
            end += 1
        encoded = self.tok.encode_many(list(texts))  # type: ignore[attr-defined]
        self._primed = dict(zip(texts, encoded, strict=True))
        self._next = end

    def chunk(self, doc: Document, doc_key: str) -> list[Chunk]:
        key_hash = hashlib.sha1(doc_key.encode()).hexdigest()[:12]
        chunks: list[Chunk] = []
        seen: dict[str, int] = {}
        ids_of = getattr(self.tok, "ids", None)
        compose = self._composable
        for section in doc.sections:
            if self._queue:
                self._prime()
                self._at += 1
            prefix = self._prefix(doc.title, section)
            prefix_n, prefix_ids = self._count(prefix) if prefix else (0, [])
            budget = self.max_tokens - self.special - prefix_n
            if budget < 32:
                # an absurdly long title or heading path: drop it rather than starve the body
                prefix, prefix_ids, budget = "", [], self.max_tokens - self.special
            bodies = self._split(section.text, budget)
            while bodies:
                body, body_ids = bodies.pop(0)
                embed_text = f"{prefix}\n{body}" if prefix else body
                ids: tuple[int, ...]
                if compose and body_ids is not None and prefix_ids is not None:
                    # the pieces' tokens put together: what tokenising embed_text gives
                    head, tail = self.tok.head, self.tok.tail  # type: ignore[attr-defined]
                    ids = (*head, *prefix_ids, *body_ids, *tail)
                else:  # tokenised once more: its size, and the ids to embed
                    ids = tuple(ids_of(embed_text)) if ids_of else ()
                tokens = len(ids) if ids_of else self.tok.count(embed_text) + self.special
                if tokens > self.max_tokens:
                    # joining its parts tokenised differently: cut it, never truncate
                    pieces = self._hard_split(body, budget)
                    if [p for p, _, _ in pieces] != [body]:
                        bodies[:0] = [(p, ids) for p, _, ids in pieces]
                        continue
                content_hash = hashlib.sha256(embed_text.encode()).hexdigest()
                n = seen.get(content_hash, 0)
                seen[content_hash] = n + 1
                cid = f"{key_hash}-{content_hash[:20]}" + (f"-{n}" if n else "")
                chunks.append(
                    Chunk(
                        cid,
                        doc.doc_id,
                        doc.title,
                        body,
                        embed_text,
                        section.heading_path,
                        section.page,
                        len(chunks),
                        content_hash,
                        tokens,
                        ids,
                    )
                )
        return chunks

    @staticmethod
    def _prefix(title: str, section: Section) -> str:
        headings = list(section.heading_path)
        if headings and title and headings[0].strip().lower() == title.strip().lower():
            headings = headings[1:]
        parts = [p for p in (title, " > ".join(headings)) if p]
        return "\n".join(parts)

    @property
    def _composable(self) -> bool:
        return bool(getattr(self.tok, "composable", False))

    def _encode(self, text: str) -> tuple[list[int] | None, list[tuple[int, int]]]:
        """(ids or None, offsets) of ``text``, no special tokens: one tokenisation."""
        if (primed := self._primed.get(text)) is not None:
            return primed
        encode = getattr(self.tok, "encode", None)
        if encode is not None:
            ids, offs = encode(text)
            return ids, offs
        offs = self.tok.offsets(text)
        return None, offs

    def _split(self, text: str, budget: int) -> list[tuple[str, list[int] | None]]:
        """Pieces of at most ``budget`` tokens, with their token ids where known. Each
        paragraph is tokenised once: a long one's sentences are counted (and their ids taken)
        from its tokens (a token belongs to the sentence it starts in; sentences end at
        whitespace), not tokenised again."""
        units: list[_Unit] = []  # (text, tokens, joiner before it, ids)
        for para in _PARAGRAPH.split(text):
            para = para.strip()
            if not para:
                continue
            ids, offs = self._encode(para)
            if len(offs) <= budget:
                units.append((para, len(offs), "\n\n", ids))
                continue
            starts = [a for a, _ in offs]
            joiner = "\n\n"
            for a, b in _sentence_spans(para):
                sent = para[a:b]
                i, j = bisect_left(starts, a), bisect_left(starts, b)
                if j - i <= budget:
                    units.append((sent, j - i, joiner, ids[i:j] if ids is not None else None))
                else:
                    for piece, n, piece_ids in self._hard_split(sent, budget):
                        units.append((piece, n, joiner, piece_ids))
                joiner = " "
        return self._pack(units, budget)

    def _pack(self, units: list[_Unit], budget: int) -> list[tuple[str, list[int] | None]]:
        out: list[tuple[str, list[int] | None]] = []
        cur: list[_Unit] = []
        size = 0
        for unit in units:
            if cur and size + unit[1] > budget:
                out.append(_join(cur))
                # carry trailing units (sentences, short paragraphs) as overlap
                carry: list[_Unit] = []
                carried = 0
                for prev in reversed(cur):
                    if carried + prev[1] > self.overlap or carried + prev[1] + unit[1] > budget:
                        break
                    carry.insert(0, prev)
                    carried += prev[1]
                cur, size = carry, carried
            cur.append(unit)
            size += unit[1]
        if cur:
            out.append(_join(cur))
        # joining can differ from the sum of the parts for some tokenizers: chunk() checks
        # each final text and cuts what does not fit
        return out

    def _count(self, text: str) -> tuple[int, list[int] | None]:
        """(tokens, ids or None) of ``text``, no special tokens."""
        ids, offs = self._encode(text)
        return len(offs), ids

    def _hard_split(self, text: str, budget: int) -> list[tuple[str, int, list[int] | None]]:
        """Windows of at most ``budget`` tokens, overlapping, cut at token offsets; each with
        its own size and ids (a slice tokenised alone can differ at its edges)."""
        offs = self.tok.offsets(text)
        if not offs:
            return [(text, *self._count(text))] if text.strip() else []
        step = max(1, budget - self.overlap)
        pieces = []
        start = 0
        while start < len(offs):
            end = min(start + budget, len(offs))
            piece = text[offs[start][0] : offs[end - 1][1]].strip()
            # re-tokenising a slice can merge differently at its edges: shrink until it fits
            n, piece_ids = self._count(piece)
            while end - start > 1 and n > budget:
                end -= 1
                piece = text[offs[start][0] : offs[end - 1][1]].strip()
                n, piece_ids = self._count(piece)
            if piece:
                pieces.append((piece, n, piece_ids))
            if end >= len(offs):
                break
            start = max(start + 1, end - self.overlap) if end - start > self.overlap else end
            start = min(start, start + step)
        return pieces


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each piece ``_SENTENCE.split(text)`` gives."""
    spans = []
    start = 0
    for m in _SENTENCE.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return spans


def _join(units: list[_Unit]) -> tuple[str, list[int] | None]:
    """The units' texts joined (each after its joiner: whitespace) and their ids end to end
    (None if any unit's are unknown)."""
    text = units[0][0]
    ids: list[int] | None = list(units[0][3]) if units[0][3] is not None else None
    for piece, _, joiner, piece_ids in units[1:]:
        text += joiner + piece
        if ids is not None and piece_ids is not None:
            ids += piece_ids
        else:
            ids = None
    return text, ids
