"""Chat LLM backends behind one small streaming protocol.

The backends live in their modules (``rag_chat.llm.llama``, ``rag_chat.llm.openai_compat``,
``rag_chat.llm.fake``) and are imported only when used, so importing this package loads
neither llama.cpp nor the OpenAI SDK.
"""

from __future__ import annotations

from rag_chat.llm.base import (
    LLM,
    FinishReason,
    Generation,
    Message,
    Usage,
    build_llm,
    complete,
)

__all__ = ["LLM", "FinishReason", "Generation", "Message", "Usage", "build_llm", "complete"]
