"""The room event log: every event of a room, numbered by a room-wide increasing ``seq``.

Redis: one stream per room, ``{prefix}room:{room}:log``, whose entry ids are ``{seq}-0``; a
Lua script takes the next seq (INCR), appends (XADD, capped with MAXLEN ~) and publishes what
it appended on the instance-wide channel ``{prefix}room-events``, atomically, so the order in
the stream is the order everyone sees, on every instance. A reader that knows its last seq
reads exactly what it missed with XRANGE; ``live()`` follows every room at once from the
channel: one connection, work per event rather than per room followed (an XREAD over every
room an instance follows costs its size on every read: a third of the server's time at 250
streaming answers).

``LocalRoomLog`` is the single-process implementation (used when Redis is not configured and
not running): the same contract over in-process deques.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

import hiredis
import redis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from rag_chat.errors import MemoryUnavailable

try:  # installed with chromadb; the stdlib gives the same values, several times slower
    import orjson
except ImportError:  # pragma: no cover
    orjson = None  # type: ignore[assignment]

Event = dict[str, Any]

LOG_MAXLEN = 10_000  # events kept per room (approximately: MAXLEN ~)
LOG_TTL_S = 7 * 24 * 3600  # a room's log expires a week after its last event
# an answer streaming: (room, its message_id, the message it replies to)
Lease = tuple[str, str, str]

# the leases of streaming answers: one sorted set, member = [room, message_id, reply_to] as
# JSON, score = when the lease lapses (Redis' clock: instances' clocks may differ)
_LEASE = """
if ARGV[1] == 'release' then
  return redis.call('ZREM', KEYS[1], ARGV[2])
end
local t = redis.call('TIME')
local expires = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], expires, ARGV[i])
end
redis.call('EXPIRE', KEYS[1], math.floor(tonumber(ARGV[2]) * 10 + 60))
return #ARGV - 2
"""
_LAPSED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
end
return gone
"""
LIVE_PING_S = 5.0  # the live connection pings Redis this often …
LIVE_DEAD_S = 15.0  # … and counts it gone after this long without a byte from it
MAX_FLUSHES = 4  # appends' pipelines in flight at once; more appends wait for the next one
MAX_BATCH = 2000  # appends in one pipeline
POOL_SIZE = 256  # connections per client: commands in flight beyond that wait for one
PIPE_TIMEOUT_S = 5.0  # the longest wait for an append's reply before the connection counts as lost
POOL_WAIT_S = 15.0  # the longest wait for a connection (overload) before Redis counts as down

# events in ARGV order get seqs first+1 … first+n (first is returned), atomically; ARGV after
# the events: MAXLEN, TTL, the live channel, the room. What is published: the room, first,
# then the events, one a line (JSON holds no raw newline; room names hold none either)
_APPEND = """
local n = #ARGV - 4
local first = redis.call('INCRBY', KEYS[2], n) - n
for i = 1, n do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[n + 1], (first + i) .. '-0', 'e', ARGV[i])
end
redis.call('EXPIRE', KEYS[1], ARGV[n + 2])
redis.call('EXPIRE', KEYS[2], ARGV[n + 2])
local live = ARGV[n + 4] .. '\\n' .. first .. '\\n' .. table.concat(ARGV, '\\n', 1, n)
redis.call('PUBLISH', ARGV[n + 3], live)
return first
"""


class RoomLog(Protocol):
    kind: str

    async def append(self, room: str, event: Event) -> Event: ...

    async def append_many(self, room: str, events: Sequence[Event]) -> list[Event]:
        """``events`` appended in order, atomically, with consecutive seqs."""
        ...

    def append_soon(self, room: str, events: Sequence[Event]) -> asyncio.Future[Any]:
        """``append_many`` without a coroutine for the caller to run: the future is done
        when the events are in the log (its result is not theirs: they are not returned) or
        failed; cancelling it drops the events if they have not gone out yet. What a reply
        relaying a token to the log costs the event loop, per token."""
        ...

    async def since(self, room: str, after: int, limit: int = LOG_MAXLEN) -> list[Event]: ...

    def live(self) -> AsyncGenerator[list[Event], None]:
        """Every room's events from now on, as they are appended: each room's in seq order.

        The first batch is empty: it says the iterator is listening (what was appended before
        it may be missing: read it with ``since``). A lost connection raises
        ``MemoryUnavailable``; what was appended while it was away is read with ``since``."""
        ...

    async def last_seq(self, room: str) -> int: ...

    async def claim(self, room: str, client_id: str, ttl_s: float) -> bool: ...

    async def hold_replies(self, replies: Sequence[Lease], ttl_s: float) -> None:
        """Leases on answers streaming on this instance, ``ttl_s`` from now (by Redis' clock),
        taken again before they lapse for as long as the answers run."""
        ...

    async def release_reply(self, lease: Lease) -> None:
        """An answer ended: its lease goes."""
        ...

    async def lapsed_replies(self) -> list[Lease]:
        """Answers whose leases lapsed — their instance died mid-answer —, each handed to one
        caller only (taken out as they are returned)."""
        ...

    async def aclose(self) -> None: ...


