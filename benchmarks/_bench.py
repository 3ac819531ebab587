"""Shared parts of the benchmark scripts: child processes, Redis hygiene, indexes, figures.

Not a benchmark itself. Every process started through :func:`spawn` is stopped by the caller
(``Proc.stop``), and every Redis key a run wrote lives under its own prefix in DB 14, deleted
with :func:`delete_prefix` (SCAN + DEL of that prefix only; never a flush).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

from rag_chat.testing.procs import (
    Proc,
    delete_keys,
    free_port,
    offline_env,
)
from rag_chat.testing.procs import spawn as _spawn
from rag_chat.testing.procs import wait_ready as _wait_ready

ROOT = Path(__file__).resolve().parent.parent
# BENCH_OUT: somewhere else (the smoke tests write there, not over a real run's figures)
OUT = Path(os.environ.get("BENCH_OUT") or ROOT / "benchmarks" / "out")
# next to the checkout (../shared), or SCIFACT_DIR: a checkout elsewhere (a git worktree in
# /tmp, say) has no ../shared of its own
SCIFACT = Path(
    os.environ.get("SCIFACT_DIR") or ROOT.parent / "shared" / "datasets" / "scifact"
).resolve()
REDIS_DB = 14
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
START_TIMEOUT_S = 300.0
GOAL_CHUNKS = 10_000
# the token server's token i is "t{i} ": counting these in the text counts tokens, however the
# server grouped them into frames
TOKEN = re.compile(r"t\d+ ")

# questions about the bundled guide (data/), used when SciFact's queries are not there
GUIDE_QUESTIONS = [
    "How do I ingest PDF files?",
    "Which port does the server listen on by default?",
    "How do I resume a WebSocket conversation after a network failure?",
    "What happens to files that fail to load during ingestion?",
    "How do I point the server at a bigger model?",
    "How are answers cited?",
    "What does the Redis server store?",
    "How do I run several instances behind nginx?",
    "What are the rate limits per user?",
    "How is hybrid retrieval computed?",
]


def base_env() -> dict[str, str]:
    """The environment without any RAG_ setting of the caller's; models never from a hub."""
    return offline_env()


def spawn(name: str, args: list[str], env: dict[str, str], log_dir: Path, url: str) -> Proc:
    """``python ARGS`` in the repository root (rag_chat.testing.procs.spawn)."""
    return _spawn(name, [sys.executable, *args], env, log_dir, url)


def log_dir(script: str) -> Path:
    """benchmarks/out/logs/SCRIPT/, emptied: the child processes' logs of the last run, kept
    for a look after it (a failed start prints their tails anyway)."""
    path = OUT / "logs" / script
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.log"):
        old.unlink()
    return path


def wait_ready(procs: Sequence[Proc], path: str, timeout: float = START_TIMEOUT_S) -> None:
    """Until each answers 200 on ``path`` (raises, with the logs, if one dies or is late);
    for ``/readyz``, until each server's search process answers too."""
    deadline = time.monotonic() + timeout
    _wait_ready(procs, path, timeout)
    for proc in procs:
        if path == "/readyz":
            search_process_ready(proc, deadline)


def search_process_ready(proc: Proc, deadline: float) -> None:
    """A rag_chat server's search process answers (rag_search_process_ready 1), so that no
    measurement catches searches in the server's threads while it starts, nor its start-up
    CPU. RAG_SEARCH_PROCESS=false in this environment (the servers inherit it): not waited for."""
    if not search_process_answers(proc.url, deadline):
        raise RuntimeError(f"{proc.name}: the search process did not become ready\n{proc.tail()}")


def search_process_answers(url: str, deadline: float) -> bool:
    """Waits until the server at ``url`` reports its search process ready (or has none, or
    RAG_SEARCH_PROCESS=false here); False if ``deadline`` (monotonic) passes first."""
    if os.environ.get("RAG_SEARCH_PROCESS", "true").strip().lower() in ("0", "false", "no", "off"):
        return True
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=5, trust_env=False).text
        lines = [ln for ln in text.splitlines() if ln.startswith("rag_search_process_ready ")]
        if not lines or float(lines[0].split()[1]) == 1.0:
            return True
        time.sleep(0.3)
    return False


def start_token_server(log_dir: Path, tokens: int, rate: float) -> Proc:
    port = free_port()
    args = ["-m", "rag_chat.testing.token_server", "--port", str(port)]
    args += ["--tokens", str(tokens), "--rate", str(rate)]
    return spawn("token-server", args, base_env(), log_dir, f"http://127.0.0.1:{port}")


def new_prefix(script: str) -> str:
    return f"bench:{script}:{uuid.uuid4().hex[:12]}:"


