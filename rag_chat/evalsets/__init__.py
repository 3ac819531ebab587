"""Question sets over the bundled user guide (``data/guide``), written from its text, and the
helpers the evaluations share: load a set, ingest the guide through the real pipeline.

- ``followups.jsonl``: (first question, follow-up, the follow-up asked standalone) with the
  file and section the follow-up needs (``python -m rag_chat.eval_followups``).
- ``answers.jsonl``: questions with the facts each answer must contain and the files that hold
  them (``python -m rag_chat.eval_answers``).
- ``citations.jsonl``: (sentence, source chunk, supports?) pairs, labelled by hand, for the
  citation checker (``python -m rag_chat.eval_answers --checker``).
- ``offtopic.jsonl``: questions the guide does not answer, for the "don't know" threshold
  (``python -m rag_chat.eval_answers --relevance``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rag_chat.retrieval.embedder import Embedder
    from rag_chat.retrieval.search import Retriever
    from rag_chat.retrieval.store import Hit
    from rag_chat.settings import Settings

HERE = Path(__file__).resolve().parent
# the repository's data/ folder (what `make run` ingests)
DATA = HERE.parent.parent / "data"
COLLECTION = "guide-eval"


def load(name: str, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    with (HERE / name).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    return rows[:limit] if limit else rows


def same_file(source: object, wanted: str) -> bool:
    """A chunk's ``source`` (relative or absolute, whatever the ingest's cwd) is ``wanted``
    (``data/guide/NAME``): the guide's file names are unique."""
    return isinstance(source, str) and Path(source).name == Path(wanted).name


def relevant(hit: Hit, targets: list[dict[str, str]]) -> bool:
    """The hit is in one of the target files, and in the target section when one is named
    (a case-insensitive part of the chunk's heading path)."""
    meta = hit.metadata
    heading = str(meta.get("heading") or "").lower()
    return any(
        same_file(meta.get("source"), t["source"])
        and (not t.get("section") or t["section"].lower() in heading)
        for t in targets
    )


@contextmanager
def guide_settings(data_dir: Path | None) -> Iterator[Settings]:
    """Settings for the evaluation's own collection, in ``data_dir`` or a temporary folder."""
    from rag_chat.settings import Settings

    if data_dir is not None:
        yield Settings(data_dir=data_dir, collection=COLLECTION)
        return
    with tempfile.TemporaryDirectory(prefix="rag-eval-") as tmp:
        yield Settings(data_dir=Path(tmp), collection=COLLECTION)


def ingest_guide(
    settings: Settings, embedder: Embedder | None = None, docs: Path = DATA
) -> Retriever:
    """Ingest ``docs`` (the bundled guide) through the real pipeline; a second run on the same
    data dir embeds nothing. Returns a hybrid retriever over it."""
    from rag_chat.eval import ingest_for_eval

    return ingest_for_eval(settings, [docs], embedder)