def driver_options() -> dict[str, Any]:
    """redis-py's client name and version given to each connection ready-made: otherwise
    every new connection reads the installed package's metadata for them (1 ms of the event
    loop each; a burst of joins grows several pools by hundreds of connections)."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py before 7: nothing of the kind is looked up
        return {}
    return {"driver_info": DriverInfo(lib_version=redis.__version__)}


def redis_client(url: str, max_connections: int = POOL_SIZE, **options: Any) -> Any:
    """A client whose callers wait for one of ``max_connections`` connections (at most
    ``POOL_WAIT_S``) rather than fail: redis-py's default pool raises "Too many connections"
    past 100 commands in flight, which a few hundred streaming answers reach."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        decode_responses=True,
        **driver_options(),
        **options,
    )
    return Redis.from_pool(pool)


def live_channel(prefix: str) -> str:
    """The channel every room's appends are published on (pub/sub ignores the DB number)."""
    return f"{prefix}room-events"


def _timed(events: Sequence[Event]) -> list[Event]:
    """The events, each with a ``ts`` (its own, or now)."""
    now = time.time()
    return [{**e, "ts": e.get("ts") or now} for e in events]


def _stamp(room: str, seq: int, event: Event) -> Event:
    return {**event, "room": room, "seq": seq}


def _encode(event: Event) -> str | bytes:
    if orjson is not None:
        try:
            return orjson.dumps(event)
        except (TypeError, orjson.JSONEncodeError):  # a lone surrogate, a huge integer
            pass
    return json.dumps(event)


def _decode(raw: str | bytes) -> Event:
    if orjson is not None:
        try:
            event: Event = orjson.loads(raw)
            return event
        except orjson.JSONDecodeError:  # a lone surrogate escaped by the stdlib
            pass
    decoded: Event = json.loads(raw)
    return decoded


