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
    """The embedding model's tokenizer, loaded from its ``tokenizer.json`` (no torch needed)."""

    def __init__(self, tokenizer_json: Path, special_tokens: int = 2) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(tokenizer_json))
        self._tok.no_truncation()
        self._tok.no_padding()
        # [CLS] and [SEP] for BERT-style models: counted against the window
        self.special_tokens = special_tokens

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

    def chunk(self, doc: Document, doc_key: str) -> list[Chunk]:
        key_hash = hashlib.sha1(doc_key.encode()).hexdigest()[:12]
        chunks: list[Chunk] = []
        seen: dict[str, int] = {}
        ids_of = getattr(self.tok, "ids", None)
        for section in doc.sections:
            prefix = self._prefix(doc.title, section)
            budget = self.max_tokens - self.special - (self.tok.count(prefix) if prefix else 0)
            if budget < 32:
                # an absurdly long title or heading path: drop it rather than starve the body
                prefix, budget = "", self.max_tokens - self.special
            bodies = self._split(section.text, budget)
            while bodies:
                body = bodies.pop(0)
                embed_text = f"{prefix}\n{body}" if prefix else body
                # the one tokenisation of the final text: its size, and the ids to embed
                ids: tuple[int, ...] = tuple(ids_of(embed_text)) if ids_of else ()
                tokens = len(ids) if ids_of else self.tok.count(embed_text) + self.special
                if tokens > self.max_tokens:
                    # joining its parts tokenised differently: cut it, never truncate
                    pieces = self._hard_split(body, budget)
                    if pieces != [body]:
                        bodies[:0] = pieces
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

    def _split(self, text: str, budget: int) -> list[str]:
        """Pieces of at most ``budget`` tokens. Each paragraph is tokenised once: a long one's
        sentences are counted from its token offsets (a token belongs to the sentence it starts
        in), not tokenised again."""
        units: list[tuple[str, int, str]] = []  # (text, tokens, joiner before it)
        for para in _PARAGRAPH.split(text):
            para = para.strip()
            if not para:
                continue
            offs = self.tok.offsets(para)
            if len(offs) <= budget:
                units.append((para, len(offs), "\n\n"))
                continue
            starts = [a for a, _ in offs]
            joiner = "\n\n"
            for a, b in _sentence_spans(para):
                sent = para[a:b]
                m = bisect_left(starts, b) - bisect_left(starts, a)
                if m <= budget:
                    units.append((sent, m, joiner))
                else:
                    for piece in self._hard_split(sent, budget):
                        units.append((piece, self.tok.count(piece), joiner))
                joiner = " "
        return self._pack(units, budget)

    def _pack(self, units: list[tuple[str, int, str]], budget: int) -> list[str]:
        out: list[str] = []
        cur: list[tuple[str, int, str]] = []
        size = 0
        for unit in units:
            if cur and size + unit[1] > budget:
                out.append(_join(cur))
                # carry trailing units (sentences, short paragraphs) as overlap
                carry: list[tuple[str, int, str]] = []
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

    def _hard_split(self, text: str, budget: int) -> list[str]:
        """Windows of at most ``budget`` tokens, overlapping, cut at token offsets."""
        offs = self.tok.offsets(text)
        if not offs:
            return [text] if text.strip() else []
        step = max(1, budget - self.overlap)
        pieces = []
        start = 0
        while start < len(offs):
            end = min(start + budget, len(offs))
            piece = text[offs[start][0] : offs[end - 1][1]].strip()
            # re-tokenising a slice can merge differently at its edges: shrink until it fits
            while end - start > 1 and self.tok.count(piece) > budget:
                end -= 1
                piece = text[offs[start][0] : offs[end - 1][1]].strip()
            if piece:
                pieces.append(piece)
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


def _join(units: list[tuple[str, int, str]]) -> str:
    text = units[0][0]
    for piece, _, joiner in units[1:]:
        text += joiner + piece
    return text
