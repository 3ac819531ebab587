"""The load benchmark's harness runs end to end (small, on the bundled guide): what the
README's benchmark commands do, with real processes — a token server, rag_chat servers, their
search processes, Redis. Figures are not checked (speed goals live in the scripts); that every
answer arrives whole is: with two instances, through fan-out across them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "concurrency.py"


def _run(args: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    env["BENCH_OUT"] = str(out)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_load_benchmark_runs_with_two_instances_and_measures_idle_memory(
    tmp_path: Path,
) -> None:
    r = _run(
        ["--sweep", "8", "--instances", "2", "--tokens", "20", "--ramp", "1", "--duration", "2"],
        tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (level,) = json.loads((tmp_path / "concurrency.json").read_text())["levels"]
    assert level["clients"] == 8 and level["instances"] == 2
    assert level["errors"] == {} and level["answers"] >= 8
    assert level["every_token_delivered"], level["tokens_missing"]
    # both servers' and both search processes' CPU were read
    assert level["cpu"]["rag_chat"]["cpu_s"] > 0 and level["cpu"]["search process"]["cpu_s"] > 0

    r = _run(["--idle", "20", "--settle", "1"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    idle = json.loads((tmp_path / "concurrency_idle.json").read_text())["idle"]
    assert idle, "no idle figures"


def test_the_load_benchmark_refuses_options_it_cannot_honour(tmp_path: Path) -> None:
    for args, says in (
        (["--idle", "20", "--instances", "2"], "--idle measures one server's memory"),
        (["--sweep", "10,x"], "--sweep takes client counts"),
        (["--clients", "0"], "client counts must be at least 1"),
    ):
        r = _run(args, tmp_path)
        assert r.returncode == 2, (args, r.stdout[-2000:], r.stderr[-2000:])
        assert says in r.stderr.splitlines()[-1], r.stderr
        assert not list(tmp_path.iterdir()), "it ran something"
