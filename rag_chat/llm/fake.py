"""A scripted LLM for tests of the code above the protocol (like httpx.MockTransport).

Each ``stream()`` plays the next queued script, one delta per "token"; with nothing queued it
echoes the last user message. ``max_tokens`` cuts a script short with finish_reason "length".
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator

from rag_chat.errors import LLMError, LLMUnavailable
from rag_chat.llm.base import FinishReason, Generation, Message


class FakeLLM:
    model_name = "fake"
    context_window = 2048

    def __init__(
        self,
        script: list[str] | None = None,
        delay: float = 0.0,
        fail_after: int | None = None,
        *,
        unavailable: str | None = None,
    ) -> None:
        self.delay = delay
        self.fail_after = fail_after
        # a reason makes check() and every stream raise LLMUnavailable, for readiness tests
        self.unavailable = unavailable
        self.calls: list[list[Message]] = []
        self.generations: list[FakeGeneration] = []
        self._scripts: deque[list[str]] = deque()
        if script is not None:
            self.enqueue(script)

    def enqueue(self, deltas: list[str]) -> None:
        self._scripts.append(list(deltas))

    def count_tokens(self, text: str) -> int:
        return len(text) // 4 + 1

    def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float = 0.2,
        stop: list[str] | None = None,
    ) -> FakeGeneration:
        self.calls.append([dict(m) for m in messages])
        script = self._scripts.popleft() if self._scripts else _echo(messages)
        prompt_tokens = sum(self.count_tokens(m.get("content", "")) for m in messages)
        gen = FakeGeneration(self, script, max_tokens, prompt_tokens)
        self.generations.append(gen)
        return gen

    async def check(self) -> None:
        if self.unavailable:
            raise LLMUnavailable(self.unavailable)

    async def aclose(self) -> None:
        pass


def _echo(messages: list[Message]) -> list[str]:
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    # word-sized deltas, whitespace kept, so that joining them gives the reply back
    return re.findall(r"\S+\s*|\s+", f"You said: {last}")


class FakeGeneration(Generation):
    def __init__(self, llm: FakeLLM, script: list[str], max_tokens: int, prompt_tokens: int):
        super().__init__()
        self._llm = llm
        self._script = script
        self._max_tokens = max_tokens
        self.usage.prompt_tokens = prompt_tokens
        self._cancelled = False
        self._ended = False

    async def cancel(self) -> None:
        if self._ended:
            return
        self._cancelled = True
        if not self._iterated:
            self._end("cancelled")

    def _end(self, reason: FinishReason | None) -> None:
        self._ended = True
        self.finish_reason = reason
        self.usage.completion_tokens = self.produced

    async def _deltas(self) -> AsyncIterator[str]:
        llm = self._llm
        if self._ended:
            return
        try:
            if llm.unavailable:
                raise LLMUnavailable(llm.unavailable)
            reason: FinishReason = "stop"
            for i, delta in enumerate(self._script):
                if i and llm.delay > 0:
                    await asyncio.sleep(llm.delay)
                if self._cancelled:
                    break
                if llm.fail_after is not None and i >= llm.fail_after:
                    raise LLMError(f"fake LLM failure after {i} deltas")
                if i >= self._max_tokens:
                    reason = "length"
                    break
                self.produced += 1
                yield delta
            self._end("cancelled" if self._cancelled else reason)
        except LLMError:
            self._end(None)  # an error leaves finish_reason unset
            raise
        finally:
            if not self._ended:  # the consumer left early or its task was cancelled
                self._end("cancelled")
