"""``python -m ingest`` as a user runs it: messages, exit status, and what landed."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock

from ingest.manifest import Manifest
from rag_chat.retrieval.store import ChunkTexts, VectorStore, make_client
from tests.builders import make_pdf
from tests.conftest import ROOT, ingest_install_guide, run_cli


def landed(data_dir: Path) -> set[str]:
    manifest = ChunkTexts(data_dir / "collections" / "docs" / "manifest.sqlite3")
    store = VectorStore(make_client(data_dir), "docs", "all-MiniLM-L6-v2", manifest)
    found = store.get(sorted(store.all_ids()))  # as searches read them: the manifest's
    return {Path(str(meta["source"])).name for _, meta in found.values()}


def consistent(data_dir: Path) -> bool:
    store = VectorStore(make_client(data_dir), "docs", "all-MiniLM-L6-v2")
    m = Manifest(data_dir / "collections" / "docs" / "manifest.sqlite3")
    try:
        return store.all_ids() == m.all_chunk_ids() and m.get_meta("dirty") is None
    finally:
        m.close()


def test_bad_inputs_are_reported_one_line_each_and_the_rest_lands(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.md").write_text("# Good\nThis file is fine.")
    make_pdf(docs / "good.pdf", ["A fine PDF page."])
    (docs / "empty.md").write_text("")
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02\x03garbage")
    (docs / "latin1.md").write_bytes("# Caf\xe9\n".encode("latin-1"))
    (docs / "corrupt.pdf").write_bytes(b"%PDF-1.7\n garbage")
    (docs / "corrupt.docx").write_bytes(b"not a zip at all")
    (docs / "photo.jpg").write_bytes(b"\xff\xd8\xff")  # unsupported type: ignored, not failed
    data = tmp_path / "state"

    r = run_cli(["-m", "ingest", str(docs), str(tmp_path / "missing"), "-q"], data)
    assert r.returncode == 1, r.stderr
    errors = sorted(line for line in r.stderr.splitlines() if line.startswith("ingest: "))
    expected = {
        "binary.txt": "binary file, not text (contains NUL bytes)",
        "corrupt.docx": "corrupt or unreadable .docx",
        "corrupt.pdf": "corrupt or unreadable PDF",
        "empty.md": "empty file",
        "latin1.md": "not valid UTF-8 (byte 0xe9 at offset 5)",
        "missing": "no such file or directory",
    }
    assert len(errors) == len(expected), r.stderr
    for line, (name, message) in zip(errors, sorted(expected.items()), strict=True):
        assert name in line and message in line, line
    assert "2 added" in r.stdout and "5 failed" in r.stdout and "1 ignored" in r.stdout
    assert landed(data) == {"good.md", "good.pdf"}
    assert consistent(data)


def test_path_that_is_not_a_file_or_folder(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.md"
    os.mkfifo(fifo)
    good = tmp_path / "ok.md"
    good.write_text("# OK\nfine")
    r = run_cli(["-m", "ingest", str(fifo), str(good), "-q"], tmp_path / "state")
    assert r.returncode == 1
    assert f"ingest: {fifo}: not a regular file or directory" in r.stderr
    assert landed(tmp_path / "state") == {"ok.md"}


def test_usage_errors(tmp_path: Path) -> None:
    r = run_cli(["-m", "ingest"], tmp_path / "state")
    assert r.returncode == 2 and "the following arguments are required: PATH" in r.stderr
    r = run_cli(["-m", "ingest", ".", "--collection", "x"], tmp_path / "state")
    assert r.returncode == 2 and "bad setting collection" in r.stderr
    r = run_cli(["-m", "ingest", "."], tmp_path / "state", env={"RAG_CHUNK_TOKENS": "512"})
    assert r.returncode == 2
    assert "RAG_CHUNK_TOKENS=512 exceeds the embedding model's window of 256 tokens" in r.stderr


def test_second_run_is_refused_while_one_holds_the_lock(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\nalpha")
    data = tmp_path / "state"
    data.mkdir()
    with FileLock(str(data / "ingest.lock")):
        r = run_cli(["-m", "ingest", str(docs)], data)
    assert r.returncode == 75
    assert "another ingest is running on" in r.stderr and "wait for it to finish" in r.stderr
    r = run_cli(["-m", "ingest", str(docs), "-q"], data)
    assert r.returncode == 0 and landed(data) == {"a.md"}


def test_killed_mid_run_leaves_a_consistent_index_and_the_next_run_finishes(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"doc{i:02}.md").write_text(
            f"# Document {i}\n" + "\n\n".join(f"Paragraph {j} of document {i}." for j in range(6))
        )
    data = tmp_path / "state"
    # small batches, and a pause after each write, so the kill lands between batches
    script = (
        "import sys, time, ingest.pipeline as p\n"
        "p.FLUSH_CHUNKS = 8\n"
        "orig = p._Writer._write\n"
        "def slow(self, *a):\n"
        "    orig(self, *a); print('batch', flush=True); time.sleep(0.3)\n"
        "p._Writer._write = slow\n"
        # the embedder is slow too: Ctrl-C lands while batches are still being embedded
        "import rag_chat.retrieval.embedder as e\n"
        "enc = e.Embedder.encode\n"
        "e.Embedder.encode = lambda self, *a, **k: (time.sleep(0.2), enc(self, *a, **k))[1]\n"
        "from ingest.__main__ import main\n"
        f"sys.exit(main([{str(docs)!r}, '-q']))\n"
    )
    env = {**os.environ, "RAG_DATA_DIR": str(data), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    for _ in range(3):
        assert proc.stdout.readline().strip() == "batch"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()

    m = Manifest(data / "collections" / "docs" / "manifest.sqlite3")
    partial = m.counts()[0]
    assert m.get_meta("dirty") == "1"
    m.close()
    assert 0 < partial < 40

    r = run_cli(["-m", "ingest", str(docs), "-q"], data)
    assert r.returncode == 0, r.stderr
    assert f"{partial} unchanged" in r.stdout  # committed files were not redone
    assert len(landed(data)) == 40
    assert consistent(data)
    # the keyword index was rebuilt over everything
    ids = json.loads((data / "collections" / "docs" / "bm25" / "ids.json").read_text())
    m = Manifest(data / "collections" / "docs" / "manifest.sqlite3")
    assert sorted(ids) == sorted(m.all_chunk_ids())
    m.close()


def test_ctrl_c_exits_130_and_the_next_run_finishes(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"d{i}.md").write_text(f"# D{i}\n" + f"text {i}. " * 50)
    data = tmp_path / "state"
    script = (
        "import sys, time, ingest.pipeline as p\n"
        "p.FLUSH_CHUNKS = 4\n"
        "orig = p._Writer._write\n"
        "def slow(self, *a):\n"
        "    orig(self, *a); print('batch', flush=True); time.sleep(0.3)\n"
        "p._Writer._write = slow\n"
        # the embedder is slow too: Ctrl-C lands while batches are still being embedded
        "import rag_chat.retrieval.embedder as e\n"
        "enc = e.Embedder.encode\n"
        "e.Embedder.encode = lambda self, *a, **k: (time.sleep(0.2), enc(self, *a, **k))[1]\n"
        "from ingest.__main__ import main\n"
        f"sys.exit(main([{str(docs)!r}, '-q']))\n"
    )
    env = {**os.environ, "RAG_DATA_DIR": str(data), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        # as from a terminal: a test run started in the background (nohup, `&` in a script)
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "batch"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted; the index is consistent" in err
    time.sleep(0.1)
    r = run_cli(["-m", "ingest", str(docs), "-q"], data)
    assert r.returncode == 0, r.stderr
    assert len(landed(data)) == 30 and consistent(data)


def test_dry_run_prints_the_plan(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\nalpha")
    data = tmp_path / "state"
    r = run_cli(["-m", "ingest", str(docs), "--dry-run"], data)
    assert r.returncode == 0
    assert "would add" in r.stdout and "a.md (1 doc(s), 1 chunks)" in r.stdout
    assert "1 to add" in r.stdout
    assert not (data / "chroma").exists()


def test_an_open_retriever_sees_what_another_process_ingests(tmp_path: Path) -> None:
    """``python -m ingest`` beside a running server: the server's retriever (here, open in this
    process) finds the new chunks by dense search as well as by keyword, and stops finding the
    ones a later run removed, without a restart."""
    from rag_chat.retrieval.search import Retriever
    from rag_chat.settings import Settings

    docs, data = ingest_install_guide(tmp_path)
    retriever = Retriever(Settings(data_dir=data, _env_file=None))  # type: ignore[call-arg]
    question = "Which animal guards the lighthouse at night?"
    assert [h.metadata["source"] for h in retriever.search(question, 5, "dense")] == [
        str(docs / "install.md")
    ]

    (docs / "owl.md").write_text("# The lighthouse owl\nAn owl guards the lighthouse at night.")
    time.sleep(0.01)  # a new modification time for the rebuilt keyword index
    assert run_cli(["-m", "ingest", str(docs), "-q"], data).returncode == 0
    for mode in ("dense", "hybrid", "bm25"):
        top = retriever.search(question, 5, mode)  # type: ignore[arg-type]
        assert top[0].metadata["source"] == str(docs / "owl.md"), mode

    (docs / "owl.md").unlink()
    assert run_cli(["-m", "ingest", str(docs), "-q"], data).returncode == 0
    for mode in ("dense", "hybrid"):
        sources = {h.metadata["source"] for h in retriever.search(question, 5, mode)}  # type: ignore[arg-type]
        assert sources == {str(docs / "install.md")}, mode


def test_the_writer_thread_opens_chroma_only_after_numpy_is_imported(tmp_path: Path) -> None:
    """The writer thread imports Chroma (and with it numpy) while the main thread parses and
    embeds. Two threads importing numpy at once can each find it half-initialised ("cannot
    import name ... from partially initialized module"): an ingest failed that way in CI. So
    the main thread loads the embedder (numpy, ONNX Runtime) before the writer starts opening
    the store. A fresh interpreter, as ``python -m ingest`` is."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Llamas\nLlamas carry packs in the Andes.")
    script = """
import sys
from ingest import pipeline
from ingest.__main__ import main

seen = []
real = pipeline._Writer.prepare
def prepare(self):
    seen.append(sorted(m for m in ("numpy", "onnxruntime") if m in sys.modules))
    real(self)
pipeline._Writer.prepare = prepare
code = main([sys.argv[1], "-q"])
print("imported before the writer's prepare:", seen)
sys.exit(code)
"""
    result = run_cli(["-c", script, str(docs)], tmp_path / "state")
    assert result.returncode == 0, result.stderr
    assert "imported before the writer's prepare: [['numpy', 'onnxruntime']]" in result.stdout


