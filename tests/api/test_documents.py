"""Documents added over HTTP go through the real ingest pipeline (real model, real Chroma, BM25)
and are answerable right after; bad uploads get clear errors and leave nothing behind."""

from __future__ import annotations

import asyncio
import resource
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from filelock import FileLock

import rag_chat.api.documents as documents_api
import rag_chat.uploads as uploads_module
from ingest.pipeline import Pipeline
from rag_chat.auth import Authenticator
from rag_chat.llm.fake import FakeLLM
from rag_chat.settings import Settings
from rag_chat.uploads import FileState, Job, RedisJobStore, owner_dir, safe_name
from tests.memory import RedisServer

FACT = "The zebrafish telemetry relay listens on port 47123 and rotates its keys hourly."


def wait_job(client: TestClient, job_id: str, **kw: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = client.get(f"/api/documents/jobs/{job_id}", **kw)
        assert r.status_code == 200, r.text
        job: dict[str, Any] = r.json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError("upload job did not finish")


def test_uploaded_documents_are_ingested_and_answerable(
    make_app: Any, server_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = server_settings.model_copy(update={"data_dir": tmp_path / "state"})
    rebuilds: list[int] = []  # the keyword index: rebuilt once per job, not once per file
    real_rebuild = Pipeline.rebuild_keyword_index

    def counted(self: Pipeline, manifest: Any) -> None:
        rebuilds.append(len(manifest.all_chunk_ids()))
        real_rebuild(self, manifest)

    monkeypatch.setattr(Pipeline, "rebuild_keyword_index", counted)
    llm = FakeLLM()
    with TestClient(make_app(llm, settings)) as client:
        files = [
            ("files", ("relay notes.md", f"# Relay\n\n## Ports\n\n{FACT}\n", "text/markdown")),
            ("files", ("../../escape.txt", "Nothing to see: plain text.", "text/plain")),
        ]
        r = client.post("/api/documents", files=files)
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["files"] == ["relay notes.md", "escape.txt"]
        job = wait_job(client, body["job_id"])
        assert job["state"] == "done" and (job["done"], job["total"]) == (2, 2), job
        assert all(f["state"] == "done" and f["chunks"] >= 1 for f in job["files"]), job
        assert job["message"] == "2 files ingested"
        assert len(rebuilds) == 1 and rebuilds[0] >= 2, rebuilds  # after both files
        folder = settings.data_dir / "uploads" / owner_dir("local")
        assert sorted(p.name for p in folder.iterdir()) == ["escape.txt", "relay notes.md"]

        hits = client.post("/api/search", json={"query": "zebrafish relay port", "k": 3}).json()
        top = hits["results"][0]
        assert FACT in top["text"]
        assert top["source"] == f"uploads/{owner_dir('local')}/relay notes.md"

        llm.enqueue(["47123 [1]"])
        with client.stream("POST", "/api/chat", json={"message": "Which port does it use?"}) as s:
            text = "".join(s.iter_text())
        assert "relay notes.md" in text  # the answer's sources include the upload

        # the same file again: nothing new to embed, nothing to rebuild
        r = client.post("/api/documents", files=[files[0]])
        job = wait_job(client, r.json()["job_id"])
        assert job["state"] == "done" and len(rebuilds) == 1

        # the uploader's documents, with their chunks in the index
        listed = client.get("/api/documents").json()["documents"]
        assert [d["name"] for d in listed] == ["escape.txt", "relay notes.md"]
        assert all(d["chunks"] >= 1 and d["bytes"] > 0 and d["modified"] > 0 for d in listed)

        # removed: out of the folder, out of dense and keyword search, listed no more
        r = client.delete("/api/documents/relay notes.md")
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"])
        assert job["kind"] == "remove" and job["state"] == "done", job
        (removed,) = job["files"]
        assert (removed["name"], removed["state"], removed["chunks"]) == (
            "relay notes.md",
            "done",
            1,
        )
        assert job["message"] == "relay notes.md removed (1 chunk)"
        assert sorted(p.name for p in folder.iterdir()) == ["escape.txt"]
        for mode in ("dense", "bm25", "hybrid"):
            hits = client.post(
                "/api/search", json={"query": "zebrafish relay port", "k": 5, "mode": mode}
            ).json()["results"]
            assert not [h for h in hits if FACT in h["text"]], (mode, hits)
        assert [d["name"] for d in client.get("/api/documents").json()["documents"]] == [
            "escape.txt"
        ]
        for name in ("relay notes.md", "..", "../relay notes.md", "nothing.md"):
            r = client.delete(f"/api/documents/{name}")
            assert r.status_code == 404, (name, r.text)
            assert "\n" not in r.json()["error"]["message"]
        assert client.get("/healthz").status_code == 200


def test_bad_uploads_get_clear_errors_and_nothing_is_kept(
    make_app: Any, server_settings: Settings, tmp_path: Path
) -> None:
    settings = server_settings.model_copy(
        update={"data_dir": tmp_path / "state", "upload_max_bytes": 1000, "upload_max_files": 2}
    )
    with TestClient(make_app(FakeLLM(), settings)) as client:
        cases = [
            ([("files", ("tool.exe", b"MZ\x90\x00", "application/octet-stream"))], 415,
             "unsupported_type", ".exe files cannot be ingested"),
            ([("files", ("big.md", b"x" * 1001, "text/markdown"))], 413, "too_large",
             "the limit is 1,000 bytes"),
            ([("files", (f"f{i}.md", b"# x", "text/markdown")) for i in range(3)], 400,
             "bad_request", "at most 2 per upload"),
            ([("files", ("a.md", b"# a", "text/markdown")),
              ("files", ("a.md", b"# b", "text/markdown"))], 400, "bad_request", "twice"),
            ([("files", ("...", b"# a", "text/markdown"))], 400, "bad_request", "no usable"),
            ([("other", ("a.md", b"# a", "text/markdown"))], 422, "bad_request", "files"),
        ]  # fmt: skip
        for files, status, code, message in cases:
            r = client.post("/api/documents", files=files)
            assert r.status_code == status, (files[0][1][0], r.text)
            error = r.json()["error"]
            assert error["code"] == code and message in error["message"], error
            assert "\n" not in error["message"]
        # one bad file in a batch refuses the whole batch: nothing was written
        r = client.post(
            "/api/documents",
            files=[
                ("files", ("good.md", b"# fine", "text/markdown")),
                ("files", ("bad.bin", b"\x00", "application/octet-stream")),
            ],
        )
        assert r.status_code == 415
        assert not (settings.data_dir / "uploads").exists()
        assert client.get(f"/api/documents/jobs/{'0' * 32}").status_code == 404
        assert client.get("/api/documents/jobs/../../etc").status_code == 404
        assert client.get("/healthz").status_code == 200  # still serving


def test_upload_jobs_belong_to_their_uploader(
    make_app: Any, server_settings: Settings, tmp_path: Path
) -> None:
    settings = server_settings.model_copy(
        update={"data_dir": tmp_path / "state", "jwt_secret": "x" * 40}
    )
    auth = Authenticator(settings)
    alice = {"Authorization": f"Bearer {auth.mint('alice')}"}
    bob = {"Authorization": f"Bearer {auth.mint('bob')}"}
    with TestClient(make_app(FakeLLM(), settings)) as client:
        files = [("files", ("a.md", b"# Alice\n\nalice's notes", "text/markdown"))]
        assert client.post("/api/documents", files=files).status_code == 401
        r = client.post("/api/documents", files=files, headers=alice)
        job_id = r.json()["job_id"]
        assert client.get(f"/api/documents/jobs/{job_id}", headers=bob).status_code == 404
        assert wait_job(client, job_id, headers=alice)["state"] == "done"
        # each sees, and can remove, only their own documents
        assert client.get("/api/documents").status_code == 401
        assert client.delete("/api/documents/a.md").status_code == 401
        assert client.get("/api/documents", headers=bob).json() == {"documents": []}
        assert client.delete("/api/documents/a.md", headers=bob).status_code == 404
        listed = client.get("/api/documents", headers=alice).json()["documents"]
        assert [d["name"] for d in listed] == ["a.md"]


def test_safe_names() -> None:
    assert safe_name("../../etc/passwd.md") == "passwd.md"
    assert safe_name("C:\\Users\\me\\notes.txt") == "notes.txt"
    assert safe_name(".hidden.md") == "hidden.md"
    assert safe_name("a<b>|c.md") == "a_b_c.md"
    long = safe_name("x" * 300 + ".pdf")
    assert len(long) == 120 and long.endswith(".pdf")
    assert owner_dir("alice") != owner_dir("Alice") and owner_dir("../x").startswith("_x-")


def test_a_keyword_index_an_upload_left_stale_is_rebuilt_at_start(
    make_app: Any, server_settings: Settings, embedder: Any, tmp_path: Path
) -> None:
    """A job cut off after its files but before its keyword rebuild (a crash, a restart)
    leaves the manifest's mark; the next server start rebuilds the index by itself."""
    settings = server_settings.model_copy(update={"data_dir": tmp_path / "state"})
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "relay.md").write_text(f"# Relay\n\n{FACT}\n")
    report = Pipeline(settings, embedder=embedder, progress=False).run(
        [docs / "relay.md"], keyword=False
    )
    assert report.ok and report.chunks_added == 1
    assert Pipeline.keyword_index_marked_stale(settings)
    with TestClient(make_app(FakeLLM(), settings)) as client:
        deadline = time.monotonic() + 60
        while True:
            r = client.post("/api/search", json={"query": "zebrafish", "k": 3, "mode": "bm25"})
            assert r.status_code == 200, r.text
            if r.json()["results"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert FACT in r.json()["results"][0]["text"]
        assert not Pipeline.keyword_index_marked_stale(settings)


def test_a_removal_cut_off_after_deleting_its_file_is_finished_at_start(
    make_app: Any, server_settings: Settings, tmp_path: Path
) -> None:
    """A removal deletes its file, then prunes the index: a server stopped in between leaves
    chunks of a file that is gone. The next start prunes them before any new job."""
    settings = server_settings.model_copy(update={"data_dir": tmp_path / "state"})
    files = [
        ("files", ("relay.md", f"# Relay\n\n{FACT}\n", "text/markdown")),
        ("files", ("kept.md", "# Kept\n\nThe heron index stays.", "text/markdown")),
    ]

    def search(client: TestClient, query: str) -> list[str]:
        r = client.post("/api/search", json={"query": query, "k": 3, "mode": "bm25"})
        assert r.status_code == 200, r.text
        return [h["text"] for h in r.json()["results"]]

    with TestClient(make_app(FakeLLM(), settings)) as client:
        r = client.post("/api/documents", files=files)
        assert wait_job(client, r.json()["job_id"])["state"] == "done"
        assert any(FACT in t for t in search(client, "zebrafish relay"))
    (settings.data_dir / "uploads" / owner_dir("local") / "relay.md").unlink()
    with TestClient(make_app(FakeLLM(), settings)) as client:
        deadline = time.monotonic() + 60
        while any(FACT in t for t in search(client, "zebrafish relay")):
            assert time.monotonic() < deadline, "the removed file's chunks were not pruned"
            time.sleep(0.2)
        assert any("heron" in t for t in search(client, "heron index"))
        listed = client.get("/api/documents").json()["documents"]
        assert [(d["name"], d["chunks"]) for d in listed] == [("kept.md", 1)]


def test_a_job_whose_server_stopped_is_reported_failed_and_a_waiting_one_stays_alive(
    make_app: Any, server_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs live in Redis, their queue in the instance that took them: a job left queued or
    running by an instance that stopped reads as failed (the UI would wait forever), while a
    job of a live instance, however long it waits, does not."""
    monkeypatch.setattr(uploads_module, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(uploads_module, "ALIVE_TTL_S", 0.7)
    monkeypatch.setattr(uploads_module, "BUSY_RETRY_S", 0.1)
    settings = server_settings.model_copy(update={"data_dir": tmp_path / "state"})
    with TestClient(make_app(FakeLLM(), settings)) as client:
        # an instance that stopped mid-job: the job's record, no key renewed for it
        orphan = Job(
            "a" * 32, "local", [FileState("a.md", "done", chunks=3), FileState("b.md", "running")]
        )
        orphan.state = "running"

        async def put() -> None:
            store = RedisJobStore(settings.redis_url, settings.redis_prefix)
            await store.put(orphan)
            await store.aclose()

        asyncio.run(put())
        job = client.get(f"/api/documents/jobs/{orphan.job_id}").json()
        assert job["state"] == "failed", job
        assert job["message"] == "the server ingesting this upload stopped: 1 of 2 files ingested"
        assert (job["files"][0]["state"], job["files"][0]["chunks"]) == ("done", 3)
        assert job["files"][1]["state"] == "failed" and "stopped" in job["files"][1]["error"]

        # a live job waiting for the ingest lock (the CLI holds it) for several key lifetimes
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(settings.data_dir / "ingest.lock"))
        lock.acquire()
        try:
            r = client.post(
                "/api/documents", files=[("files", ("c.md", "# C\n\ncee", "text/plain"))]
            )
            job_id = r.json()["job_id"]
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                job = client.get(f"/api/documents/jobs/{job_id}").json()
                assert job["state"] == "running", job
                time.sleep(0.1)
        finally:
            lock.release()
        assert wait_job(client, job_id)["state"] == "done"


def test_an_upload_refused_while_redis_is_down_keeps_nothing_and_changes_nothing(
    make_app: Any, server_settings: Settings, tmp_path: Path
) -> None:
    """A job is registered in Redis before its files take their place: with Redis down the
    upload gets a one-line 503, no file is left behind and an earlier upload of the same name
    keeps its content; once Redis is back the same upload goes through."""
    redis = RedisServer(tmp_path)
    redis.start()
    settings = server_settings.model_copy(
        update={"data_dir": tmp_path / "state", "redis_url": redis.url}
    )
    folder = settings.data_dir / "uploads" / owner_dir("local")

    def notes(version: str) -> tuple[str, tuple[str, str, str]]:
        return ("files", ("notes.md", f"# Notes\n\nThe {version} of the notes.", "text/markdown"))

    try:
        with TestClient(make_app(FakeLLM(), settings)) as client:
            r = client.post("/api/documents", files=[notes("first version")])
            assert r.status_code == 202, r.text
            assert wait_job(client, r.json()["job_id"])["state"] == "done"

            redis.kill()
            extra = ("files", ("more.md", "# More\n\nAnother page.", "text/markdown"))
            r = client.post("/api/documents", files=[notes("second version"), extra])
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "memory_unavailable" and "Redis" in error["message"], error
            assert "\n" not in error["message"]
            assert sorted(p.name for p in folder.iterdir()) == ["notes.md"]  # no parts left
            assert "first version" in (folder / "notes.md").read_text()
            assert client.get("/healthz").status_code == 200

            redis.start()
            r = client.post("/api/documents", files=[notes("second version"), extra])
            assert r.status_code == 202, r.text
            assert wait_job(client, r.json()["job_id"])["state"] == "done"
            assert sorted(p.name for p in folder.iterdir()) == ["more.md", "notes.md"]
            assert "second version" in (folder / "notes.md").read_text()
    finally:
        redis.stop()


def test_an_upload_with_no_room_left_gets_a_clear_error_and_keeps_nothing(
    make_app: Any, server_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk (here: the process's file-size limit, RLIMIT_FSIZE, a real write failing with
    EFBIG) cannot hold an upload: a one-line 507, no part file left, an earlier upload of the
    same name untouched, and the server goes on serving and storing."""
    settings = server_settings.model_copy(update={"data_dir": tmp_path / "state"})
    folder = settings.data_dir / "uploads" / owner_dir("local")
    real_save = documents_api._save
    room = 1 << 20

    def cramped(upload: Any, tmp: Path, limit: int) -> None:
        # only while this file is written (the multipart parser's spool file is bigger)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, hard))
        try:
            real_save(upload, tmp, limit)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    def notes(text: str) -> tuple[str, tuple[str, bytes, str]]:
        return ("files", ("notes.md", f"# Notes\n\n{text}\n".encode(), "text/markdown"))

    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails, not the process
    try:
        with TestClient(make_app(FakeLLM(), settings)) as client:
            r = client.post("/api/documents", files=[notes("The first version.")])
            assert wait_job(client, r.json()["job_id"])["state"] == "done"

            monkeypatch.setattr(documents_api, "_save", cramped)
            big = "A long page of notes. " * (room // 10)  # over 2 MiB
            extra = ("files", ("small.md", b"# Small\n\nFits.", "text/markdown"))
            r = client.post("/api/documents", files=[extra, notes(big)])
            assert r.status_code == 507, r.text
            error = r.json()["error"]
            assert error["code"] == "insufficient_storage", error
            assert error["message"] == "no room to store 'notes.md': File too large", error
            assert sorted(p.name for p in folder.iterdir()) == ["notes.md"]  # no parts left
            assert "The first version." in (folder / "notes.md").read_text()
            assert client.get("/healthz").status_code == 200

            r = client.post("/api/documents", files=[extra, notes("The second version.")])
            assert r.status_code == 202, r.text  # room enough for these
            assert wait_job(client, r.json()["job_id"])["state"] == "done"
            assert sorted(p.name for p in folder.iterdir()) == ["notes.md", "small.md"]
            assert "The second version." in (folder / "notes.md").read_text()
    finally:
        signal.signal(signal.SIGXFSZ, old_handler)
