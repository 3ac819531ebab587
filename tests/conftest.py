from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ingest.pipeline import Pipeline
from rag_chat.retrieval.embedder import Embedder
from rag_chat.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SCIFACT = (ROOT.parent / "shared" / "datasets" / "scifact").resolve()
TEST_REDIS_DB = 13  # Redis DB index used by tests; keys carry a per-test prefix


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One cache of exported ONNX graphs for the whole session, servers it starts included:
    each test's own RAG_DATA_DIR would export the model again."""
    old = os.environ.get("RAG_EMBEDDING_CACHE_DIR")
    os.environ["RAG_EMBEDDING_CACHE_DIR"] = str(tmp_path_factory.mktemp("models"))
    yield
    if old is None:
        os.environ.pop("RAG_EMBEDDING_CACHE_DIR", None)
    else:
        os.environ["RAG_EMBEDDING_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def embedder(_model_cache: None) -> Embedder:
    """The real packaged all-MiniLM-L6-v2 on the default backend (what a user runs), loaded
    once per test session."""
    return Embedder.from_settings(Settings(_env_file=None))  # type: ignore[call-arg]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "state", _env_file=None)  # type: ignore[call-arg]


@pytest.fixture
def docs_dir(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Nothing may reach a model hub: make any attempt fail loudly instead of hanging.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(scope="session", autouse=True)
def _dont_know_off() -> Iterator[None]:
    """Protocol tests script a FakeLLM's reply to content-free messages ("hi", "x"): the
    "don't know" gate (RAG_MIN_RELEVANCE) would answer those without the LLM. It is off for
    the whole session, servers started by session fixtures included, unless a test sets
    min_relevance itself (tests/test_citations.py, tests/test_eval_answers.py do)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAG_MIN_RELEVANCE", "-1")
        yield


def run_cli(
    args: list[str], data_dir: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a real ``python -m`` command the way a user does."""
    full_env = {
        **os.environ,
        "RAG_DATA_DIR": str(data_dir),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def ingest_install_guide(tmp_path: Path) -> tuple[Path, Path]:
    """A folder with one small document, ingested with the real ``python -m ingest`` into a
    data dir of its own: (the folder, the data dir). Tests then change the folder and ingest
    again, as a user would beside a running server."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "install.md").write_text("# Installing\nRun make run to install everything.")
    data = tmp_path / "state"
    result = run_cli(["-m", "ingest", str(docs), "-q"], data)
    assert result.returncode == 0, result.stderr
    return docs, data


@pytest.fixture(scope="session")
def guide_index(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Path:
    """The bundled user guide (data/), ingested once per session into a temp data dir."""
    data_dir = tmp_path_factory.mktemp("guide-index")
    pipeline = Pipeline(Settings(data_dir=data_dir, _env_file=None), progress=False)  # type: ignore[call-arg]
    pipeline.embedder = embedder
    report = pipeline.run([ROOT / "data"])
    assert report.ok and report.chunks_added > 20, report
    return data_dir


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in Redis DB 13; only its keys are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(f"redis://127.0.0.1:6379/{TEST_REDIS_DB}")
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()
