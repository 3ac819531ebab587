"""The answer-quality evaluation, the citation checker's labelled set and the "don't know"
threshold, on the bundled guide with the real embedder (and the real SmolLM2 for a tiny run
of the answer evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_chat import citations
from rag_chat.eval_answers import has_fact, main, run_checker, run_relevance, score_answer
from rag_chat.evalsets import DATA, load
from rag_chat.retrieval.embedder import Embedder
from rag_chat.retrieval.search import Retriever
from rag_chat.settings import Settings


@pytest.fixture(scope="module")
def guide_retriever(guide_index: Path, embedder: Embedder) -> Retriever:
    return Retriever(Settings(data_dir=guide_index, _env_file=None), embedder=embedder)  # type: ignore[call-arg]


def test_has_fact_matches_numbers_whole_and_words_anywhere() -> None:
    assert has_fact("It listens on port 8000 [1].", ["8000"])
    assert not has_fact("It listens on port 80001.", ["8000"])
    assert not has_fact("Use 15 s or 1.5 s.", ["5"])
    assert not has_fact("See [5].", ["5"])
    assert has_fact("English stopwords are removed", ["stopword"])
    assert has_fact("all-MiniLM-L6-v2", ["minilm"])
    assert has_fact("five of them", ["5", "five"])


def test_score_answer() -> None:
    item = {"id": "port", "facts": [["8000"]], "sources": ["data/guide/faq.rst"]}
    chunks = [
        {"n": 1, "source": "data/guide/chatting.md"},
        {"n": 2, "source": "data/guide/faq.rst"},
    ]
    row = score_answer(item, "Port 8000 [2].", chunks, {"citations": []})
    assert row["fact"] and row["citation"] and row["both"] and row["retrieved"]
    assert not row["supported_citation"]  # the checker did not back it
    row = score_answer(item, "Port 8000 [1].", chunks, {"citations": [1]})
    assert row["fact"] and not row["citation"]


def test_the_question_sets_point_at_real_files_and_facts() -> None:
    """Every expected file exists, and every fact is in one of them (written from the docs)."""
    for item in load("answers.jsonl"):
        texts = [(DATA.parent / s).read_text() for s in item["sources"]]
        for group in item["facts"]:
            assert any(has_fact(t, group) for t in texts), (item["id"], group)
    for pair in load("followups.jsonl"):
        for t in pair["targets"]:
            assert (DATA.parent / t["source"]).is_file()
    for row in load("citations.jsonl"):
        assert row["chunk"] in (DATA.parent / row["source"]).read_text(), row


def test_the_checker_on_the_labelled_pairs(guide_retriever: Retriever) -> None:
    """Guards the chosen thresholds: what README reports for the labelled set."""
    result = run_checker(guide_retriever)
    precision, recall, _ = result["chosen"]
    assert result["pairs"] >= 70
    assert precision >= 0.8 and recall >= 0.95
    assert result["thresholds"]["lexical"] == citations.MIN_LEXICAL
    # without the number rule, precision drops: the rule earns its place
    assert result["without_number_rule"][0] < precision


def test_the_dont_know_threshold_separates_the_guide_from_off_topic(
    guide_retriever: Retriever,
) -> None:
    threshold = Settings.model_fields["min_relevance"].default
    result = run_relevance(guide_retriever, 5)
    row = next(r for r in result["sweep"] if abs(r["threshold"] - threshold) < 1e-9)
    assert row["on_answered"] == 1.0  # no question the guide answers gets "don't know"
    assert row["off_refused"] >= 0.95
    assert result["on_topic"]["min"] > threshold > result["off_general"]["max"]


@pytest.mark.slow
def test_the_answer_evaluation_runs_with_the_embedded_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two questions through the real pipeline: ingest, ChatService, SmolLM2, the checker."""
    assert main(["--limit", "2", "--data-dir", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["questions"] == 2 and result["model"].startswith("SmolLM2")
    assert result["retrieved_right_file"] == 1.0
    for key in ("right_fact", "right_citation", "fact_and_citation", "answers_citing"):
        assert 0.0 <= result[key] <= 1.0
    assert [r["id"] for r in result["rows"]] == ["port", "embed-dims"]
