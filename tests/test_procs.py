"""The child-process helpers the process tests and the benchmarks share
(``rag_chat.testing.procs``): a process that dies or never answers fails the wait with its
log, and nothing is left running."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rag_chat.testing.procs import free_port, offline_env, spawn, wait_ready


def url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_a_process_that_exits_fails_the_wait_with_its_log(tmp_path: Path) -> None:
    code = "print('loading the index'); raise SystemExit(3)"
    proc = spawn("dies", [sys.executable, "-c", code], offline_env(), tmp_path, url())
    with pytest.raises(RuntimeError, match=r"dies exited with 3[\s\S]*loading the index"):
        wait_ready([proc], "/healthz", timeout=30)


def test_one_late_process_stops_them_all(tmp_path: Path) -> None:
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = [spawn(f"p{i}", sleep, offline_env(), tmp_path, url()) for i in range(2)]
    with pytest.raises(RuntimeError, match="not ready in time"):
        wait_ready(procs, "/healthz", timeout=1)
    assert not any(p.alive() for p in procs)


def test_a_server_that_answers_is_ready_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    server = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    proc = spawn("http", server, offline_env(), tmp_path, f"http://127.0.0.1:{port}")
    try:
        wait_ready([proc], "/", timeout=30)
        assert proc.alive()
    finally:
        proc.stop()
    assert not proc.alive()


def test_the_environment_drops_rag_settings_but_those_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAG_DATA_DIR", "/somewhere")
    monkeypatch.setenv("RAG_MIN_RELEVANCE", "0")
    env = offline_env(keep=["RAG_MIN_RELEVANCE"])
    assert "RAG_DATA_DIR" not in env and env["RAG_MIN_RELEVANCE"] == "0"
    assert env["HF_HUB_OFFLINE"] == "1"