def test_a_full_disk_or_a_bad_data_dir_is_one_line_and_the_next_run_finishes(
    tmp_path: Path,
) -> None:
    """Storage that fails under the index — RAG_DATA_DIR under a file; a real file-size limit
    (RLIMIT_FSIZE, what a full disk looks like to a process: writes fail) hit while Chroma
    writes — is one line and exit 74, not a traceback; once there is room, the same command
    finishes and the index is consistent."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"doc{i:02}.md").write_text(  # ~4 chunks each: more than 300 kB in Chroma
            f"# Document {i}\n"
            + "\n\n".join(
                f"Paragraph {j} of document {i}: " + " ".join(f"word{k}x{j}" for k in range(40))
                for j in range(12)
            )
        )
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = run_cli(["-m", "ingest", str(docs), "-q"], blocker / "state")
    assert r.returncode == 74, r.stderr
    assert r.stderr.splitlines() == [
        f"ingest: could not write the index in {blocker / 'state'}: [Errno 20] Not a directory: "
        f"'{blocker / 'state'}' — the index is consistent: make room (or fix the folder) and run "
        "the same command again"
    ]

    # the model's ONNX export is cached outside RAG_DATA_DIR (RAG_EMBEDDING_CACHE_DIR): made
    # now if this session has not yet, so that the limit below meets the index's writes
    warm = run_cli(["-m", "ingest", str(docs / "doc00.md"), "-q"], tmp_path / "warm")
    assert warm.returncode == 0, warm.stderr
    data = tmp_path / "state"
    env = {**os.environ, "RAG_DATA_DIR": str(data), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}

    def cramped() -> None:  # in the child, before it runs Python: files stop at 300 kB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails (EFBIG), not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    r = subprocess.run(
        [sys.executable, "-m", "ingest", str(docs), "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=cramped,
    )
    assert r.returncode == 74, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.startswith("ingest: ")]
    assert len(lines) == 1 and lines[0].startswith(f"ingest: could not write the index in {data}:")
    assert "Traceback" not in r.stderr

    r = run_cli(["-m", "ingest", str(docs), "-q"], data)
    assert r.returncode == 0, r.stderr
    assert len(landed(data)) == 40
    assert consistent(data)


def test_the_first_run_prepares_the_model_without_noise(tmp_path: Path) -> None:
    """The one-time ONNX export and int8 quantisation print nothing: no "Loading weights" bar,
    no quantizer advice on the root logger — a user sees the summary and nothing else."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\nOne small document.")
    models = tmp_path / "models"
    env = {"RAG_EMBEDDING_CACHE_DIR": str(models)}
    r = run_cli(["-m", "ingest", str(docs)], tmp_path / "state", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.startswith("files: 1 added"), r.stdout
    assert sorted(p.suffix for p in models.iterdir()) == [".onnx", ".onnx"]  # fp32 and int8
