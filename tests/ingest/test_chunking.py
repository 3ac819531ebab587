from __future__ import annotations

import itertools

import pytest

from ingest import chunking
from ingest.chunking import Chunker, HFTokenizer
from ingest.loaders import Document, Section
from rag_chat.retrieval.embedder import Embedder


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return HFTokenizer(Embedder().tokenizer_path)


def doc(*sections: Section, title: str = "Guide") -> Document:
    return Document("guide.md", title, "markdown", list(sections))


def test_small_sections_become_one_chunk_each_with_context(tok: HFTokenizer) -> None:
    chunker = Chunker(tok, 256, 32)
    chunks = chunker.chunk(
        doc(Section("Run make.", ("Guide", "Install")), Section("Ask away.", ("Guide", "Chat"))),
        "/abs/guide.md",
    )
    assert [c.text for c in chunks] == ["Run make.", "Ask away."]
    # the title is not repeated when the first heading is the title
    assert chunks[0].embed_text == "Guide\nInstall\nRun make."
    assert [c.position for c in chunks] == [0, 1]
    assert chunks[0].heading_path == ("Guide", "Install")


def test_no_chunk_exceeds_the_model_window(tok: HFTokenizer) -> None:
    sentences = " ".join(
        f"Sentence number {i} talks about embeddings and chunk sizes." for i in range(300)
    )
    giant_word = "x" * 5000  # one "word" far longer than a chunk: hard split by tokens
    paragraphs = "\n\n".join(["short paragraph"] * 40)
    chunker = Chunker(tok, 256, 32)
    chunks = chunker.chunk(doc(Section(sentences), Section(giant_word), Section(paragraphs)), "k")
    assert len(chunks) > 10
    for c in chunks:
        assert c.tokens <= 256
        # what the model would see, counted independently: [CLS] + text + [SEP]
        assert tok.count(c.embed_text) + 2 <= 256
    # every sentence survives somewhere
    body = " ".join(c.text for c in chunks)
    for i in (0, 150, 299):
        assert f"Sentence number {i} talks" in body


def test_chunks_carry_the_model_tokenizers_ids(tok: HFTokenizer) -> None:
    from tokenizers import Tokenizer

    model_tok = Tokenizer.from_file(str(Embedder().tokenizer_path))
    model_tok.no_truncation()
    model_tok.no_padding()
    sentences = " ".join(f"Claim {i}: aspirin lowers the risk of stroke." for i in range(120))
    chunks = Chunker(tok, 256, 32).chunk(doc(Section(sentences, ("Guide", "Trials"))), "k")
    assert len(chunks) > 3
    for c in chunks:
        assert list(c.token_ids) == model_tok.encode(c.embed_text).ids  # [CLS] … [SEP]
        assert c.tokens == len(c.token_ids) <= 256


def test_a_long_paragraph_is_tokenised_once(tok: HFTokenizer) -> None:
    """Its sentences are counted from the paragraph's token offsets; each final text is
    tokenised once more (its ids): not every sentence and every packed piece again."""
    calls: list[str] = []

    class Counting:
        special_tokens = 2

        def count(self, text: str) -> int:
            calls.append(text)
            return tok.count(text)

        def offsets(self, text: str) -> list[tuple[int, int]]:
            calls.append(text)
            return tok.offsets(text)

        def ids(self, text: str) -> list[int]:
            calls.append(text)
            return tok.ids(text)

    para = " ".join(f"Sentence {i} is about chunking by model tokens." for i in range(100))
    counted = Chunker(Counting(), 128, 16).chunk(doc(Section(para), title=""), "k")
    plain = Chunker(tok, 128, 16).chunk(doc(Section(para), title=""), "k")
    assert [c.id for c in counted] == [c.id for c in plain] and len(plain) > 5
    assert len(calls) == 1 + len(plain)  # the paragraph's offsets, then each chunk's ids


