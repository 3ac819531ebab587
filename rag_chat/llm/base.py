"""The LLM protocol: a streaming chat completion that can be cancelled in the backend.

Every backend returns a :class:`Generation` from ``stream()``; nothing runs until it is
iterated. Backends raise :class:`~rag_chat.errors.LLMError` subclasses from the iteration only,
so callers have one place to handle failures.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from rag_chat.settings import Settings

Message = dict[str, str]
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Generation(abc.ABC):
    """One streaming completion. `async for delta in gen` yields text deltas (str).

    After iteration ends: .finish_reason in {"stop", "length", "cancelled"} and .usage are set.
    `await gen.cancel()` stops generation IN THE BACKEND (not just the consumer), is idempotent,
    and makes the iteration end with finish_reason "cancelled". Errors raise
    rag_chat.errors.LLMError subclasses (LLMUnavailable when the backend cannot be reached,
    LLMTimeout on timeouts) from the iteration.
    .produced: int — completion tokens produced so far by the backend.

    A consumer that stops iterating early should ``await gen.cancel()``: leaving the loop alone
    stops the backend only once the abandoned iterator is garbage-collected.
    """

    def __init__(self) -> None:
        self.finish_reason: FinishReason | None = None
        self.usage = Usage()
        self.produced = 0
        self._iterated = False

    def __aiter__(self) -> AsyncIterator[str]:
        # one backend request per Generation: a second loop would silently see nothing
        if self._iterated:
            raise RuntimeError("a Generation can be iterated only once")
        self._iterated = True
        return self._deltas()

    @abc.abstractmethod
    def _deltas(self) -> AsyncIterator[str]: ...

    @abc.abstractmethod
    async def cancel(self) -> None: ...


class LLM(Protocol):
    # properties so that backends may compute them (a remote model id resolved lazily)
    @property
    def model_name(self) -> str: ...

    @property
    def context_window(self) -> int: ...

    def count_tokens(self, text: str) -> int: ...

    def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float = 0.2,
        stop: list[str] | None = None,
    ) -> Generation: ...

    async def check(self) -> None: ...

    async def aclose(self) -> None: ...


async def complete(
    llm: LLM,
    messages: list[Message],
    *,
    max_tokens: int,
    temperature: float = 0.2,
    stop: list[str] | None = None,
) -> tuple[str, FinishReason, Usage]:
    """Collect a whole stream: (text, finish_reason, usage)."""
    gen = llm.stream(messages, max_tokens=max_tokens, temperature=temperature, stop=stop)
    parts: list[str] = []
    try:
        async for delta in gen:
            parts.append(delta)
    finally:
        # an error or a cancelled caller must not leave the backend generating
        if gen.finish_reason is None:
            await gen.cancel()
    assert gen.finish_reason is not None
    return "".join(parts), gen.finish_reason, gen.usage


def build_llm(settings: Settings) -> LLM:
    """A remote OpenAI-compatible server when ``llm_base_url`` is set, else the local GGUF."""
    if settings.llm_base_url:
        from rag_chat.llm.openai_compat import OpenAICompatLLM

        return OpenAICompatLLM(
            settings.llm_base_url,
            api_key=settings.llm_api_key or "not-needed",
            model=settings.llm_model,
            read_timeout=settings.llm_read_timeout_seconds,
        )
    from rag_chat.llm.llama import LlamaCppLLM

    return LlamaCppLLM(settings.llm_model_path)
