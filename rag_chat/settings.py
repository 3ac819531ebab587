"""Settings, read from the environment (prefix ``RAG_``) and an optional ``.env`` file.

Nothing reads settings at import time: callers use :func:`get_settings` (cached) or build a
:class:`Settings` explicitly, which is what the tests do.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATA_DIR = Path("data/.rag")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAG_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # local state: Chroma files, the keyword index, the ingest manifest
    data_dir: Path = DEFAULT_DATA_DIR
    collection: str = "docs"
    # a Chroma server (``chroma run``); unset means the embedded PersistentClient under data_dir
    chroma_url: str | None = None

    # embeddings: a sentence-transformers model path; unset means the packaged all-MiniLM-L6-v2
    embedding_model: str | None = None
    embedding_batch_size: int = Field(default=64, ge=1, le=4096)
    # how the model runs: torch (sentence-transformers), onnx (ONNX Runtime, same vectors) or
    # onnx-int8 (int8 weights: 2.5x torch's ingest speed, SciFact nDCG@10 within 0.005 of
    # fp32; see retrieval/embedder.py and benchmarks/embedder_speed.py)
    embedding_backend: Literal["torch", "onnx", "onnx-int8"] = "onnx-int8"
    # where the exported ONNX graphs are cached; unset means RAG_DATA_DIR/models
    embedding_cache_dir: Path | None = None
    # chunk size in tokens of the embedding model's tokenizer, special tokens and the
    # title/heading context included; never more than the model's window
    chunk_tokens: int = Field(default=256, ge=32, le=8192)
    chunk_overlap: int = Field(default=32, ge=0, le=1024)
    # hybrid retrieval (rag_chat/retrieval/search.py): the fusion of dense and BM25 candidates,
    # and dense pseudo-relevance feedback; defaults chosen on SciFact by the aggregate
    fusion: Literal["convex", "rrf"] = "convex"
    fusion_candidates: int = Field(default=100, ge=1, le=1000)
    fusion_dense_weight: float = Field(default=0.5, ge=0, le=1)
    prf_chunks: int = Field(default=0, ge=0, le=100)
    prf_weight: float = Field(default=1.0, ge=0, le=10)
    # BM25 indexes each chunk with the terms of this many neighbouring chunks of the same
    # document on each side (0: the chunk alone); an ingest rebuilds the index when it changes
    keyword_neighbours: int = Field(default=1, ge=0, le=10)
    # the chat's searches run in a process of their own (rag_chat/retrieval/process.py), out
    # of the event loop's GIL; false: in the server's worker threads
    search_process: bool = True
    # the search process's niceness above the server's (0: the same): when the CPU is short,
    # the event loop relaying the answers already streaming goes first and new questions'
    # searches wait (benchmarks/concurrency.py at 1,000 clients: TTFT and gap p99 both lower)
    search_nice: int = Field(default=5, ge=0, le=19)

    redis_url: str = "redis://127.0.0.1:6379/0"
    # conversation memory (rag_chat.memory): the newest memory_max_messages messages of a
    # conversation are kept; one idle for memory_ttl_seconds (refreshed on each append) expires.
    # At least 2 so that a question and its answer, appended together, always fit.
    memory_max_messages: int = Field(default=100, ge=2, le=10_000)
    memory_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=1, le=10 * 366 * 24 * 3600)
    # how many past turns the LLM sees; 0 means none
    history_turns: int = Field(default=6, ge=0, le=100)
    # every Redis key this server writes starts with it, so instances can share a Redis
    redis_prefix: str = Field(default="rag:", max_length=64)
    # rooms: a connection's presence outlives its instance by this much; a typing indicator
    # stops on its own after this; an AI reply nobody is listening to is cancelled after this
    presence_ttl_seconds: float = Field(default=30.0, ge=1, le=3600)
    typing_ttl_seconds: float = Field(default=6.0, ge=0.5, le=600)
    reply_grace_seconds: float = Field(default=15.0, ge=0, le=3600)

    llm_base_url: str | None = None
    llm_api_key: str | None = None
    llm_model: str | None = None
    llm_model_path: str | None = None
    # an OpenAI-compatible backend that sends nothing for this long fails the reply (llm_timeout)
    llm_read_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)

    top_k: int = Field(default=5, ge=1, le=100)
    # "don't know": when the best retrieved chunk's cosine similarity to the (rewritten) query
    # is under this, the answer says the documents do not cover it, without asking the LLM.
    # -1 turns it off. Chosen by `python -m rag_chat.eval_answers --relevance`: the middle of
    # the gap between general off-topic questions (at most 0.27) and the guide's (at least 0.30).
    min_relevance: float = Field(default=0.28, ge=-1.0, le=1.0)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    # --- auth: set RAG_JWT_SECRET (HS256) and/or RAG_JWT_PUBLIC_KEY (RS256: PEM text or a file
    # path). With neither, the server runs in open development mode: anyone may connect, and
    # it refuses to bind anything but a loopback address unless RAG_ALLOW_OPEN is true.
    jwt_secret: str | None = Field(default=None, min_length=32)  # RFC 7518 3.2
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    allow_open: bool = False
    # browsers' Origin for WebSocket upgrades and CORS: the page's own origin is always
    # allowed; list others (comma-separated or a JSON list), or "*" for any
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # --- abuse limits (per user, shared by every instance through Redis)
    rate_limit_per_minute: int = Field(default=30, ge=0, le=100_000)  # messages; 0: no limit
    max_connections_per_user: int = Field(default=20, ge=1, le=100_000)
    max_replies_per_user: int = Field(default=2, ge=1, le=1000)  # AI replies at the same time

    # --- documents added from the browser (POST /api/documents)
    upload_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1, le=1 << 34)  # per file
    upload_max_files: int = Field(default=20, ge=1, le=1000)  # per request

    # --- observability: logs as text or one JSON object per line (python -m rag_chat); every
    # WebSocket event received and sent, logged at DEBUG on rag_chat.ws.trace
    log_format: Literal["text", "json"] = "text"
    trace_ws: bool = False
    # garbage-collector pauses on /metrics (rag_gc_pause_seconds), from a gc callback: off by
    # default, because on Python 3.11 a callback that a collection starts while a parser is at
    # the recursion limit (a deeply nested JSON body) fails, and Python prints an ignored
    # exception; benchmarks/concurrency.py turns it on for its server
    gc_metrics: bool = False

    def collection_dir(self, collection: str | None = None) -> Path:
        """Where a collection's manifest and keyword index live."""
        return self.data_dir / "collections" / (collection or self.collection)

    @property
    def auth_required(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key)

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [o.strip().rstrip("/") for o in text.split(",") if o.strip()]
        return value

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, value: str) -> str:
        # Chroma's rule: 3-512 characters of [a-zA-Z0-9._-], starting and ending alphanumeric
        import re

        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]", value) or ".." in value:
            raise ValueError(
                "collection names are 3-512 characters of letters, digits, '.', '_' or '-', "
                "starting and ending with a letter or digit"
            )
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