def test_a_bert_tokenizer_tokenises_each_text_once(tok: HFTokenizer) -> None:
    """With the model's (BERT) tokenizer each chunk's ids are put together from the pieces
    tokenised to cut it: the paragraph is the only text tokenised, besides the title."""
    calls: list[str] = []

    class Counting(HFTokenizer):
        def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
            calls.append(text)
            return super().encode(text)

        def ids(self, text: str) -> list[int]:
            calls.append(text)
            return super().ids(text)

    counting = Counting(Embedder().tokenizer_path)
    assert counting.composable and (counting.head, counting.tail) == ((101,), (102,))
    para = " ".join(f"Sentence {i} is about chunking by model tokens." for i in range(100))
    chunks = Chunker(counting, 128, 16).chunk(doc(Section(para, ("Guide", "Size"))), "k")
    assert len(chunks) > 5
    assert calls == ["Guide\nSize", para]
    for c in chunks:
        assert list(c.token_ids) == tok.ids(c.embed_text)


HARD_TEXT = [
    "Café naïve résumé — “quoted” façade; Ünïcödé accents stay (lowercased, not stripped).",
    "中文字符被单独切分。日本語のテキストも。 Mixed 中文 and English, emoji 🙂🚀 and ☃.",
    "A very long word: " + "antidisestablishmentarianism" * 8 + " then more words after it.",
    "Tabs\tand\u00a0non-breaking\u2003spaces, a zero\u200bwidth space, control\x07chars.",
    "Numbers 3.14159, 1,000,000 and e-mail a.b@example.com; URLs https://x.y/z?q=1&r=2.",
    "Hyphen-ated, under_scored, CamelCase, ALLCAPS, O'Brien's, rock'n'roll, C++ and C#.",
]


def test_composed_ids_are_what_the_tokenizer_gives(tok: HFTokenizer) -> None:
    """Paragraphs that fit, sentences cut from long ones, hard-split giant words, headings,
    accents, CJK, emoji, odd whitespace: every chunk's ids are exactly the tokenizer's ids of
    its text, and the chunks are those of a tokenizer that tokenises every chunk again."""
    # and a sentence longer than a chunk, of words WordPiece cuts into pieces: hard-split
    run_on = " ".join(["tokenisation-unbelievablenesses Überzeugungsarbeit"] * 90)
    long_para = " ".join(HARD_TEXT * 6 + [run_on] + HARD_TEXT * 6)
    giant = "x" * 3000 + " " + "é" * 700
    sections = [
        Section("\n\n".join(HARD_TEXT), ("Guide", "Café > Überblick")),
        Section(long_para, ("Guide", "中文")),
        Section(giant + "\n\n" + HARD_TEXT[0], ()),
        Section("\n\n".join(["short paragraph 🙂"] * 60), ("Guide", "Many")),
    ]

    class Recompute(HFTokenizer):
        composable = False

    again = Recompute(Embedder().tokenizer_path)
    again.composable = False
    for size, overlap in ((256, 32), (64, 16)):
        chunks = Chunker(tok, size, overlap).chunk(doc(*sections, title="Téstdoc"), "k")
        assert len(chunks) > 10
        for c in chunks:
            assert list(c.token_ids) == tok.ids(c.embed_text), c.embed_text[:80]
            assert c.tokens == len(c.token_ids) <= size
        slow = Chunker(again, size, overlap).chunk(doc(*sections, title="Téstdoc"), "k")
        assert [(c.id, c.token_ids) for c in chunks] == [(c.id, c.token_ids) for c in slow]


