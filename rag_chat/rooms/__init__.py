"""Rooms, presence, typing, the ordered per-room event log, resume and cross-instance fan-out."""

from rag_chat.rooms.hub import RoomHub, Subscription
from rag_chat.rooms.log import Event, LocalRoomLog, RedisRoomLog, RoomLog
from rag_chat.rooms.presence import LocalPresence, Presence, RedisPresence
from rag_chat.rooms.service import Member, Rooms, check_room

__all__ = [
    "Event", "LocalPresence", "LocalRoomLog", "Member", "Presence", "RedisPresence",
    "RedisRoomLog", "RoomHub", "RoomLog", "Rooms", "Subscription", "check_room",
]  # fmt: skip
