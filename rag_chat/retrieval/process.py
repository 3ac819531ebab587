"""Hybrid search in a process of its own, beside the server's event loop.

::

    server process (event loop)                      search process (one thread)
    ChatService.retrieve ──► SearchProcess.search     Retriever: int8 encoder, embedded
        (id, query, k) ──── pipe ──────────────────►     Chroma, BM25 — its own copies
        future resolved ◄── pipe (loop.add_reader) ◄── (id, hits) or (id, error)

In the server's own worker threads a search needs the GIL between its native steps (ONNX
Runtime, Chroma, numpy), and under load the event loop relaying hundreds of answers holds it:
at 250 streaming clients a 7 ms search took 58 ms p50 inside the server. In a process of its
own it waits for nobody's GIL. It sees every ingest the way the server's retriever does: the
keyword index's stamp, checked on each search, reloads BM25 and reopens Chroma.

Until the process is ready, and whenever it is gone (it died, or never started), searches
run in the server's worker threads as before, and the process is started again. So do the
searches beyond ``MAX_PENDING`` owed at once: when questions come faster than the process
answers them, the server's threads take the overflow (at 1,000 streaming clients on a slow
day they answered about a tenth of the searches, and time to first token p99 was 9-12 s
against 16-32 s with a queue for the process alone; benchmarks/README.md). A process that
owes searches and has answered nothing for ``STUCK_S`` seconds hangs: it is killed and
replaced, as if it had died, and what it owed is searched in the server's threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from rag_chat.retrieval.store import Hit

if TYPE_CHECKING:
    from rag_chat.settings import Settings

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # imports and loading the index: seconds on a cold disk
RESTART_AFTER_S = 5.0  # a process that died is started again after this long
STOP_TIMEOUT_S = 5.0
MAX_PENDING = 256  # searches owed by the process at once; more go to the server's threads
# searches owed and no reply for this long: the process hangs and is replaced (well above a
# search that reloads a large index after an ingest)
STUCK_S = 30.0
MAX_BATCH = 32  # queued searches the process answers together

_HitTuple = tuple[str, float, str, dict[str, Any], float | None]


def _serve(settings: Settings, conn: Connection) -> None:
    """The search process: build a retriever, say ready, answer requests until None (or
    until the server's end of the pipe closes: a server stopped while this one started)."""
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the server stops this process
    # itself (None, or its end of the pipe closing), with no traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if settings.search_nice:
        # second to the server's event loop when the CPU is short (see Settings.search_nice)
        with contextlib.suppress(AttributeError, OSError):  # no os.nice (Windows)
            os.nice(settings.search_nice)
    from rag_chat.retrieval.embedder import Embedder
    from rag_chat.retrieval.search import Retriever

    try:
        # one ONNX thread: a query's encoding on two took 40% more CPU for 10% less time,
        # and CPU is what a busy server's questions run short of
        retriever = Retriever(settings, embedder=Embedder.from_settings(settings, threads=1))
        retriever.embedder.encode(["warm up"])
        retriever.keyword_index()
    except Exception as exc:  # reported to the server, which keeps searching in-process
        with contextlib.suppress(OSError):
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    from rag_chat.metrics import tune_gc

    tune_gc()  # its full collections would pause every search in the queue
    try:
        conn.send(("ready", None))
    except OSError:  # the server is gone already
        return
    while True:
        try:
            request = conn.recv()
            # what queued while the last batch ran is answered together: one Chroma call
            # per step for all of them (hybrid_many), about a third less CPU per search
            batch = [request]
            while request is not None and len(batch) < MAX_BATCH and conn.poll():
                request = conn.recv()
                batch.append(request)
        except (EOFError, OSError):  # the server is gone
            return
        stop = batch[-1] is None
        requests = [r for r in batch if r is not None]
        try:
            for reply in _answer(retriever, requests):
                conn.send(reply)
        except (BrokenPipeError, OSError):
            return
        if stop:
            return


def _answer(retriever: Any, requests: list[tuple[int, str, int]]) -> list[tuple[int, bool, Any]]:
    """Replies to these requests, in order: (id, True, hit tuples) or (id, False, error)."""

    def hits(found: list[Hit]) -> list[_HitTuple]:
        return [(h.id, h.score, h.text, h.metadata, h.relevance) for h in found]

    try:
        many = retriever.hybrid_many([(query, k) for _, query, k in requests])
        return [(rid, True, hits(found)) for (rid, _, _), found in zip(requests, many, strict=True)]
    except Exception as exc:
        if len(requests) == 1:
            return [(requests[0][0], False, f"{type(exc).__name__}: {exc}")]
        # one of them failed the batch: each alone, so that it alone gets the error
        return [reply for r in requests for reply in _answer(retriever, [r])]


class SearchError(Exception):
    """The search process failed this search (the message says why)."""


class SearchProcess:
    """The client side, on the event loop: ``search`` sends a request down the pipe and
    awaits its reply, which a reader callback on the pipe resolves. ``ready`` is False
    while the process starts or after it died: callers search in-process meanwhile."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[list[Hit]]] = {}
        self._conn: Connection | None = None
        self._proc: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Task[None] | None = None
        self._closed = False
        self._failed = False  # the last start failed, and none is coming
        self._last_reply = time.monotonic()  # when the process last answered (or started)
        self.ready = False
        self.starts = 0  # processes started (1 unless one died)

    def start(self) -> None:
        """Start the process in the background (returns at once)."""
        self._loop = asyncio.get_running_loop()
        self._failed = False
        if self._starting is None or self._starting.done():
            self._starting = self._loop.create_task(self._start())

    async def wait_ready(self, timeout: float = START_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready and not self._failed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.ready

    async def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no copy of the server's threads and loop
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_serve, args=(self.settings, child), name="rag_chat-search", daemon=True
        )
        self.starts += 1
        await asyncio.to_thread(proc.start)
        child.close()
        try:
            got = await asyncio.to_thread(_recv_within, parent, START_TIMEOUT_S)
        except asyncio.CancelledError:  # closed while it started: stop it, no waiting
            proc.terminate()
            parent.close()
            raise
        except Exception as exc:
            got = ("failed", f"no word from it: {type(exc).__name__}")
        if self._closed or got[0] != "ready":
            if not self._closed:
                log.warning("search process did not start (%s); searching in-process", got[1])
            self._failed = True
            parent.close()
            await asyncio.to_thread(_stop, proc)
            return
        self._conn, self._proc = parent, proc
        assert self._loop is not None
        self._loop.add_reader(parent.fileno(), self._readable)
        self._last_reply = time.monotonic()
        self.ready = True
        log.info("search process ready (pid %s)", proc.pid)

    async def search(self, query: str, k: int) -> list[Hit]:
        if not self.ready or self._conn is None or self._loop is None:
            raise SearchError("the search process is not running")
        if len(self._pending) >= MAX_PENDING:  # never let a busy process fill the pipe
            raise SearchError("the search process is behind")
        rid = next(self._ids)
        fut: asyncio.Future[list[Hit]] = self._loop.create_future()
        self._pending[rid] = fut
        try:
            self._conn.send((rid, query, k))  # a few hundred bytes: the pipe takes them at once
        except OSError as exc:
            self._pending.pop(rid, None)
            self._lost(f"sending failed: {exc}")
            raise SearchError("the search process is gone") from exc
        try:
            while True:
                done, _ = await asyncio.wait((fut,), timeout=STUCK_S)
                if done:
                    return fut.result()
                self._check_stuck()  # fails fut when the process is silent
        finally:
            self._pending.pop(rid, None)

    def _check_stuck(self) -> None:
        """Searches owed and no reply for ``STUCK_S``: the process hangs. It is replaced;
        what it owed fails over to the server's threads."""
        if self.ready and time.monotonic() - self._last_reply >= STUCK_S:
            self._lost(f"no reply for {STUCK_S:g} s", hung=True)

    def _readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll():
                rid, ok, payload = conn.recv()
                self._last_reply = time.monotonic()
                fut = self._pending.get(rid)
                if fut is None or fut.done():
                    continue
                if ok:
                    fut.set_result([Hit(*t) for t in payload])
                else:
                    fut.set_exception(SearchError(payload))
        except (EOFError, OSError) as exc:
            self._lost(f"{type(exc).__name__}")

    def _lost(self, why: str, hung: bool = False) -> None:
        """The process died (or ``hung``: it is killed): fail what it owed, search
        in-process, start another soon."""
        if not self.ready:
            return
        self.ready = False
        log.error("search process lost (%s); searching in-process until it is back", why)
        if self._conn is not None and self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
            self._conn.close()
        self._conn = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(SearchError(f"the search process is gone ({why})"))
        self._pending.clear()
        proc, self._proc = self._proc, None
        if hung and proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
        if self._loop is not None and not self._closed:
            if proc is not None:
                self._loop.create_task(asyncio.to_thread(_stop, proc))
            self._loop.call_later(RESTART_AFTER_S, self._restart)

    def _restart(self) -> None:
        if not self._closed and not self.ready:
            self.start()

    async def aclose(self) -> None:
        self._closed = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        self.ready = False
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._loop is not None:
                self._loop.remove_reader(conn.fileno())
            with contextlib.suppress(OSError):
                conn.send(None)
            conn.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(SearchError("the server is stopping"))
        if self._proc is not None:
            await asyncio.to_thread(_stop, self._proc)
            self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


def _recv_within(conn: Connection, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError
    return conn.recv()


def _stop(proc: Any) -> None:
    proc.join(STOP_TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        proc.join(STOP_TIMEOUT_S)
