"""In-process conversation memory: the single-process fallback when there is no Redis.

Same contract as the Redis store (cap, expiry refreshed on append, JSON round trip), but the
conversations live in this process: they die with it and other instances cannot see them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rag_chat.memory.base import (
    StoredMessage,
    check_conversation_id,
    check_limit,
    decode_messages,
    encode_messages,
)

# how often append looks for expired conversations to free, so abandoned ones do not pile up
SWEEP_INTERVAL_S = 60.0


@dataclass(slots=True)
class _Conversation:
    messages: deque[str]  # JSON, exactly what the Redis store keeps
    expires_at: float  # on the clock below


class LocalMemory:
    kind: str = "memory"

    def __init__(
        self,
        max_messages: int = 100,
        ttl_seconds: float = 30 * 24 * 3600,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_messages < 1 or ttl_seconds <= 0:
            raise ValueError("max_messages must be >= 1 and ttl_seconds > 0")
        self.max_messages = max_messages
        self.ttl_seconds = ttl_seconds
        # monotonic so that a wall-clock jump neither expires nor revives conversations
        self._clock = clock
        self._conversations: dict[str, _Conversation] = {}
        self._next_sweep = clock() + SWEEP_INTERVAL_S
        # No method awaits, so each is already atomic on one event loop; the lock covers
        # callers on other threads (e.g. a sync endpoint in the threadpool). Never held
        # across an await.
        self._lock = threading.Lock()

    def _live(self, conversation_id: str, now: float) -> _Conversation | None:
        conversation = self._conversations.get(conversation_id)
        if conversation is not None and now >= conversation.expires_at:
            del self._conversations[conversation_id]
            return None
        return conversation

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_S
        expired = [cid for cid, c in self._conversations.items() if now >= c.expires_at]
        for cid in expired:
            del self._conversations[cid]

    async def append(self, conversation_id: str, *messages: StoredMessage) -> None:
        check_conversation_id(conversation_id)
        encoded = encode_messages(messages)  # before touching anything: all or nothing
        if not encoded:
            return
        with self._lock:
            now = self._clock()
            self._sweep(now)
            conversation = self._live(conversation_id, now)
            if conversation is None:
                conversation = _Conversation(deque(maxlen=self.max_messages), 0.0)
                self._conversations[conversation_id] = conversation
            conversation.messages.extend(encoded)  # maxlen drops the oldest
            conversation.expires_at = now + self.ttl_seconds

    async def replace(self, conversation_id: str, old_id: str, message: StoredMessage) -> bool:
        check_conversation_id(conversation_id)
        (encoded,) = encode_messages((message,))
        with self._lock:
            now = self._clock()
            conversation = self._live(conversation_id, now)
            if conversation is not None:
                messages = conversation.messages
                for i in range(len(messages) - 1, -1, -1):
                    stored = decode_messages((messages[i],), conversation_id)
                    if stored and stored[0].get("id") == old_id:
                        messages[i] = encoded
                        conversation.expires_at = now + self.ttl_seconds
                        return True
        await self.append(conversation_id, message)
        return False

    async def update(
        self,
        conversation_id: str,
        message_id: str,
        change: Callable[[StoredMessage], StoredMessage],
    ) -> StoredMessage | None:
        check_conversation_id(conversation_id)
        with self._lock:
            now = self._clock()
            conversation = self._live(conversation_id, now)
            if conversation is None:
                return None
            messages = conversation.messages
            for i in range(len(messages) - 1, -1, -1):
                stored = decode_messages((messages[i],), conversation_id)
                if stored and stored[0].get("id") == message_id:
                    changed = change(stored[0])
                    (encoded,) = encode_messages((changed,))
                    messages[i] = encoded
                    conversation.expires_at = now + self.ttl_seconds
                    return decode_messages((encoded,), conversation_id)[0]
        return None

    async def history(self, conversation_id: str, limit: int | None = None) -> list[StoredMessage]:
        check_conversation_id(conversation_id)
        check_limit(limit)
        with self._lock:
            conversation = self._live(conversation_id, self._clock())
            if conversation is None or limit == 0:
                return []
            raw = list(conversation.messages)
        if limit is not None:
            raw = raw[-limit:]
        return decode_messages(raw, f"conversation {conversation_id}")

    async def delete(self, conversation_id: str) -> bool:
        check_conversation_id(conversation_id)
        with self._lock:
            existed = self._live(conversation_id, self._clock()) is not None
            self._conversations.pop(conversation_id, None)
        return existed

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        # nothing to release; the conversations stay readable until the process ends
        return None

    def __repr__(self) -> str:
        return f"LocalMemory(max_messages={self.max_messages}, ttl_seconds={self.ttl_seconds})"
