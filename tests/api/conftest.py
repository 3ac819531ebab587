from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from rag_chat.app import create_app
from rag_chat.llm import LLM
from rag_chat.retrieval.embedder import Embedder
from rag_chat.services import Services
from rag_chat.settings import Settings
from tests.conftest import TEST_REDIS_DB


@pytest.fixture
def server_settings(guide_index: Path, redis_prefix: str) -> Settings:
    return Settings(  # type: ignore[call-arg]
        data_dir=guide_index,
        redis_url=f"redis://127.0.0.1:6379/{TEST_REDIS_DB}",
        redis_prefix=redis_prefix,
        # searches in the server's worker threads: a search process per test app would cost
        # seconds of imports each; tests/test_search_process.py and the e2e servers run it
        search_process=False,
        _env_file=None,
    )


AppFactory = Callable[..., object]


@pytest.fixture
def make_app(server_settings: Settings, embedder: Embedder) -> Callable[[LLM], object]:
    def make(llm: LLM, settings: Settings | None = None) -> object:
        async def factory(s: Settings) -> Services:
            return await Services.open(s, llm=llm, embedder=embedder)

        return create_app(settings or server_settings, services_factory=factory)

    return make
