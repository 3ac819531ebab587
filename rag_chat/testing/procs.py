"""Child processes for the tests and the benchmarks: servers started on free loopback ports
with their output in a log file, waited for, stopped; and the Redis keys of a run deleted.

``tests/rooms/conftest.py`` (and the suites that import it) and ``benchmarks/_bench.py`` both
start ``python -m rag_chat`` instances and the synthetic token server this way. Used from a
checkout: processes start in the repository root, with it on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def offline_env(keep: Iterable[str] = ()) -> dict[str, str]:
    """This environment without the caller's RAG_ settings (but those in ``keep``), models
    never from a hub, and the checkout importable."""
    kept = set(keep)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_") or k in kept}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    return env


@dataclass
class Proc:
    """A child process with its log file; ``url`` is where it serves HTTP."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    url: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return f"--- {self.name} log ---\n" + self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return f"--- {self.name}: no log ---"

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (a crashed instance)."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after ``timeout`` seconds."""
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.popen.wait(timeout=30)


def spawn(name: str, cmd: list[str], env: dict[str, str], log_dir: Path, url: str) -> Proc:
    """Start ``cmd`` in the repository root, its output in ``log_dir/name.log``."""
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Proc(name, popen, log, url)


def wait_ready(procs: Sequence[Proc], path: str, timeout: float = 240.0) -> None:
    """Until each process answers 200 on ``path``. If one exits or ``timeout`` passes first,
    all of them are stopped and RuntimeError says which, with the logs' tails."""
    pending = list(procs)
    deadline = time.monotonic() + timeout
    try:
        while pending:
            for proc in list(pending):
                if not proc.alive():
                    raise RuntimeError(
                        f"{proc.name} exited with {proc.popen.returncode}\n{proc.tail()}"
                    )
                try:
                    if httpx.get(proc.url + path, timeout=5, trust_env=False).status_code == 200:
                        pending.remove(proc)
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError("not ready in time:\n" + "\n".join(p.tail() for p in pending))
            if pending:
                time.sleep(0.3)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise


def delete_keys(redis_url: str, prefix: str) -> int:
    """SCAN + DEL of the keys under ``prefix`` in that database (never a flush); how many."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        return len(keys)
    finally:
        client.close()
