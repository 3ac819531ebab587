from __future__ import annotations

import asyncio

import pytest

from rag_chat.errors import LLMError, LLMUnavailable
from rag_chat.llm import LLM, complete
from rag_chat.llm.fake import FakeLLM

HELLO = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hello there"}]


async def test_scripted_replies_play_in_order_then_echo() -> None:
    llm = FakeLLM(["Hel", "lo"])
    llm.enqueue(["Sec", "ond"])
    gen = llm.stream(HELLO, max_tokens=10)
    assert [d async for d in gen] == ["Hel", "lo"]
    assert gen.finish_reason == "stop"
    assert gen.usage.completion_tokens == 2
    assert gen.usage.prompt_tokens == llm.count_tokens("Be nice.") + llm.count_tokens("hello there")
    assert await complete(llm, HELLO, max_tokens=10) == (
        "Second",
        "stop",
        llm.generations[1].usage,
    )
    text, _, _ = await complete(llm, HELLO, max_tokens=10)
    assert text == "You said: hello there"
    assert llm.calls == [HELLO, HELLO, HELLO]
    assert (llm.model_name, llm.context_window, llm.count_tokens("abcdefgh")) == ("fake", 2048, 3)


async def test_max_tokens_cuts_with_length() -> None:
    llm = FakeLLM(["a", "b", "c"])
    assert await complete(llm, HELLO, max_tokens=2) == ("ab", "length", llm.generations[0].usage)


async def test_cancel_mid_stream_and_before() -> None:
    llm = FakeLLM(["a", "b", "c", "d"], delay=0.01)
    gen = llm.stream(HELLO, max_tokens=10)
    seen = []
    async for delta in gen:
        seen.append(delta)
        if len(seen) == 2:
            await gen.cancel()
    assert seen == ["a", "b"]
    assert gen.finish_reason == "cancelled"
    assert gen.produced == 2
    await gen.cancel()
    assert gen.finish_reason == "cancelled"

    early = llm.stream(HELLO, max_tokens=10)
    await early.cancel()
    assert early.finish_reason == "cancelled"
    assert [d async for d in early] == []


async def test_cancel_from_another_task() -> None:
    llm = FakeLLM(["a"] * 100, delay=0.01)
    gen = llm.stream(HELLO, max_tokens=100)
    collected: list[str] = []

    async def consume() -> None:
        async for delta in gen:
            collected.append(delta)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    await gen.cancel()
    await asyncio.wait_for(task, 1)
    assert gen.finish_reason == "cancelled"
    assert 0 < gen.produced < 100


async def test_fail_after_raises_llm_error() -> None:
    llm = FakeLLM(["a", "b", "c"], fail_after=2)
    gen = llm.stream(HELLO, max_tokens=10)
    seen = []
    with pytest.raises(LLMError, match="after 2"):
        async for delta in gen:
            seen.append(delta)
    assert seen == ["a", "b"]
    assert gen.finish_reason is None


async def test_unavailable() -> None:
    llm = FakeLLM(unavailable="the model is asleep")
    with pytest.raises(LLMUnavailable, match="asleep"):
        await llm.check()
    with pytest.raises(LLMUnavailable, match="asleep"):
        await complete(llm, HELLO, max_tokens=3)
    await FakeLLM().check()


async def test_a_generation_is_iterated_once() -> None:
    gen = FakeLLM().stream(HELLO, max_tokens=10)
    assert [d async for d in gen]
    with pytest.raises(RuntimeError, match="once"):
        async for _ in gen:
            pass


def test_fake_satisfies_the_protocol() -> None:
    llm: LLM = FakeLLM()
    assert llm.model_name == "fake"
