"""`python -m rag_chat` refuses to start, in one line, when its setup is wrong."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli
from tests.e2e.test_server import free_port


def test_explicit_redis_that_does_not_answer_refuses_to_start(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    r = run_cli(
        ["-m", "rag_chat", "--port", str(free_port())], tmp_path, env={"RAG_REDIS_URL": url}
    )
    assert r.returncode == 1
    assert f"rag_chat: cannot start: Redis at {url} is not reachable" in r.stderr
    assert "start Redis or fix RAG_REDIS_URL" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_settings_are_reported(tmp_path: Path) -> None:
    r = run_cli(["-m", "rag_chat", "--port", "70000"], tmp_path)
    assert r.returncode == 2
    assert "rag_chat: bad setting port: Input should be less than or equal to 65535" in r.stderr


def test_a_data_dir_that_cannot_be_written_refuses_to_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = run_cli(["-m", "rag_chat", "--port", str(free_port())], blocker / "state")
    assert r.returncode == 1, r.stderr
    assert (
        f"rag_chat: cannot start: RAG_DATA_DIR {blocker / 'state'} cannot be written: "
        "Not a directory"
    ) in r.stderr.splitlines()
    assert "Traceback" not in r.stderr
