"""The WebSocket protocol as types, both directions: what ``/ws`` accepts (``ClientEvent``, the
models in rag_chat.api.ws that validate every frame) and what it sends (``ServerEvent``).

``python -m rag_chat schema`` prints both as one JSON Schema; the UI's TypeScript types are
generated from it (frontend/src/wire.schema.json → wire.gen.ts) and tests check that the
committed schema is current and that every event the server sends validates against it, so
the server and the UI cannot drift apart. Every model allows extra fields: clients must
ignore what they do not know.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic.json_schema import SkipJsonSchema

from rag_chat.api.ws import ClientEvent

# a field that is either there (with a value) or absent, never null: the schema shows no null
Absent = SkipJsonSchema[None]


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class RoomStamped(_Out):
    """Every event that went through a room's log."""

    room: str
    seq: int = Field(description="room-wide, increasing")
    ts: float = Field(description="unix seconds")


class MemberCount(_Out):
    user: str
    connections: int


class Source(_Out):
    n: int
    id: str
    doc_id: str | None
    source: str | None
    title: str | None
    heading: str | None
    page: int | None
    snippet: str
    score: float


class HistoryMessage(_Out):
    id: str
    role: Literal["user", "assistant"]
    content: str
    created_at: float
    user: str | Absent = Field(default=None, description="who wrote it (rooms)")
    sources: list[Source] | Absent = Field(default=None, description="an answer's sources")
    query: str | Absent = Field(default=None, description="the retrieval query of an answer")
    finish_reason: str | Absent = Field(default=None)
    citations: list[int] | Absent = Field(
        default=None, description="an answer's cited sources that support it"
    )
    unsupported: list[int] | Absent = Field(
        default=None, description="an answer's cited sources that do not support it"
    )
    no_match: bool | Absent = Field(default=None, description="an answer without sources")
    reply_to: str | Absent = Field(
        default=None, description="an answer in a room: the id of the message it answers"
    )
    edited_at: float | Absent = Field(
        default=None, description="a message edited by its author: when (unix seconds)"
    )
    feedback: dict[str, Feedback] | Absent = Field(
        default=None, description="an answer's ratings, by who gave them"
    )


class Joined(_Out):
    type: Literal["joined"]
    room: str
    user: str
    members: list[MemberCount]
    history: list[HistoryMessage]
    last_seq: int


class Presence(RoomStamped):
    type: Literal["presence"]
    action: Literal["join", "leave"]
    user: str
    members: list[MemberCount]


class Message(RoomStamped):
    type: Literal["message"]
    id: str
    user: str
    text: str
    client_id: str | None
    ai: bool


class MessageEdited(RoomStamped):
    """A message's new text (its author edited it); an answer to it follows when ``ai``."""

    type: Literal["message.edited"]
    id: str = Field(description="the message edited")
    user: str
    text: str
    ai: bool = Field(description="it asks the AI: a new answer follows, replacing the old")


class Typing(RoomStamped):
    type: Literal["typing"]
    user: str
    state: Literal["start", "stop"]
    ttl_ms: int | Absent = Field(
        default=None, description="on start: it stops by itself after this"
    )


class AIEvent(RoomStamped):
    """What every ``ai.*`` event of a room carries. (Optional fields that are absent rather
    than null are typed without None: on the wire they are a string or not there.)"""

    message_id: str
    user: Literal["ai"]
    reply_to: str | Absent = Field(default=None, description="the id of the message it answers")
    conversation_id: str | Absent = Field(default=None)


class AIStart(AIEvent):
    type: Literal["ai.start"]
    conversation_id: str
    replaces: str | Absent = Field(
        default=None,
        description="a regenerated answer: the id of the answer it takes the place of",
    )


class AISources(AIEvent):
    type: Literal["ai.sources"]
    query: str
    chunks: list[Source]


class AIToken(AIEvent):
    type: Literal["ai.token"]
    delta: str = Field(description="may hold several tokens when the client fell behind")


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int


class AIDone(AIEvent):
    type: Literal["ai.done"]
    finish_reason: Literal["stop", "length", "cancelled"]
    cancel_reason: Literal["user", "abandoned", "server_shutdown"] | Absent = Field(default=None)
    usage: Usage
    timings: dict[str, float | None]
    citations: list[int] = Field(
        description="sources cited by a sentence of the answer that they support (checked)"
    )
    unsupported: list[int] = Field(
        default_factory=list,
        description="sources cited only by sentences they do not support",
    )
    uncited: list[int] = Field(
        default_factory=list, description="sources shown in ai.sources that nothing cites"
    )
    no_match: bool | Absent = Field(
        default=None,
        description="retrieval found nothing relevant: the answer says so, without the LLM",
    )
    persisted: bool


class AICancel(RoomStamped):
    type: Literal["ai.cancel"]
    message_id: str
    user: str


ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "not_joined",
    "conflict",
    "too_large",
    "rate_limited",
    "too_many_replies",
    "too_many_connections",
    "llm_error",
    "llm_unavailable",
    "llm_timeout",
    "memory_unavailable",
    "retrieval_error",
    "internal_error",
]


class Error(_Out):
    type: Literal["error"]
    code: ErrorCode
    message: str = Field(description="one line")
    event: str | None = Field(default=None, description="the type of the event it answers")
    partial: bool | Absent = Field(default=None, description="an answer failed mid-stream")
    retry_after: float | Absent = Field(default=None, description="seconds")
    room: str | Absent = Field(default=None)
    conversation_id: str | Absent = Field(default=None)
    client_id: str | Absent = Field(default=None)
    message_id: str | Absent = Field(default=None)
    seq: int | Absent = Field(default=None)
    ts: float | Absent = Field(default=None)


class Left(_Out):
    type: Literal["left"]
    room: str


class Pong(_Out):
    type: Literal["pong"]


class Feedback(_Out):
    rating: Literal["up", "down"]
    at: float = Field(description="unix seconds")
    comment: str | Absent = Field(default=None)


class Rated(_Out):
    """The answer to ``rate``: the caller's rating as kept (null: taken back)."""

    type: Literal["rated"]
    room: str
    message_id: str
    rating: Literal["up", "down"] | None
    comment: str | Absent = Field(default=None)


ServerEvent = Annotated[
    Joined
    | Presence
    | Message
    | MessageEdited
    | Typing
    | AIStart
    | AISources
    | AIToken
    | AIDone
    | AICancel
    | Error
    | Left
    | Pong
    | Rated,
    Field(discriminator="type"),
]
server_event: TypeAdapter[ServerEvent] = TypeAdapter(ServerEvent)
client_event: TypeAdapter[ClientEvent] = TypeAdapter(
    Annotated[ClientEvent, Field(discriminator="type")]
)


def schema() -> dict[str, Any]:
    """One JSON Schema document: ``ClientEvent`` and ``ServerEvent`` and what they use."""
    defs: dict[str, Any] = {}
    out: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "rag_chat WebSocket protocol",
    }
    for name, adapter in (("ClientEvent", client_event), ("ServerEvent", server_event)):
        part = adapter.json_schema(ref_template="#/$defs/{model}")
        defs.update(part.pop("$defs", {}))
        defs[name] = part
    out["$defs"] = dict(sorted(defs.items()))
    return out


def schema_text() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"
