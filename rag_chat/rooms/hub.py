"""Fan-out of room events to this instance's subscribers, from the shared log.

::

    RoomLog (Redis streams + the live channel) ──live() (one reader task, every room)──►
        RoomHub ──► Subscription.offer(event) ──► deliver(event) (a connection's send queue)

Every instance reads the same log, so every member sees a room's events in one order. A
subscriber that joins with a last ``seq`` first reads the backlog (XRANGE) while live events
are held back, then goes live; events are delivered once, in seq order, by comparing seqs.
The hub keeps, per room it follows, the last seq it fanned out: a live event past the next
one (events lost while the live connection was down, or appended while a room was being
joined) makes it read the missing ones from the log first, and every (re)connection reads
what each followed room gained while nobody listened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from rag_chat.errors import MemoryUnavailable
from rag_chat.rooms.log import Event, RoomLog

log = logging.getLogger(__name__)

RETRY_S = 0.5
# the longest pause between tries while Redis is away: events flow again at most this long
# after it is back
RETRY_MAX_S = 2.0
STOP_WAIT_S = 3.0


class Subscription:
    def __init__(self, room: str, after: int, deliver: Callable[[Event], None]) -> None:
        self.room = room
        self.last = after
        self._deliver = deliver
        self._held: list[Event] | None = []  # live events that arrive during the catch-up

    def offer(self, event: Event) -> None:
        if self._held is not None:
            self._held.append(event)
        elif event["seq"] > self.last:
            self.last = event["seq"]
            self._deliver(event)

    def go_live(self, backlog: list[Event]) -> None:
        held, self._held = self._held or [], None
        for event in sorted(backlog + held, key=lambda e: int(e["seq"])):
            self.offer(event)


class RoomHub:
    def __init__(self, room_log: RoomLog) -> None:
        self.log = room_log
        self.subs: dict[str, set[Subscription]] = {}
        self.cursors: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="room-hub")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, STOP_WAIT_S)

    async def subscribe(
        self,
        room: str,
        after: int | None,
        deliver: Callable[[Event], None],
        head: int | None = None,
    ) -> Subscription:
        """Deliver every event of ``room`` with seq > ``after`` (None: from now on).
        ``head``: the room's last seq, just read by the caller (a round trip fewer)."""
        if after is None and room in self.cursors:
            # the reader already follows the room: go live from its cursor, no round trip
            sub = Subscription(room, self.cursors[room], deliver)
            self.subs.setdefault(room, set()).add(sub)
            sub.go_live([])
            return sub
        current = await self.log.last_seq(room) if head is None else head
        start = current if after is None else max(0, min(after, current))
        sub = Subscription(room, start, deliver)
        self.subs.setdefault(room, set()).add(sub)
        try:
            if room not in self.cursors:
                self.cursors[room] = current
            # always read from `start`: the reader may already have fanned out events past
            # `current` before this subscription was registered
            backlog = await self.log.since(room, start)
        except BaseException:  # cancelled or failed: leave nothing behind
            self.unsubscribe(sub)
            raise
        sub.go_live(backlog)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self.subs.get(sub.room)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self.subs[sub.room]
            self.cursors.pop(sub.room, None)

    def local_subscribers(self, room: str) -> int:
        return len(self.subs.get(room, ()))

    async def _run(self) -> None:
        delay = RETRY_S
        while True:
            try:
                async with contextlib.aclosing(self.log.live()) as feed:
                    async for events in feed:
                        if not events:  # listening (again): what did followed rooms gain?
                            delay = RETRY_S
                            for room in list(self.cursors):
                                await self._catch_up(room)
                            continue
                        for event in events:
                            room = event["room"]
                            cursor = self.cursors.get(room)
                            if cursor is None or event["seq"] <= cursor:
                                continue  # a room nobody here follows, or fanned out already
                            if event["seq"] > cursor + 1:
                                await self._catch_up(room)  # reads this one too
                                continue
                            self._fan_out(room, event)
            except Exception as exc:  # the one reader of every room must outlive any failure
                if isinstance(exc, MemoryUnavailable):
                    log.warning("room events paused: %s; retrying in %.1fs", exc, delay)
                else:
                    log.exception("room events paused; retrying in %.1fs", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _catch_up(self, room: str) -> None:
        cursor = self.cursors.get(room)
        if cursor is None:
            return
        for event in await self.log.since(room, cursor):
            if room in self.cursors and event["seq"] > self.cursors[room]:
                self._fan_out(room, event)

    def _fan_out(self, room: str, event: Event) -> None:
        self.cursors[room] = event["seq"]
        for sub in list(self.subs.get(room, ())):
            sub.offer(event)
