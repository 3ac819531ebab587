"""Rooms: members, messages, typing and AI replies, all as events in the room's log.

::

    join ──► log head ──► hub.subscribe(after) ∥ presence.add (+ its join event)
             (∥ the history, read from the start) ──► joined {members, history, last_seq}
             ──► the events held meanwhile ──► live
    message ──► claim client_id (idempotent) ──► log: message ──► memory ──► AI asked? ──┐
    AI reply task (on the instance that took the message) ◄──────────────────────────────┘
        ChatService events ──► log (ai.start, ai.sources, ai.token…, ai.done) ──► every member
        watches the room for ai.cancel from any member on any instance; cancels itself when
        nobody has been in the room for PRIVATE_GRACE_S (a private chat whose client is gone)
    typing start/stop ──► log; a start not refreshed within TYPING_TTL_S stops on its own

A private conversation with the assistant is a room with one member whose messages always
ask the AI. Everything a client sees comes from the log, so a reconnect with the last seq
replays exactly what it missed, including the rest of an answer still streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from rag_chat.chat import ChatService, Reply
from rag_chat.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    MemoryUnavailable,
    NotFound,
    NotJoined,
)
from rag_chat.limits import Limits
from rag_chat.memory import Memory, StoredMessage
from rag_chat.rooms.hub import RoomHub, Subscription
from rag_chat.rooms.log import Event, Lease, RoomLog
from rag_chat.rooms.presence import PRESENCE_TTL_S, Presence
from rag_chat.text import is_unicode, one_line

log = logging.getLogger(__name__)

TYPING_TTL_S = 6.0
PRIVATE_GRACE_S = 15.0
WATCHDOG_S = 1.0
# a reply cut off by a Redis outage is ended in its log if Redis is back within this
UNREACHABLE_END_S = 120.0
HISTORY_ON_JOIN = 50
CLIENT_ID_TTL_S = 24 * 3600
# how far back a regenerate looks for the question of the latest answer (other members'
# messages may have come between them)
REGENERATE_LOOKBACK = 50
# … and how far back in the room's log it looks for an answer that was never saved
REGENERATE_LOG_WINDOW = 2000
_ROOM = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_AI_MENTION = re.compile(r"(?:^|(?<=\s))@ai\b", re.IGNORECASE)


def check_room(room: object) -> str:
    if not isinstance(room, str) or not _ROOM.match(room):
        raise BadRequest("room must be 1-128 characters of letters, digits, '_', '-', '.', ':'")
    return room


@dataclass(frozen=True)
class Member:
    conn: str
    user: str
    # whose limits this member spends (rag_chat.limits); the user name when empty
    key: str = ""

    @property
    def limit_key(self) -> str:
        return self.key or f"user:{self.user}"


async def _drain(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until they are over (their errors are not the caller's)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _cancel(*tasks: asyncio.Task[Any] | None) -> None:
    for task in tasks:
        if task is not None:
            task.cancel()


class ReplyWriter:
    """Appends one reply's events to its room log, in order, one append in flight at a time.

    ``put`` never waits for Redis: events put in one turn of the event loop go out together,
    and events that come while an append is on its way gather and go out together in the next
    one (one round trip, one seq each). Tokens that come while a token of the answer is on its
    way become one ``ai.token`` (their deltas concatenated): a model faster than the round trip
    costs one append per round trip, not one per token, and one slower than it still has each
    token go out alone as soon as it comes. A failed append is raised by the next ``put`` or
    by ``close``; ``tokens`` counts the tokens the log has taken.

    No task of its own: an append starts from a callback (``append_soon``) and the next one
    from the callback of its reply, which spares the event loop two task wake-ups per token
    (a writer task woken by ``put`` and again by the reply)."""

    def __init__(self, room_log: RoomLog, room: str) -> None:
        self.log = room_log
        self.room = room
        self.tokens = 0
        self._pending: list[Event] = []
        self._pending_tokens = 0
        self._sending_tokens = False  # the append in flight carries a token
        self._scheduled: asyncio.Handle | None = None
        self._inflight: asyncio.Future[Any] | None = None
        self._error: BaseException | None = None
        self._aborted = False

    def put(self, event: Event) -> None:
        if self._error is not None:
            raise self._error
        pending = self._pending
        if event.get("type") == "ai.token":
            self._pending_tokens += 1
            if self._sending_tokens and pending:
                last = pending[-1]
                if last.get("type") == "ai.token" and last.get("message_id") == event.get(
                    "message_id"
                ):
                    pending[-1] = {**last, "delta": last["delta"] + event["delta"]}
                    return
        pending.append(event)
        if self._inflight is None and self._scheduled is None and not self._aborted:
            self._scheduled = asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = None
        if not self._pending or self._aborted:
            return
        batch, self._pending = self._pending, []
        count, self._pending_tokens = self._pending_tokens, 0
        self._sending_tokens = count > 0
        try:
            inflight = self.log.append_soon(self.room, batch)
        except Exception as exc:  # an event that cannot be encoded, say: raised to the reply
            self._error = exc
            self._sending_tokens = False
            return
        self._inflight = inflight
        inflight.add_done_callback(functools.partial(self._sent, count))

    def _sent(self, count: int, inflight: asyncio.Future[Any]) -> None:
        self._inflight = None
        self._sending_tokens = False
        if inflight.cancelled():
            if not self._aborted:
                self._error = MemoryUnavailable("room event not written (cancelled)")
            return
        error = inflight.exception()
        if error is not None:
            self._error = error
            return
        self.tokens += count
        if self._pending:
            self._send()

    async def close(self) -> None:
        """Wait until everything put is in the log (or raise why it is not)."""
        while True:
            if self._error is not None:
                raise self._error
            inflight = self._inflight
            if inflight is None:
                if not self._pending or self._aborted:
                    return
                if self._scheduled is not None:
                    self._scheduled.cancel()
                self._send()
                continue
            await asyncio.wait((inflight,))

    async def abort(self) -> None:
        """Drop what is not in the log yet (an append on its way may still land)."""
        self._aborted = True
        self._pending = []
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            inflight.cancel()


def _question_of(history: list[StoredMessage]) -> tuple[int, StoredMessage] | None:
    """The question the last message (an answer) replies to, and where it is: the one its
    ``reply_to`` names, else (an answer saved before answers named it) the last user message
    before it."""
    answer = history[-1]
    wanted = answer.get("reply_to")
    for i in range(len(history) - 2, -1, -1):
        message = history[i]
        if message.get("role") != "user":
            continue
        if wanted is None or message.get("id") == wanted:
            return i, message
    return None


class Rooms:
    def __init__(
        self,
        room_log: RoomLog,
        presence: Presence,
        chat: ChatService,
        memory: Memory,
        *,
        presence_ttl_s: float = PRESENCE_TTL_S,
        typing_ttl_s: float = TYPING_TTL_S,
        reply_grace_s: float = PRIVATE_GRACE_S,
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits
        self.presence_ttl_s = presence_ttl_s
        self.typing_ttl_s = typing_ttl_s
        self.reply_grace_s = reply_grace_s
        self.log = room_log
        self.hub = RoomHub(room_log)
        self.presence = presence
        self.chat = chat
        self.memory = memory
        self.replies: dict[str, Reply] = {}
        self._reply_tasks: set[asyncio.Task[None]] = set()
        self._typing: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._local: dict[str, dict[str, str]] = {}  # room -> {conn: user} on this instance
        self._subs: dict[str, dict[str, Subscription]] = {}  # conn -> {room: subscription}
        # conn -> the rooms in _local it is in (joins half-done too): what leave_all releases,
        # without a pass over every room of the instance (10,000 leaving were quadratic)
        self._rooms_of: dict[str, set[str]] = {}
        self._refresher: asyncio.Task[None] | None = None
        # message_id -> (room, message_id, reply_to): the leases of the answers running here
        self._leases: dict[str, Lease] = {}

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # keep a reference: the loop holds tasks weakly
        task = asyncio.create_task(coro)
        self._reply_tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._reply_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("room task failed: %s", exc)  # e.g. a typing stop while Redis is down

    async def start(self) -> None:
        self.hub.start()
        self._refresher = asyncio.create_task(self._refresh_presence(), name="presence")

    async def stop_replies(self, reason: str = "server_shutdown", wait_s: float = 5) -> None:
        """Cancel every reply running here; each ends with its final event in its room."""
        for reply in list(self.replies.values()):
            await reply.cancel(reason)
        tasks = list(self._reply_tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=wait_s)

    async def stop(self) -> None:
        await self.stop_replies()
        if self._refresher is not None:
            self._refresher.cancel()
        await self.hub.stop()

    # --- membership ---

    async def join(
        self, member: Member, room: str, last_seq: int | None, deliver: Callable[[Event], None]
    ) -> Subscription:
        """``joined`` first, then every event after ``last_seq`` (or, without one, from the
        member's own presence join on), then live.

        Two round trips in a row, not five: the history is read from the start, and once the
        log's head is known the backlog read and the presence entry go together (the presence
        event comes after that head, so the member gets its own join in its stream). Under
        load each round trip costs several passes of a busy event loop: a conversation's
        first question waits for its join."""
        check_room(room)
        history_read = asyncio.ensure_future(self.memory.history(room, HISTORY_ON_JOIN))
        try:
            current = await self.log.last_seq(room)
        except BaseException:
            await _drain(history_read)
            raise
        held: list[Event] = []
        live = False

        def hold(event: Event) -> None:
            if live:
                deliver(event)
            else:
                held.append(event)

        old = self._subs.get(member.conn, {}).pop(room, None)
        if old is not None:  # a rejoin (resume) on the same connection replaces the old one
            self.hub.unsubscribe(old)
        self._local.setdefault(room, {})[member.conn] = member.user
        self._rooms_of.setdefault(member.conn, set()).add(room)
        added = asyncio.ensure_future(self.presence.add(room, member.conn, member.user))

        async def undo() -> None:
            # the reads stopped, then everything of the join released (its presence entry
            # too, if it was added meanwhile)
            await _drain(history_read, added)
            await self.leave(member, room)

        try:
            sub = await self.hub.subscribe(
                room, current if last_seq is None else last_seq, hold, head=current
            )
        except BaseException:
            await undo()
            raise
        if room not in self._rooms_of.get(member.conn, ()):
            # the connection left the room while this join subscribed (leave_all: it is
            # closing): registering now would keep a subscription nobody releases
            self.hub.unsubscribe(sub)
            await undo()
            raise NotJoined(f"left room {room!r} while joining it")
        # registered with no await in between: a cancelled join still gets cleaned up
        self._subs.setdefault(member.conn, {})[room] = sub
        try:
            members = await added
            history = await history_read
        except BaseException:
            await undo()
            raise
        deliver(
            {
                "type": "joined",
                "room": room,
                "user": member.user,
                "members": members,
                "history": history,
                "last_seq": current,
            }
        )
        for event in held:
            deliver(event)
        live = True
        return sub

    def is_member(self, member: Member, room: str) -> bool:
        return room in self._subs.get(member.conn, {})

    async def leave_all(self, member: Member) -> None:
        """Everything a connection held, in every room (also half-finished joins)."""
        # every room with a subscription of the connection is among them (a join registers
        # its subscription only while its room is there, and leave drops both together)
        rooms = set(self._rooms_of.get(member.conn, ()))
        for room in rooms:
            try:
                await self.leave(member, room)
            except MemoryUnavailable as exc:
                log.warning("leaving %s: %s", room, exc)

    async def leave(self, member: Member, room: str) -> None:
        # in-process state first, so it is released even if Redis fails below
        subs = self._subs.get(member.conn, {})
        sub = subs.pop(room, None)
        if not subs:
            self._subs.pop(member.conn, None)
        if sub is not None:
            self.hub.unsubscribe(sub)
        local = self._local.get(room, {})
        local.pop(member.conn, None)
        if not local:
            self._local.pop(room, None)
        mine = self._rooms_of.get(member.conn)
        if mine is not None:
            mine.discard(room)
            if not mine:
                del self._rooms_of[member.conn]
        await self.typing(member, room, "stop")
        await self.presence.remove(room, member.conn)  # announces the leave if it was the last

    # --- messages and the AI ---

    async def post(
        self,
        member: Member,
        room: str,
        text: str,
        *,
        client_id: str | None,
        ai: bool,
        received: float | None = None,
    ) -> Event | None:
        """Append a message; None when ``client_id`` was seen before (a re-send).

        Limits are checked before anything is written, so a refused message leaves no trace
        (its ``client_id`` is not taken) and can simply be sent again after ``retry_after``.
        ``received``: ``time.perf_counter()`` when the transport got the message (default:
        now), for the reply's admit time."""
        if received is None:
            received = time.perf_counter()
        check_room(room)
        ask = ai or bool(_AI_MENTION.search(text))
        msg_id = uuid.uuid4().hex
        who = member.limit_key
        if self.limits is not None:
            # the message counted and, when it asks, its answer's lease taken: one round trip
            await (self.limits.ask(who, msg_id) if ask else self.limits.message(who))
        question = _AI_MENTION.sub(" ", text).strip() or text
        # retrieval runs while the message is written (claim, log, memory): time to first
        # token. The limits above bound the work a caller can cause.
        prefetch = self.chat.prefetch(question) if ask else None
        history = self.chat.prefetch_history(room) if ask else None
        try:
            msg = await self._append_message(member, room, text, msg_id, client_id, ask)
        except BaseException:
            _cancel(prefetch, history)
            if ask and self.limits is not None:
                await self.limits.reply_finished(who, msg_id)
            raise
        if msg is None:
            _cancel(prefetch, history)
            if ask and self.limits is not None:
                await self.limits.reply_finished(who, msg_id)
            return None
        # the question goes to the conversation's memory while its reply starts — a round
        # trip less before the first token; the reply saves its answer after it
        saved = asyncio.ensure_future(self._remember(member, room, text, msg))
        try:
            if ask:
                try:
                    reply = self.chat.start(
                        question,
                        room,
                        question_id=msg["id"],
                        prefetched=prefetch,
                        received=received,
                        history_read=history,
                        question_saved=saved,
                    )
                except BaseException:
                    _cancel(prefetch, history)
                    if self.limits is not None:
                        await self.limits.reply_finished(who, msg_id)
                    raise
                self.replies[reply.message_id] = reply
                self._spawn(self._run_reply(room, reply, msg["id"], who))
        finally:
            # the message is the caller's once it is remembered (or could not be: logged)
            await asyncio.shield(saved)
        return msg

    async def regenerate(
        self,
        member: Member,
        room: str,
        message_id: str,
        *,
        shared: bool = True,
        received: float | None = None,
    ) -> Reply:
        """Answer the question of ``message_id`` — the room's latest answer — once more.

        The new answer streams like any other (its ``ai.start`` names the answer it
        ``replaces``) and, once saved, takes the old one's place in the conversation's memory:
        follow-ups and the history read on join see it alone. It is written from the history
        before the question, as the first one was; an answer that failed before it was saved
        (its question the latest message) may be asked for again too. In a ``shared`` room
        only whoever asked may ask again (a private conversation is its owner's, checked by
        the caller); it counts as a question for the rate limits. ``Conflict`` when the
        answer is not the latest or an answer is still streaming in the room (on this
        instance), ``Forbidden`` for someone else's question."""
        if received is None:
            received = time.perf_counter()
        check_room(room)
        if not self.is_member(member, room):
            raise NotJoined(f"join room {room!r} first")
        if any(r.conversation_id == room and not r.ended for r in self.replies.values()):
            raise Conflict(f"an answer is still streaming in {room!r}: stop it or let it finish")
        history = await self.memory.history(room, REGENERATE_LOOKBACK)
        latest = history[-1] if history else None
        asked: tuple[int, StoredMessage] | None = None
        if latest is None:
            pass
        elif latest.get("role") == "assistant" and latest.get("id") == message_id:
            asked = _question_of(history)
            if asked is None:
                raise Conflict("the question of that answer is no longer in the conversation")
        elif latest.get("role") == "user" and latest.get("id") == await self._unsaved_reply_to(
            room, message_id
        ):
            # an answer that failed before it was saved (retrieval failed, say): its question
            # is the latest message, and the new answer is the first one saved
            asked = (len(history) - 1, latest)
        if asked is None:
            raise Conflict(f"{message_id!r} is not the latest answer in {room!r}")
        at, question_msg = asked
        if shared and question_msg.get("user", member.user) != member.user:
            raise Forbidden("only who asked the question can have it answered again")
        who = member.limit_key
        if self.limits is not None:
            await self.limits.ask(who, question_msg["id"])
        return await self._answer(
            member,
            room,
            question_msg.get("content", ""),
            question_msg["id"],
            history[:at],
            replaces=message_id,
            received=received,
        )

    async def edit(
        self,
        member: Member,
        room: str,
        message_id: str,
        text: str,
        *,
        shared: bool = True,
        ai: bool = False,
        received: float | None = None,
    ) -> Reply | None:
        """Change the text of ``member``'s latest message ``message_id`` and, when it asks
        the AI (``ai``, an @ai mention, or it was answered), answer it again.

        The message may be followed only by its own answer and by other members' messages no
        answer replies to (``Conflict`` otherwise: an edit rewrites the end of a
        conversation, never its middle). Everyone in the room gets ``message.edited``; the
        memory keeps the new text (with ``edited_at``), so follow-ups and a join's history see
        it. The new answer is written from the history before the message and takes the old
        answer's place (its ``ai.start`` ``replaces`` it), as a regenerate's does; it counts
        as a question for the rate limits, an edit alone as a message. In a ``shared`` room
        only its author may edit a message (``Forbidden``). Returns the new answer, or None."""
        if received is None:
            received = time.perf_counter()
        check_room(room)
        if not text.strip():
            raise BadRequest("text must not be empty")
        if not is_unicode(text):
            raise BadRequest("text is not valid Unicode text (a lone surrogate)")
        if not self.is_member(member, room):
            raise NotJoined(f"join room {room!r} first")
        history = await self.memory.history(room, REGENERATE_LOOKBACK)
        at = next((i for i, m in enumerate(history) if m.get("id") == message_id), None)
        if at is None:
            raise NotFound(f"no message {message_id!r} among the latest in {room!r}")
        original = history[at]
        if original.get("role") != "user":
            raise BadRequest(f"{message_id!r} is an answer: ask again with regenerate instead")
        if shared and original.get("user", member.user) != member.user:
            raise Forbidden("only who wrote a message can edit it")
        if any(r.conversation_id == room and not r.ended for r in self.replies.values()):
            raise Conflict(f"an answer is still streaming in {room!r}: stop it or let it finish")
        answer: str | None = None
        for later in history[at + 1 :]:
            if later.get("role") == "assistant" and later.get("reply_to", message_id) == message_id:
                answer = later.get("id")
            elif later.get("role") == "assistant" or later.get("user") == original.get("user"):
                raise Conflict(f"only the latest message can be edited; {message_id!r} is not")
        if answer is None:  # an answer that failed before it was saved: the new one replaces it
            answer = await self._unsaved_answer_to(room, message_id)
        ask = ai or answer is not None or bool(_AI_MENTION.search(text))
        who = member.limit_key
        if self.limits is not None:
            await (self.limits.ask(who, message_id) if ask else self.limits.message(who))
        try:
            edited_at = time.time()

            def change(message: StoredMessage) -> StoredMessage:
                if message.get("role") != "user":
                    raise Conflict(f"{message_id!r} changed meanwhile")
                return {**message, "content": text, "edited_at": edited_at}

            if await self.memory.update(room, message_id, change) is None:
                raise NotFound(f"no message {message_id!r} in {room!r}")
            await self.log.append(
                room,
                {
                    "type": "message.edited",
                    "id": message_id,
                    "user": original.get("user", member.user),
                    "text": text,
                    "ai": ask,
                },
            )
        except BaseException:
            if ask and self.limits is not None:
                await self.limits.reply_finished(who, message_id)
            raise
        if not ask:
            return None
        return await self._answer(
            member, room, text, message_id, history[:at], replaces=answer, received=received
        )

    async def _answer(
        self,
        member: Member,
        room: str,
        text: str,
        question_id: str,
        before_it: list[StoredMessage],
        *,
        replaces: str | None,
        received: float,
    ) -> Reply:
        """An answer to the question ``question_id`` (its lease taken) written from the
        history ``before_it``, taking the place of the answer ``replaces``."""
        who = member.limit_key
        question = _AI_MENTION.sub(" ", text).strip() or text
        before: asyncio.Future[list[StoredMessage]] = asyncio.get_running_loop().create_future()
        before.set_result(before_it)
        prefetch = self.chat.prefetch(question)
        try:
            reply = self.chat.start(
                question,
                room,
                question_id=question_id,
                prefetched=prefetch,
                received=received,
                history_read=before,
                replaces=replaces,
            )
        except BaseException:
            _cancel(prefetch)
            if self.limits is not None:
                await self.limits.reply_finished(who, question_id)
            raise
        self.replies[reply.message_id] = reply
        self._spawn(self._run_reply(room, reply, question_id, who))
        return reply

    async def rate(
        self, room: str, message_id: str, rater: str, rating: str | None, comment: str = ""
    ) -> dict[str, Any]:
        """``rater``'s rating of the answer ``message_id`` (``up`` / ``down``, with an optional
        comment, kept as one line; None takes it back), kept with the answer in the
        conversation's memory (one per rater: a new one replaces theirs), counted in
        ``rag_answer_feedback_total`` and logged for whoever reviews answers. Returns
        ``{rating, comment?}`` as kept; ``NotFound`` when the memory has no such message,
        ``BadRequest`` when it is not an answer."""
        check_room(room)
        if not is_unicode(comment):
            raise BadRequest("comment is not valid Unicode text (a lone surrogate)")
        comment = one_line(comment)

        def change(message: StoredMessage) -> StoredMessage:
            if message.get("role") != "assistant":
                raise BadRequest(f"{message_id!r} is not an answer: only answers are rated")
            feedback = dict(message.get("feedback") or {})
            if rating is None:
                feedback.pop(rater, None)
            else:
                given: dict[str, Any] = {"rating": rating, "at": time.time()}
                if comment:
                    given["comment"] = comment
                feedback[rater] = given
            return {**message, "feedback": feedback}

        updated = await self.memory.update(room, message_id, change)
        if updated is None:
            raise NotFound(f"no answer {message_id!r} in {room!r}")
        kept: dict[str, Any] = {"rating": rating}
        if rating is not None and comment:
            kept["comment"] = comment
        self.chat.metrics.feedback.labels(rating or "cleared").inc()
        log.info(
            "feedback %s on %s in %s by %s%s",
            rating or "cleared",
            message_id,
            room,
            rater,
            f": {comment}" if comment else "",
        )
        return kept

    async def _unsaved_reply_to(self, room: str, message_id: str) -> str | None:
        """What the answer ``message_id`` replied to, from the room's log (its ``ai.start``
        among the last ``REGENERATE_LOG_WINDOW`` events): for an answer the memory never got."""
        head = await self.log.last_seq(room)
        for event in reversed(await self.log.since(room, max(0, head - REGENERATE_LOG_WINDOW))):
            if event.get("type") == "ai.start" and event.get("message_id") == message_id:
                reply_to = event.get("reply_to")
                return reply_to if isinstance(reply_to, str) else None
        return None

    async def _unsaved_answer_to(self, room: str, question_id: str) -> str | None:
        """The latest answer to ``question_id`` that started in the room's log (among its last
        ``REGENERATE_LOG_WINDOW`` events): for an answer the memory never got."""
        head = await self.log.last_seq(room)
        for event in reversed(await self.log.since(room, max(0, head - REGENERATE_LOG_WINDOW))):
            if event.get("type") == "ai.start" and event.get("reply_to") == question_id:
                answer = event.get("message_id")
                return answer if isinstance(answer, str) else None
        return None

    async def _remember(self, member: Member, room: str, text: str, msg: Event) -> None:
        """The message in the conversation's memory (the history replies read); a failure
        is logged, not raised: the message is in the room's log either way."""
        try:
            await self.memory.append(
                room,
                {
                    "id": msg["id"],
                    "role": "user",
                    "content": text,
                    "user": member.user,
                    "created_at": msg["ts"],
                },
            )
        except MemoryUnavailable as exc:
            log.warning("message %s not kept in history: %s", msg["id"], exc)

    async def _append_message(
        self, member: Member, room: str, text: str, msg_id: str, client_id: str | None, ask: bool
    ) -> Event | None:
        if client_id and not await self.log.claim(room, client_id, CLIENT_ID_TTL_S):
            return None
        msg = await self.log.append(
            room,
            {
                "type": "message",
                "id": msg_id,
                "user": member.user,
                "text": text,
                "client_id": client_id,
                "ai": ask,
            },
        )
        await self.typing(member, room, "stop")
        return msg

    async def cancel(self, member: Member, room: str, message_id: str) -> None:
        check_room(room)
        if not self.is_member(member, room):
            raise NotJoined(f"join room {room!r} first")
        await self.log.append(
            room, {"type": "ai.cancel", "message_id": message_id, "user": member.user}
        )
        reply = self.replies.get(message_id)
        if reply is not None and reply.conversation_id == room:
            await reply.cancel()

    async def _run_reply(self, room: str, reply: Reply, reply_to: str, who: str = "") -> None:
        def watch(event: Event) -> None:
            if event.get("type") == "ai.cancel" and event.get("message_id") == reply.message_id:
                self._spawn(reply.cancel())

        # the answer's lease, taken beside its start (no round trip before the first token)
        # and renewed by the refresher: if this instance dies mid-answer, another one ends
        # the answer in the room's log (_end_lapsed) instead of leaving it open forever
        lease = (room, reply.message_id, reply_to)
        self._leases[reply.message_id] = lease
        held = asyncio.ensure_future(self._hold([lease]))
        watcher = await self.hub.subscribe(room, None, watch)
        watchdog = asyncio.create_task(self._watchdog(room, reply))
        writer = ReplyWriter(self.log, room)
        tokens = 0
        try:
            try:
                async for event in reply.events():
                    writer.put({**event, "user": "ai", "reply_to": reply_to})
                await writer.close()
            finally:
                tokens = writer.tokens
                await writer.abort()
        except MemoryUnavailable as exc:
            log.warning("reply %s stopped, its room log is unreachable: %s", reply.message_id, exc)
            await reply.cancel()
            # its members saw it start: end it in the log once Redis answers again, or they
            # (and whoever resumes) would wait for its end forever
            end = {
                "type": "error",
                "message_id": reply.message_id,
                "conversation_id": reply.conversation_id,
                "code": exc.code,
                "message": "the answer was cut off: the room's event log was unreachable",
                "partial": tokens > 0,
                "user": "ai",
                "reply_to": reply_to,
            }
            give_up = time.monotonic() + UNREACHABLE_END_S
            while True:
                try:
                    await self.log.append(room, end)
                    break
                except MemoryUnavailable:
                    if time.monotonic() >= give_up:
                        log.warning("reply %s: its end could not be logged", reply.message_id)
                        break
                    await asyncio.sleep(WATCHDOG_S)
        finally:
            watchdog.cancel()
            self.hub.unsubscribe(watcher)
            self.replies.pop(reply.message_id, None)
            self._leases.pop(reply.message_id, None)
            # the asker's count first: a question sent right after ai.done must be let in
            if self.limits is not None and who:
                await self.limits.reply_finished(who, reply_to)
            with contextlib.suppress(Exception):
                await held  # released after it was taken, never before
            try:
                await self.log.release_reply(lease)
            except MemoryUnavailable as exc:  # it lapses; _end_lapsed finds the answer ended
                log.warning("reply %s: its lease was not released: %s", reply.message_id, exc)

    async def _watchdog(self, room: str, reply: Reply) -> None:
        empty_since: float | None = None
        while True:
            await asyncio.sleep(WATCHDOG_S)
            # a member on this instance: no need to ask Redis (a call a second per answer
            # streaming would be a thousand calls a second at 1,000 answers)
            if self._local.get(room):
                empty_since = None
                continue
            try:
                members = await self.presence.members(room)
            except MemoryUnavailable:
                continue
            if members:
                empty_since = None
            elif empty_since is None:
                empty_since = time.monotonic()
            elif time.monotonic() - empty_since >= self.reply_grace_s:
                log.info("reply %s cancelled: nobody in %s", reply.message_id, room)
                await reply.cancel("abandoned")
                return

    # --- typing ---

    async def typing(self, member: Member, room: str, state: str) -> None:
        key = (member.conn, room)
        timer = self._typing.pop(key, None)
        if timer is not None:
            timer.cancel()
        if state == "start" and member.conn not in self._local.get(room, {}):
            return  # a late timer or message after the member left
        if state == "start":
            # the state first, then the I/O: a cancel during the append still leaves a timer
            # that a disconnect or the expiry turns into a "stop"
            loop = asyncio.get_running_loop()
            self._typing[key] = loop.call_later(
                self.typing_ttl_s, lambda: self._spawn(self.typing(member, room, "stop"))
            )
            if timer is None:
                await self.log.append(
                    room,
                    {
                        "type": "typing",
                        "user": member.user,
                        "state": "start",
                        "ttl_ms": int(self.typing_ttl_s * 1000),
                    },
                )
        elif timer is not None:
            await self.log.append(room, {"type": "typing", "user": member.user, "state": "stop"})

    # --- presence upkeep ---

    async def _hold(self, leases: list[Lease]) -> None:
        try:
            await self.log.hold_replies(leases, self.presence_ttl_s)
        except MemoryUnavailable as exc:  # taken again at the next refresh
            log.warning("answer leases not taken: %s", exc)

    async def _end_lapsed(self) -> None:
        """End, in their rooms' logs, the answers whose instance died while they streamed
        (their leases lapsed): their members — and whoever resumes — would otherwise wait
        for their end forever. An answer whose end is in the log already (its lease was not
        released: Redis was away then) is left alone."""
        for room, message_id, reply_to in await self.log.lapsed_replies():
            if message_id in self._leases:  # ours after all (a refresh came late): take it again
                await self._hold([self._leases[message_id]])
                continue
            head = await self.log.last_seq(room)
            events = await self.log.since(room, max(0, head - REGENERATE_LOG_WINDOW))
            mine = [e for e in events if e.get("message_id") == message_id]
            if any(e.get("type") in ("ai.done", "error") for e in mine):
                continue
            log.warning("answer %s in %s: its instance stopped mid-answer; ended", message_id, room)
            await self.log.append(
                room,
                {
                    "type": "error",
                    "message_id": message_id,
                    "conversation_id": room,
                    "code": "internal_error",
                    "message": "the server writing the answer stopped",
                    "partial": any(e.get("type") == "ai.token" for e in mine),
                    "user": "ai",
                    "reply_to": reply_to,
                },
            )

    async def _refresh_presence(self) -> None:
        while True:
            await asyncio.sleep(self.presence_ttl_s / 3)
            # the leases of the answers running here, then the answers of instances that died
            try:
                if self._leases:
                    await self.log.hold_replies(list(self._leases.values()), self.presence_ttl_s)
                await self._end_lapsed()
            except MemoryUnavailable as exc:
                log.warning("answer leases not renewed: %s", exc)
            except Exception:  # the refresher must outlive any one failure
                log.exception("renewing answer leases failed")
            for room, conns in list(self._local.items()):
                sent = dict(conns)
                try:
                    # also announces the users of a crashed instance as gone, and puts back the
                    # entries of open connections that Redis lost (down longer than the TTL)
                    await self.presence.refresh(room, sent)
                    # one that left while the refresh was on its way may be back: remove it
                    for conn in sent.keys() - self._local.get(room, {}).keys():
                        await self.presence.remove(room, conn)
                except MemoryUnavailable as exc:
                    log.warning("presence refresh failed: %s", exc)
                except Exception:  # the refresher must outlive any one failure
                    log.exception("presence refresh of %s failed", room)
