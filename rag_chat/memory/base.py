"""Conversation memory: the message type, the :class:`Memory` protocol and :func:`open_memory`.

A conversation is an append-only list of :class:`StoredMessage`, oldest first, capped to the
newest ``memory_max_messages`` and expiring ``memory_ttl_seconds`` after its last append. Both
implementations store each message as one JSON object, so they behave the same: what comes
back from :meth:`Memory.history` is a fresh copy, equal to what went in after a JSON round trip.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, runtime_checkable

from rag_chat.errors import BadRequest, MemoryUnavailable

if TYPE_CHECKING:
    from rag_chat.settings import Settings

logger = logging.getLogger("rag_chat.memory")

_CONVERSATION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
BAD_CONVERSATION_ID = (
    "conversation_id must be 1-128 characters of letters, digits, '_', '-', '.', ':'"
)


class StoredMessage(TypedDict, total=False):
    id: str  # server-assigned (uuid4 hex) when the caller gives none
    role: str  # "user" | "assistant"
    content: str
    created_at: float  # unix seconds; set on append when the caller gives none
    sources: list[dict[str, Any]]  # assistant turns: the cited chunks
    query: str  # the (possibly rewritten) retrieval query
    finish_reason: str
    citations: list[int]  # assistant turns: the sources its sentences cite and that back them
    unsupported: list[int]  # ... cited, but backing none of the sentences that cite them
    no_match: bool  # assistant turns: nothing relevant was found, the answer says so
    user: str  # rooms: who wrote it
    reply_to: str  # assistant turns in rooms: the id of the message it answers
    feedback: dict[str, Any]  # assistant turns: rater -> {rating, comment?, at}
    edited_at: float  # user turns edited by their author: when


@runtime_checkable
class Memory(Protocol):
    kind: str  # "redis" or "memory", shown by /readyz

    async def append(self, conversation_id: str, *messages: StoredMessage) -> None:
        """Append atomically (the batch lands together or not at all), keep the newest
        ``max_messages`` and restart the conversation's expiry."""
        ...

    async def replace(self, conversation_id: str, old_id: str, message: StoredMessage) -> bool:
        """Put ``message`` where the message ``old_id`` is, atomically (a regenerated answer
        takes its predecessor's place); appended like :meth:`append` when that one is gone.
        True when it was found and replaced. The conversation's expiry restarts."""
        ...

    async def update(
        self,
        conversation_id: str,
        message_id: str,
        change: Callable[[StoredMessage], StoredMessage],
    ) -> StoredMessage | None:
        """Replace the message ``message_id`` with ``change(message)`` where it is, as one
        compare-and-set (a message changed meanwhile by someone else is read and changed
        again); the stored result, or None when there is no such message. ``change`` may
        raise to refuse (nothing is written). The conversation's expiry restarts."""
        ...

    async def history(self, conversation_id: str, limit: int | None = None) -> list[StoredMessage]:
        """Oldest first; ``limit`` keeps the last N. An unknown conversation is ``[]``."""
        ...

    async def delete(self, conversation_id: str) -> bool:
        """True if the conversation existed."""
        ...

    async def ping(self) -> None:
        """Raise :class:`~rag_chat.errors.MemoryUnavailable` with a one-line reason."""
        ...

    async def aclose(self) -> None: ...


def new_message(role: str, content: str, **fields: Any) -> StoredMessage:
    """A message with its ``id`` and ``created_at`` assigned now, for callers that need the id
    before appending (e.g. to send it to the client)."""
    message: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "role": role,
        "content": content,
        "created_at": time.time(),
        **fields,
    }
    return message  # type: ignore[return-value]


def check_conversation_id(conversation_id: str) -> str:
    # fullmatch, not match with "$": "$" would accept a trailing newline
    if not isinstance(conversation_id, str) or not _CONVERSATION_ID.fullmatch(conversation_id):
        raise BadRequest(BAD_CONVERSATION_ID)
    return conversation_id


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise BadRequest("limit must be a whole number >= 0")


def encode_messages(messages: Iterable[StoredMessage]) -> list[str]:
    """One compact JSON object per message, with ``id`` and ``created_at`` filled in when
    missing. The caller's dicts are not modified. Raises TypeError for what JSON cannot hold."""
    encoded = []
    now = time.time()
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"a message must be a dict, not {type(message).__name__}")
        full = {"id": uuid.uuid4().hex, "created_at": now, **message}
        encoded.append(json.dumps(full, ensure_ascii=False, separators=(",", ":")))
    return encoded


def decode_messages(raw: Iterable[str], where: str) -> list[StoredMessage]:
    """Decode stored entries. One that is not a JSON object (written by something else) is
    skipped with a warning rather than making the whole conversation unreadable."""
    messages: list[StoredMessage] = []
    for entry in raw:
        try:
            value = json.loads(entry)
        except ValueError:
            value = None
        if isinstance(value, dict):
            messages.append(value)  # type: ignore[arg-type]
        else:
            logger.warning("skipping a stored message in %s that is not a JSON object", where)
    return messages


def one_line(exc: BaseException) -> str:
    """An exception as one short line, for error messages and logs."""
    text = " ".join(str(exc).split()).rstrip(".")
    return text or type(exc).__name__


def redact_url(url: str) -> str:
    """The URL with any password replaced, so it can go into errors and logs."""
    url = re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", url)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)


async def open_memory(settings: Settings, *, default_url: str | None = None) -> Memory:
    """Redis at ``settings.redis_url``, or the in-process fallback when Redis was not asked for.

    If ``redis_url`` was set explicitly (argument, ``RAG_REDIS_URL`` or ``.env``) and Redis does
    not answer, raise :class:`MemoryUnavailable`: the operator asked for Redis, so the server
    must not quietly run without it. If it was left at its default and nothing answers, fall
    back to :class:`~rag_chat.memory.local.LocalMemory` with a loud warning. The probe gives up
    after about 2 s.

    ``default_url`` replaces the URL tried when ``redis_url`` was not set explicitly (tests
    point it at a port where nothing listens); it is ignored when the URL was set.
    """
    # imported here: the implementations import this module for the shared helpers
    from rag_chat.memory.local import LocalMemory
    from rag_chat.memory.redis import RedisMemory

    explicit = "redis_url" in settings.model_fields_set
    url = settings.redis_url if explicit or default_url is None else default_url
    shown = redact_url(url)
    try:
        memory = RedisMemory.from_url(
            url,
            prefix=settings.redis_prefix,
            max_messages=settings.memory_max_messages,
            ttl_seconds=settings.memory_ttl_seconds,
        )
    except ValueError as exc:  # redis-py's verdict on a malformed URL
        reason = f"Redis URL {shown} is not valid ({one_line(exc)})"
    else:
        try:
            await memory.ping()
        except MemoryUnavailable as exc:
            await memory.aclose()
            reason = str(exc)
        else:
            logger.info("conversation memory: Redis at %s", shown)
            return memory

    if explicit:
        raise MemoryUnavailable(f"{reason}; start Redis or fix RAG_REDIS_URL")
    logger.warning(
        "%s. FALLING BACK TO IN-PROCESS CONVERSATION MEMORY: conversations will not survive a "
        "restart of this server nor be shared between server instances. To fix it, start Redis "
        "at %s or set RAG_REDIS_URL to a Redis that answers (setting it makes Redis required).",
        reason,
        shown,
    )
    return LocalMemory(
        max_messages=settings.memory_max_messages, ttl_seconds=settings.memory_ttl_seconds
    )
