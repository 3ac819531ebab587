"""Everything a running server holds, built once in the app's lifespan from settings.

No module-level clients: tests build their own ``Services`` (a FakeLLM, an isolated Redis
prefix, a temp data dir) and hand it to ``create_app``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from rag_chat.auth import Access, AccessStore, Authenticator, LocalAccess, RedisAccess
from rag_chat.chat import ChatService
from rag_chat.limits import Limits, LimitStore, LocalLimitStore, RedisLimitStore
from rag_chat.llm import LLM, build_llm
from rag_chat.memory import Memory, open_memory
from rag_chat.metrics import Metrics
from rag_chat.retrieval.embedder import Embedder
from rag_chat.retrieval.process import SearchProcess
from rag_chat.retrieval.search import Retriever
from rag_chat.retrieval.store import Hit
from rag_chat.rooms import (
    LocalPresence,
    LocalRoomLog,
    Presence,
    RedisPresence,
    RedisRoomLog,
    RoomLog,
    Rooms,
)
from rag_chat.settings import Settings
from rag_chat.uploads import JobStore, LocalJobStore, RedisJobStore, Uploads

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    llm: LLM
    memory: Memory
    retriever: Retriever
    chat: ChatService
    rooms: Rooms
    auth: Authenticator
    access: Access
    limits: Limits
    uploads: Uploads
    metrics: Metrics = field(default_factory=Metrics)
    search_process: SearchProcess | None = None

    def __post_init__(self) -> None:
        # one registry for everything this app measures
        self.chat.metrics = self.metrics
        self.rooms.chat.metrics = self.metrics
        self.limits.on_hit = self.metrics.rate_limited
        hub = self.rooms.hub
        self.metrics.rooms.set_function(lambda: len(hub.subs))
        proc = self.search_process
        self.metrics.search_process_ready.set_function(lambda: int(bool(proc and proc.ready)))

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        llm: LLM | None = None,
        memory: Memory | None = None,
        embedder: Embedder | None = None,
    ) -> Services:
        memory = memory or await open_memory(settings)
        embedder = embedder or Embedder.from_settings(settings)
        retriever = await asyncio.to_thread(Retriever, settings, embedder=embedder)
        # load torch and the weights now, not on the first user's question
        await asyncio.to_thread(embedder.encode, ["warm up"])
        await asyncio.to_thread(retriever.keyword_index)
        llm = llm or build_llm(settings)
        load = getattr(llm, "load", None)
        if load is not None:
            await load()
        if retriever.store.count() == 0:
            log.warning(
                "the collection %r is empty: answers will have no sources. "
                "Run `python -m ingest data/` (or your own folder) first.",
                retriever.collection,
            )

        def search(query: str, k: int) -> list[Hit]:
            return retriever.search(query, k, "hybrid")

        search_process = SearchProcess(settings) if settings.search_process else None
        if search_process is not None:
            search_process.start()  # ready in seconds; until then searches run here
        chat = ChatService(
            llm,
            memory,
            search,
            top_k=settings.top_k,
            history_turns=settings.history_turns,
            min_relevance=settings.min_relevance if settings.min_relevance > -1 else None,
            embedder=embedder,  # the citation check
            search_async=search_process.search if search_process is not None else None,
        )
        # room events live where the memory lives: Redis shared by every instance, or this
        # process alone when memory fell back to in-process
        room_log: RoomLog
        presence: Presence
        access_store: AccessStore
        limit_store: LimitStore
        job_store: JobStore
        if memory.kind == "redis":
            room_log = RedisRoomLog(settings.redis_url, settings.redis_prefix)
            presence = RedisPresence(
                settings.redis_url, settings.redis_prefix, settings.presence_ttl_seconds
            )
            access_store = RedisAccess(
                settings.redis_url, settings.redis_prefix, settings.memory_ttl_seconds
            )
            limit_store = RedisLimitStore(settings.redis_url, settings.redis_prefix)
            job_store = RedisJobStore(settings.redis_url, settings.redis_prefix)
        else:
            local_log = LocalRoomLog()
            room_log, presence = local_log, LocalPresence(local_log)
            access_store, limit_store, job_store = LocalAccess(), LocalLimitStore(), LocalJobStore()
        limits = Limits(
            limit_store,
            messages_per_minute=settings.rate_limit_per_minute,
            max_connections=settings.max_connections_per_user,
            max_replies=settings.max_replies_per_user,
        )
        limits.start()
        rooms = Rooms(
            room_log,
            presence,
            chat,
            memory,
            presence_ttl_s=settings.presence_ttl_seconds,
            typing_ttl_s=settings.typing_ttl_seconds,
            reply_grace_s=settings.reply_grace_seconds,
            limits=limits,
        )
        await rooms.start()
        uploads = Uploads(settings, job_store, embedder)
        uploads.start()
        return cls(
            settings,
            llm,
            memory,
            retriever,
            chat,
            rooms,
            Authenticator(settings),
            Access(access_store),
            limits,
            uploads,
            search_process=search_process,
        )

    async def aclose(self) -> None:
        if self.search_process is not None:
            await self.search_process.aclose()
        await self.rooms.stop()
        await self.rooms.log.aclose()
        await self.rooms.presence.aclose()
        await self.limits.aclose()
        await self.uploads.aclose()
        await self.access.store.aclose()
        await self.llm.aclose()
        await self.memory.aclose()