def start_rag_chat(
    log_dir: Path,
    data_dir: Path,
    collection: str,
    llm_url: str,
    prefix: str,
    name: str = "rag_chat",
    **extra: str,
) -> Proc:
    """``python -m rag_chat`` on a free port, every per-user cap out of the way (all the
    benchmark's clients are one open-mode user per source address)."""
    port = free_port()
    env = {
        **base_env(),
        "RAG_DATA_DIR": str(data_dir),
        "RAG_COLLECTION": collection,
        "RAG_REDIS_URL": REDIS_URL,
        "RAG_REDIS_PREFIX": prefix,
        "RAG_LLM_BASE_URL": llm_url,
        "RAG_RATE_LIMIT_PER_MINUTE": "0",
        "RAG_MAX_REPLIES_PER_USER": "1000",  # the most the setting allows
        "RAG_MAX_CONNECTIONS_PER_USER": "100000",
        "RAG_GC_METRICS": "true",  # concurrency.py reports the server's GC pauses
        # passed through, to measure the server with its searches in threads, or with its
        # search process at another niceness
        **{k: v for k, v in os.environ.items() if k in ("RAG_SEARCH_PROCESS", "RAG_SEARCH_NICE")},
        **extra,
    }
    args = ["-m", "rag_chat", "--port", str(port), "--log-level", "warning"]
    return spawn(name, args, env, log_dir, f"http://127.0.0.1:{port}")


def delete_prefix(prefix: str) -> int:
    """SCAN + DEL of this run's keys in DB 14 (never a flush); how many were deleted."""
    assert prefix.startswith("bench:") and prefix.endswith(":"), prefix
    return delete_keys(REDIS_URL, prefix)


# --- indexes ---


def guide_index() -> Path:
    """data/ (the bundled guide) ingested into benchmarks/out/guide-index (incremental: a
    second call hashes the files and embeds nothing). For smoke runs only: a few dozen chunks."""
    from ingest.pipeline import Pipeline
    from rag_chat.settings import Settings

    data_dir = OUT / "guide-index"
    settings = Settings(data_dir=data_dir, _env_file=None)  # type: ignore[call-arg]
    report = Pipeline(settings, progress=False, display_root=ROOT).run([ROOT / "data"])
    assert report.ok, report.errors
    return data_dir


def index_chunks(data_dir: Path, collection: str) -> int | None:
    """Chunks in a collection, from its BM25 index's id list (no Chroma, no torch)."""
    ids = data_dir / "collections" / collection / "bm25" / "ids.json"
    try:
        return len(json.loads(ids.read_text()))
    except (OSError, ValueError):
        return None


def describe_index(data_dir: Path, collection: str, smoke: bool) -> str:
    n = index_chunks(data_dir, collection)
    line = f"index: {data_dir} (collection {collection!r}): {n if n is not None else '?'} chunks"
    if n is None:
        line += "  !! no BM25 index found: is this an ingested data dir? (--collection?)"
    elif n < GOAL_CHUNKS:
        kind = "SMOKE RUN" if smoke else "WARNING"
        line += f"  !! {kind}: fewer than {GOAL_CHUNKS:,} chunks, not the benchmark's index"
    return line


def queries(limit: int | None = None, *, scifact: bool = False) -> list[str]:
    """SciFact's queries (claims) when the dataset is there, else questions about the guide.

    ``scifact``: the questions are for a SciFact index, so SciFact's queries must be there:
    SystemExit naming the folder when they are not. (The guide's ten questions against a
    SciFact index measure something else: one of them finds nothing there, and its clients
    get a "don't know" without the LLM — a worktree in /tmp ran them, unnoticed, for several
    stops of A/B comparisons.)"""
    path = SCIFACT / "queries.jsonl"
    found: list[str] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                text = json.loads(line).get("text", "").strip()
                if text:
                    found.append(text)
    if not found and scifact:
        raise SystemExit(
            f"SciFact's queries are not at {path}: the questions for a SciFact index come "
            "from there (set SCIFACT_DIR to the dataset's folder)"
        )
    found = found or list(GUIDE_QUESTIONS)
    return found[:limit] if limit else found


# --- processes: CPU time, memory ---


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        data = fh.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def find_pid(comm: str) -> int | None:
    """The first process whose name is ``comm`` (e.g. the shared redis-server), read-only."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    return int(entry.name)
            except OSError:
                continue
    return None


def search_process_pid(server_pid: int) -> int | None:
    """The server's search process (rag_chat/retrieval/process.py): its child started by
    multiprocessing's spawn, not the resource tracker. None when it runs none."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError):
            continue
        if ppid == server_pid and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            return int(entry.name)
    return None