class _Pipe:
    """One plain connection that pipelines commands: each ``execute`` writes its commands at
    once and gets their replies in order (hiredis parses them), several batches in flight.
    What redis-py's pipeline costs per command (packing, response callbacks, retries) was a
    sixth of the event loop with 500 answers streaming. A lost connection fails what is in
    flight; the next batch connects again."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: deque[tuple[int, list[Any], asyncio.Future[list[Any]]]] = deque()
        self._connecting: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[None] | None = None

    async def execute(self, commands: list[bytes]) -> list[Any]:
        writer = self._writer
        if writer is None or writer.is_closing():
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
            try:
                await asyncio.shield(self._connecting)
            finally:
                if self._connecting is not None and self._connecting.done():
                    self._connecting = None
            writer = self._writer
            assert writer is not None
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append((len(commands), [], future))
        writer.write(b"".join(commands))
        try:
            return await asyncio.wait_for(asyncio.shield(future), PIPE_TIMEOUT_S)
        except TimeoutError:
            self._fail(OSError(f"no reply from Redis in {PIPE_TIMEOUT_S:g} s"))
            raise OSError(f"no reply from Redis in {PIPE_TIMEOUT_S:g} s") from None

    async def _connect(self) -> None:
        reader, writer = await _open_redis(self._url, select_db=True)
        self._writer = writer
        self._reading = asyncio.ensure_future(self._read(reader, writer))

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader(encoding="utf-8", errors="replace")
        waiting = self._waiting
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    raise OSError("Redis closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    count, replies, future = waiting[0]
                    replies.append(reply)
                    if len(replies) == count:
                        waiting.popleft()
                        if not future.done():
                            future.set_result(replies)
        except (OSError, IndexError) as exc:
            if self._writer is writer:
                self._fail(exc if isinstance(exc, OSError) else OSError("unexpected reply"))
        except asyncio.CancelledError:
            if self._writer is writer:
                self._fail(OSError("connection closed"))
            raise

    def _fail(self, exc: OSError) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.transport.abort()
        waiting, self._waiting = self._waiting, deque()
        for _, _, future in waiting:
            if not future.done():
                future.set_exception(exc)

    async def aclose(self) -> None:
        self._fail(OSError("connection closed"))
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading


class _Batcher:
    """Runs one Lua script for many callers: the calls made while the event loop goes round
    once go to Redis as one pipeline (one write, one read), with up to ``MAX_FLUSHES``
    pipelines in flight. Per call that saves a connection checkout, a round trip of its own
    and two system calls: with hundreds of answers streaming, most of what an append cost."""

    def __init__(self, url: str, script: str) -> None:
        self._pipe = _Pipe(url)
        self._script = script
        self._sha = hashlib.sha1(script.encode()).hexdigest()
        self._queue: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()

    async def run(self, keys: list[str], args: list[Any]) -> Any:
        return await self.submit(keys, args)

    def submit(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """The script's result, when the pipeline it goes out in has its reply (cancel the
        future to drop a call not sent yet)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((keys, args, future))
        self._schedule(loop)
        return future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._queue and len(self._flushes) < MAX_FLUSHES:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        batch = [call for call in batch if not call[2].done()]  # cancelled callers
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._schedule(asyncio.get_running_loop())

    async def _send(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        results: list[Any]
        try:
            results = await self._pipeline(batch)
            again = [i for i, r in enumerate(results) if _no_script(r)]
            if again:  # the first call, or Redis lost its scripts: load it, run those again
                (loaded,) = await self._pipe.execute([_command("SCRIPT", "LOAD", self._script)])
                if isinstance(loaded, hiredis.ReplyError):
                    raise OSError(f"SCRIPT LOAD refused: {loaded}")
                redone = await self._pipeline([batch[i] for i in again])
                for i, result in zip(again, redone, strict=True):
                    results[i] = result
        except OSError as exc:
            results = [exc] * len(batch)
        except BaseException as exc:  # cancelled (shutdown): the callers must not hang
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(MemoryUnavailable(f"room event not written ({exc!r})"))
            raise
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, hiredis.ReplyError):
                future.set_exception(MemoryUnavailable(f"Redis refused a room event ({result})"))
            elif isinstance(result, BaseException):
                future.set_exception(
                    MemoryUnavailable(f"Redis is not reachable for room events ({result})")
                )
            else:
                future.set_result(result)

    async def _pipeline(
        self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        sha = self._sha
        return await self._pipe.execute(
            [_command("EVALSHA", sha, len(keys), *keys, *args) for keys, args, _ in batch]
        )

    async def aclose(self) -> None:
        await self._pipe.aclose()


def _no_script(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


class RedisRoomLog:
    kind = "redis"

    def __init__(self, url: str, prefix: str = "rag:") -> None:
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.1), retries=3)
        self._redis: Any = redis_client(
            url, socket_connect_timeout=2, socket_timeout=5, retry=retry
        )
        self._url = url
        self.prefix = prefix
        self.channel = live_channel(prefix)
        self._batch = _Batcher(url, _APPEND)
        # each answer takes and releases a lease: on the batched pipe, as appends are
        self._leases = _Batcher(url, _LEASE)

    def _keys(self, room: str) -> tuple[str, str]:
        return f"{self.prefix}room:{room}:log", f"{self.prefix}room:{room}:seq"

    async def append(self, room: str, event: Event) -> Event:
        return (await self.append_many(room, [event]))[0]

    async def append_many(self, room: str, events: Sequence[Event]) -> list[Event]:
        if not events:
            return []
        events = _timed(events)
        first = await self._submit(room, events)
        return [_stamp(room, int(first) + i, e) for i, e in enumerate(events, 1)]

    def append_soon(self, room: str, events: Sequence[Event]) -> asyncio.Future[Any]:
        return self._submit(room, _timed(events))

    def _submit(self, room: str, events: Sequence[Event]) -> asyncio.Future[Any]:
        return self._batch.submit(
            list(self._keys(room)),
            [*(_encode(e) for e in events), LOG_MAXLEN, LOG_TTL_S, self.channel, room],
        )

    async def since(self, room: str, after: int, limit: int = LOG_MAXLEN) -> list[Event]:
        key = self._keys(room)[0]
        try:
            rows = await self._redis.xrange(key, min=f"{after + 1}-0", max="+", count=limit)
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for room events ({exc})") from exc
        return [_stamp(room, int(eid.split("-")[0]), _decode(f["e"])) for eid, f in rows]

    async def live(self) -> AsyncGenerator[list[Event], None]:
        # A connection of its own, read with hiredis directly: one wake-up per read from the
        # socket, however many events it brings (redis-py's PubSub costs a coroutine chain per
        # message). A ping every LIVE_PING_S; nothing heard for LIVE_DEAD_S: Redis is gone.
        try:
            reader, writer = await _open_redis(self._url)
        except (OSError, TimeoutError, ValueError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for room events ({exc})") from exc
        parser = hiredis.Reader(encoding="utf-8", errors="replace")
        heard = time.monotonic()

        async def ping() -> None:
            while True:
                await asyncio.sleep(LIVE_PING_S)
                if time.monotonic() - heard > LIVE_DEAD_S:
                    writer.transport.abort()  # the read below ends
                    return
                writer.write(_command("PING"))

        pinger = asyncio.create_task(ping())
        try:
            writer.write(_command("SUBSCRIBE", self.channel))
            listening = False
            while True:
                try:
                    data = await reader.read(1 << 16)
                except OSError as exc:
                    raise MemoryUnavailable(f"room events connection lost ({exc})") from exc
                if not data:
                    raise MemoryUnavailable("room events connection lost (closed by Redis)")
                heard = time.monotonic()
                parser.feed(data)
                batch: list[Event] = []
                while (reply := parser.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise MemoryUnavailable(f"Redis refused the room events feed ({reply})")
                    if reply[0] == "message":
                        batch.extend(_published(reply[2]))
                    elif reply[0] == "subscribe":
                        listening = True
                        yield []
                if batch and listening:
                    yield batch
        finally:
            pinger.cancel()
            writer.transport.abort()

    async def last_seq(self, room: str) -> int:
        try:
            value = await self._redis.get(self._keys(room)[1])
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for room events ({exc})") from exc
        return int(value or 0)

    async def claim(self, room: str, client_id: str, ttl_s: float) -> bool:
        """True the first time ``client_id`` is seen in ``room`` (idempotent sends)."""
        key = f"{self.prefix}room:{room}:cid:{client_id}"
        try:
            return bool(await self._redis.set(key, "1", nx=True, ex=int(ttl_s)))
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for room events ({exc})") from exc

    def _lease_key(self) -> str:
        return f"{self.prefix}replies"

    async def hold_replies(self, replies: Sequence[Lease], ttl_s: float) -> None:
        for i in range(0, len(replies), 500):
            members = [json.dumps(list(r)) for r in replies[i : i + 500]]
            await self._leases.run([self._lease_key()], ["hold", ttl_s, *members])

    async def release_reply(self, lease: Lease) -> None:
        await self._leases.run([self._lease_key()], ["release", json.dumps(list(lease))])

    async def lapsed_replies(self) -> list[Lease]:
        try:
            gone = await self._redis.eval(_LAPSED, 1, self._lease_key())
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for answer leases ({exc})") from exc
        out: list[Lease] = []
        for raw in gone:
            with contextlib.suppress(ValueError, TypeError):
                room, message_id, reply_to = json.loads(raw)
                out.append((str(room), str(message_id), str(reply_to)))
        return out

    async def aclose(self) -> None:
        await self._batch.aclose()
        await self._leases.aclose()
        await self._redis.aclose()


def _published(message: str) -> list[Event]:
    """A live message: the room, the first event's seq, then the events, one a line."""
    room, first, *lines = message.split("\n")
    seq = int(first)
    return [_stamp(room, seq + i, _decode(line)) for i, line in enumerate(lines, 1)]


def _command(*args: str | bytes | int) -> bytes:
    """One command in RESP, the Redis wire format."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


async def _open_redis(
    url: str, *, select_db: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain connection to the Redis of ``url`` (TCP, TLS or a Unix socket), authenticated,
    and on the URL's database with ``select_db`` (pub/sub ignores the database number: its
    channels are server-wide, hence the prefix)."""
    params = parse_url(url)
    path = params.get("path")
    if path:
        opening = asyncio.open_unix_connection(path)
    else:
        tls: ssl.SSLContext | None = None
        if url.startswith("rediss://"):
            tls = ssl.create_default_context()
            if str(params.get("ssl_cert_reqs", "required")).lower() in ("none", "optional"):
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        opening = asyncio.open_connection(
            params.get("host", "localhost"), int(params.get("port", 6379)), ssl=tls
        )
    reader, writer = await asyncio.wait_for(opening, 2)
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    password = params.get("password")
    if password:
        username = params.get("username")
        await _ask(reader, writer, "AUTH", *([username] if username else []), password)
    if select_db and params.get("db"):
        await _ask(reader, writer, "SELECT", str(params["db"]))
    return reader, writer


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *args: str) -> Any:
    """One command and its reply, on a connection nothing else uses yet."""
    writer.write(_command(*args))
    parser = hiredis.Reader(encoding="utf-8")
    reply: Any = False
    while reply is False:
        data = await asyncio.wait_for(reader.read(1 << 12), 2)
        if not data:
            writer.transport.abort()
            raise OSError("Redis closed the connection")
        parser.feed(data)
        reply = parser.gets()
    if isinstance(reply, hiredis.ReplyError):
        writer.transport.abort()
        raise OSError(f"{args[0]} refused: {reply}")
    return reply


class LocalRoomLog:
    kind = "memory"

    def __init__(self) -> None:
        self._logs: dict[str, deque[Event]] = {}
        self._seq: dict[str, int] = {}
        self._listeners: set[asyncio.Queue[list[Event]]] = set()
        self._claimed: dict[tuple[str, str], float] = {}

    async def append(self, room: str, event: Event) -> Event:
        seq = self._seq.get(room, 0) + 1
        self._seq[room] = seq
        stamped = _stamp(room, seq, {**event, "ts": event.get("ts") or time.time()})
        self._logs.setdefault(room, deque(maxlen=LOG_MAXLEN)).append(stamped)
        self._publish([stamped])
        return stamped

    async def append_many(self, room: str, events: Sequence[Event]) -> list[Event]:
        now = time.time()
        log = self._logs.setdefault(room, deque(maxlen=LOG_MAXLEN))
        out = []
        for event in events:
            seq = self._seq.get(room, 0) + 1
            self._seq[room] = seq
            stamped = _stamp(room, seq, {**event, "ts": event.get("ts") or now})
            log.append(stamped)
            out.append(stamped)
        if out:
            self._publish(out)
        return out

    def append_soon(self, room: str, events: Sequence[Event]) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self.append_many(room, events))

    def _publish(self, events: list[Event]) -> None:
        for queue in self._listeners:
            queue.put_nowait(events)

    async def since(self, room: str, after: int, limit: int = LOG_MAXLEN) -> list[Event]:
        return [e for e in self._logs.get(room, ()) if e["seq"] > after][:limit]

    async def live(self) -> AsyncGenerator[list[Event], None]:
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            yield []
            while True:
                batch = list(await queue.get())
                while not queue.empty():
                    batch.extend(queue.get_nowait())
                yield batch
        finally:
            self._listeners.discard(queue)

    async def last_seq(self, room: str) -> int:
        return self._seq.get(room, 0)

    # one process: an answer cannot outlive its instance, no lease needed
    async def hold_replies(self, replies: Sequence[Lease], ttl_s: float) -> None:
        return None

    async def release_reply(self, lease: Lease) -> None:
        return None

    async def lapsed_replies(self) -> list[Lease]:
        return []

    async def claim(self, room: str, client_id: str, ttl_s: float) -> bool:
        now = time.monotonic()
        if self._claimed.get((room, client_id), 0) > now:
            return False
        self._claimed[(room, client_id)] = now + ttl_s
        return True

    async def aclose(self) -> None:
        return None