def test_chunk_many_gives_chunks_one_by_one_would_in_one_tokenizer_call(
    tok: HFTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several documents' paragraphs and context prefixes go to the tokenizer in one batch
    (a paragraph two documents share, once), none of them is tokenised again, and the chunks
    are exactly those of ``chunk``."""
    batches: list[list[str]] = []
    singles: list[str] = []

    class Counting(HFTokenizer):
        def encode_many(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
            batches.append(list(texts))
            return super().encode_many(texts)

        def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
            singles.append(text)
            return super().encode(text)

    counting = Counting(Embedder().tokenizer_path)
    run_on = " ".join(["tokenisation-unbelievablenesses Überzeugungsarbeit"] * 90)
    shared = "A paragraph both documents have, word for word."
    docs = [
        (doc(Section("\n\n".join([*HARD_TEXT, shared]), ("Guide", "Café"))), "a"),
        (doc(Section(" ".join(HARD_TEXT * 8 + [run_on]), ("中文",)), title="Téstdoc"), "b"),
        (doc(Section(f"{shared}\n\n" + "x" * 3000), title=""), "c"),
        (doc(), "empty"),
    ]
    for size, overlap in ((256, 32), (64, 16)):
        batches.clear()
        singles.clear()
        many = Chunker(counting, size, overlap).chunk_many(docs)
        one_by_one = [Chunker(tok, size, overlap).chunk(d, k) for d, k in docs]
        assert [[(c.id, c.text, c.token_ids) for c in cs] for cs in many] == [
            [(c.id, c.text, c.token_ids) for c in cs] for cs in one_by_one
        ]
        assert sum(map(len, many)) > 10
        assert len(batches) == 1 and batches[0].count(shared) == 1, batches
        assert set(HARD_TEXT) <= set(batches[0]) and "Guide\nCafé" in batches[0]
        # besides the batch: only the pieces a hard split cut (re-tokenised at their edges)
        assert not set(singles) & set(batches[0]), singles
    assert Chunker(counting, 256, 32).chunk_many([]) == []

    # a small window: a batch per section (at least one each), the same chunks, and a
    # window's tokens are not kept past it
    monkeypatch.setattr(chunking, "PRIME_CHARS", 1)
    batches.clear()
    singles.clear()
    chunker = Chunker(counting, 256, 32)
    many = chunker.chunk_many(docs)
    assert [[c.id for c in cs] for cs in many] == [
        [c.id for c in Chunker(tok, 256, 32).chunk(d, k)] for d, k in docs
    ]
    assert [shared in b for b in batches] == [True, False, True], batches
    assert not set(singles) & {t for b in batches for t in b}, singles
    assert chunker._primed == {} and chunker._queue == []


def test_overlap_between_consecutive_pieces(tok: HFTokenizer) -> None:
    text = " ".join(f"Fact {i} is here." for i in range(200))
    chunks = Chunker(tok, 64, 16).chunk(doc(Section(text)), "k")
    assert len(chunks) > 3
    for a, b in itertools.pairwise(chunks):
        last_sentence = a.text.split(". ")[-1].rstrip(".")
        assert last_sentence in b.text  # the next chunk starts with the previous one's tail


def test_hard_split_keeps_original_casing_and_spacing(tok: HFTokenizer) -> None:
    text = "CamelCase Identifier, " * 200  # no sentence ends: cut at token offsets
    chunks = Chunker(tok, 64, 8).chunk(doc(Section(text), title=""), "k")
    assert len(chunks) > 1
    # slices of the original (the uncased tokenizer's decode would lower-case them)
    assert all(c.text in text for c in chunks)
    assert "CamelCase Identifier" in chunks[0].text


def test_ids_are_stable_and_content_addressed(tok: HFTokenizer) -> None:
    chunker = Chunker(tok, 128, 16)
    d1 = doc(Section("alpha"), Section("beta"), Section("alpha"))
    a = chunker.chunk(d1, "/x/guide.md")
    b = chunker.chunk(d1, "/x/guide.md")
    assert [c.id for c in a] == [c.id for c in b]
    assert len({c.id for c in a}) == 3  # a repeated text gets a distinct id
    # editing one section leaves the other chunks' ids alone
    edited = chunker.chunk(
        doc(Section("alpha"), Section("BETA changed"), Section("alpha")), "/x/guide.md"
    )
    assert a[0].id == edited[0].id and a[2].id == edited[2].id and a[1].id != edited[1].id
    # another document with the same text gets other ids
    assert chunker.chunk(d1, "/y/other.md")[0].id != a[0].id


def test_overlap_must_leave_room() -> None:
    class Tok:
        def count(self, text: str) -> int:
            return len(text.split())

        def offsets(self, text: str) -> list[tuple[int, int]]:
            return []

    with pytest.raises(ValueError, match="overlap"):
        Chunker(Tok(), 64, 40)


def test_page_and_metadata(tok: HFTokenizer) -> None:
    [c] = Chunker(tok).chunk(doc(Section("page text", (), 3)), "k")
    meta = c.metadata("docs/m.pdf", "pdf")
    assert meta["page"] == 3
    assert meta["source"] == "docs/m.pdf" and meta["doc_id"] == "guide.md"
    assert meta["heading"] == ""
    assert meta["content_hash"] == c.content_hash