class CpuMeter:
    """CPU seconds taken by several processes over a stretch of wall time (a name may stand
    for several processes: their sum)."""

    def __init__(self, pids: dict[str, int | list[int | None] | None]) -> None:
        self.pids: dict[str, list[int]] = {}
        for name, pid in pids.items():
            found = [p for p in (pid if isinstance(pid, list) else [pid]) if p is not None]
            if found:
                self.pids[name] = found
        self.t0 = time.perf_counter()
        self.c0 = {k: self._read(p) for k, p in self.pids.items()}

    @staticmethod
    def _read(pids: list[int]) -> float:
        try:
            return sum(cpu_seconds(pid) for pid in pids)
        except OSError:
            return math.nan

    def stop(self) -> dict[str, dict[str, float]]:
        wall = time.perf_counter() - self.t0
        out = {}
        for name, pids in self.pids.items():
            used = self._read(pids) - self.c0[name]
            out[name] = {"cpu_s": round(used, 2), "cores": round(used / wall, 3) if wall else 0.0}
        out["_wall"] = {"cpu_s": round(wall, 2), "cores": 1.0}
        return out


def machine_load() -> dict[str, Any]:
    """The 1-minute load average and the busiest other processes (by CPU share since they
    started; ps): what else was running on the machine."""
    load1, load5, _ = os.getloadavg()
    others = []
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,comm,args", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        for line in out.splitlines()[:6]:
            pid, cpu, _comm, args = (line.split(None, 3) + [""] * 4)[:4]
            if int(pid) != os.getpid() and float(cpu) >= 5:
                others.append(f"{float(cpu):.0f}% {args[:80]}")
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return {"load1": round(load1, 2), "load5": round(load5, 2), "busiest": others}


def raise_open_files(wanted: int) -> tuple[int, int]:
    """Raise this process's (and its children's) soft open-file limit toward ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


# --- Prometheus text format (the server's /metrics) ---


def scrape(url: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of every sample in ``url``/metrics."""
    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            samples[key] = float(value)
        except ValueError:
            continue
    return samples


def histogram_quantile(
    before: dict[str, float], after: dict[str, float], name: str, q: float
) -> float | None:
    """The upper bucket bound holding quantile ``q`` of what ``name`` observed in between."""
    buckets = []
    for key, value in after.items():
        if key.startswith(name + "_bucket{"):
            le = re.search(r'le="([^"]+)"', key)
            if le:
                buckets.append((float(le.group(1)), value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    for le, count in buckets:
        if count >= q * total:
            return le
    return math.inf


def counter_delta(before: dict[str, float], after: dict[str, float], prefix: str) -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix))


# --- figures ---


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation; nan for no values."""
    if not values:
        return math.nan
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def dist(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": max(values) if values else math.nan,
        "mean": sum(values) / len(values) if values else math.nan,
    }


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if math.isinf(value):
        return "inf"
    return f"{value:,.{digits}f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def save_json(name: str, data: Any) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(data, indent=1, default=_jsonable, allow_nan=True))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


def plot_distributions(
    name: str,
    title: str,
    series: dict[str, Sequence[float]],
    xlabel: str,
    *,
    goal: float | None = None,
    log_x: bool = False,
) -> Path | None:
    """A histogram and an empirical CDF of each series, side by side, as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print(f"plot {name} skipped: matplotlib is not installed (pip install -e '.[dev]')")
        return None
    OUT.mkdir(parents=True, exist_ok=True)
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    present = {k: np.asarray(v, dtype=float) for k, v in series.items() if len(v)}
    finite = [v[np.isfinite(v)] for v in present.values()]
    values = np.concatenate(finite) if finite else np.zeros(0)
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        if log_x:
            lo = max(lo, 1e-3)
            bins: Any = np.geomspace(lo, max(hi, lo * 1.01), 60)
        else:
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
        for label, v in present.items():
            v = v[np.isfinite(v)]
            hist.hist(v, bins=bins, alpha=0.5, label=f"{label} (n={v.size})")
            xs = np.sort(v)
            cdf.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=label)
    for ax in (hist, cdf):
        ax.set_xlabel(xlabel)
        if log_x:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if goal is not None:
            ax.axvline(goal, color="red", linestyle="--", linewidth=1, label=f"goal {goal:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    hist.set_ylabel("count")
    cdf.set_ylabel("fraction ≤ x")
    for p in (0.5, 0.99):
        cdf.axhline(p, color="grey", linewidth=0.6)
    fig.suptitle(title)
    fig.tight_layout()
    path = OUT / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lines(
    name: str,
    title: str,
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    *,
    goals: Iterable[tuple[str, float]] = (),
    log_y: bool = False,
) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot {name} skipped: matplotlib is not installed (pip install -e '.[dev]')")
        return None
    OUT.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=label)
    for label, value in goals:
        ax.axhline(value, color="red", linestyle="--", linewidth=1, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path = OUT / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
