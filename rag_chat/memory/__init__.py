"""Conversation memory: Redis when available, an in-process fallback otherwise.

Use :func:`open_memory` at startup and the :class:`Memory` protocol everywhere else.
"""

from __future__ import annotations

from rag_chat.memory.base import Memory, StoredMessage, new_message, open_memory
from rag_chat.memory.local import LocalMemory
from rag_chat.memory.redis import RedisMemory

__all__ = [
    "LocalMemory",
    "Memory",
    "RedisMemory",
    "StoredMessage",
    "new_message",
    "open_memory",
]
