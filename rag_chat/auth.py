"""Who is asking (authentication) and what they may read (authorisation).

::

    token (JWT: HS256 with RAG_JWT_SECRET, or RS256 with RAG_JWT_PUBLIC_KEY)
        HTTP: ``Authorization: Bearer <token>`` or the ``rag_session`` cookie (set by the UI's
              sign-in, ``POST /api/auth/session``: HttpOnly, SameSite=Strict)
        WebSocket: the ``rag_session`` cookie, the subprotocol ``bearer.<token>`` (offered
              beside ``rag_chat``), an ``Authorization`` header, or a first ``auth`` event.
              Never the URL: URLs end up in access logs.
    ──► Principal(user, owner, rooms)

    conversations and rooms (Access, in Redis so every instance agrees):
        a private conversation belongs to the user who started it: only they can post to it,
        join (resume) it, read or delete its history; to anyone else it does not exist.
        a shared room may be joined by anyone whose token's ``rooms`` claim (glob patterns)
        matches its name; a token without the claim may join any shared room.
        The first use of a name decides which of the two it is.

Open development mode (no secret and no public key): everyone is the same anonymous owner
("local"), so there is nothing to authorise; the server says so loudly at start-up and binds
only to loopback addresses unless RAG_ALLOW_OPEN is set.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from rag_chat.errors import BadRequest, Forbidden, MemoryUnavailable, NotFound, Unauthorized
from rag_chat.settings import Settings
from rag_chat.text import one_line

log = logging.getLogger(__name__)

COOKIE = "rag_session"
SUBPROTOCOL = "rag_chat"
BEARER_PREFIX = "bearer."
OPEN_OWNER = "local"
MAX_TOKEN_CHARS = 8192
LEEWAY_S = 30
TITLE_CHARS = 80  # a conversation's title: its first question's start, or the one given it
_USER = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")


@dataclass(frozen=True)
class Principal:
    """``user`` is the name others see; ``owner`` is whom conversations belong to (the
    token's subject, or "local" for everyone in open mode); ``rooms`` the shared rooms
    allowed (glob patterns; None: any)."""

    user: str
    owner: str
    authenticated: bool
    rooms: tuple[str, ...] | None = None
    expires_at: float | None = None
    client: str = ""

    @property
    def limit_key(self) -> str:
        """Whose budget a request spends: the user, or the client address in open mode."""
        return f"user:{self.owner}" if self.authenticated else f"ip:{self.client or 'local'}"

    def may_join_shared(self, room: str) -> bool:
        return self.rooms is None or any(fnmatch.fnmatchcase(room, p) for p in self.rooms)


def anonymous(user: str = "guest", client: str = "") -> Principal:
    return Principal(user=user, owner=OPEN_OWNER, authenticated=False, client=client)


def _load_key(value: str | None) -> str | None:
    """PEM text as it is, or the path of a PEM file."""
    if not value:
        return None
    if "-----BEGIN" in value:
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text()
    except OSError as exc:
        raise ValueError(f"RAG_JWT_PUBLIC_KEY: cannot read {path}: {exc.strerror}") from exc


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.secret = settings.jwt_secret
        self.public_key = _load_key(settings.jwt_public_key)
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer

    @property
    def required(self) -> bool:
        return bool(self.secret or self.public_key)

    @property
    def mode(self) -> str:
        return "jwt" if self.required else "open"

    def verify(self, token: str | None, client: str = "") -> Principal:
        """The principal a token proves, or :class:`Unauthorized` saying why not."""
        if not token:
            raise Unauthorized("sign in: this server needs a token")
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("token too long")
        if not token.isascii():  # a JWT is base64url and dots
            raise Unauthorized("malformed token: not a JWT")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise Unauthorized("malformed token: not a JWT") from None
        key: str | None = {"HS256": self.secret, "RS256": self.public_key}.get(str(alg))
        if key is None:
            raise Unauthorized(f"tokens signed with {alg!r} are not accepted by this server")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[str(alg)],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired: get a new one") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not _USER.match(sub):
            raise Unauthorized("invalid token: 'sub' must be a user name of 1-64 characters")
        rooms = claims.get("rooms")
        if rooms is not None and not (
            isinstance(rooms, list) and all(isinstance(r, str) for r in rooms)
        ):
            raise Unauthorized("invalid token: 'rooms' must be a list of room patterns")
        return Principal(
            user=sub,
            owner=sub,
            authenticated=True,
            rooms=tuple(rooms) if rooms is not None else None,
            expires_at=float(claims["exp"]),
            client=client,
        )

    def mint(
        self,
        user: str,
        *,
        ttl_s: float = 7 * 24 * 3600,
        rooms: list[str] | None = None,
        private_key: str | None = None,
    ) -> str:
        """A token for ``user``: RS256 with ``private_key`` (PEM), else HS256 with the secret."""
        if not _USER.match(user):
            raise ValueError("user names are 1-64 printable characters")
        now = int(time.time())
        claims: dict[str, Any] = {"sub": user, "iat": now, "exp": now + int(ttl_s)}
        if rooms is not None:
            claims["rooms"] = rooms
        if self.audience:
            claims["aud"] = self.audience
        if self.issuer:
            claims["iss"] = self.issuer
        if private_key:
            return jwt.encode(claims, private_key, algorithm="RS256")
        if not self.secret:
            raise ValueError(
                "no key to sign with: set RAG_JWT_SECRET, or pass the RS256 private key"
            )
        return jwt.encode(claims, self.secret, algorithm="HS256")


def bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def token_from_subprotocols(offered: list[str]) -> str | None:
    for proto in offered:
        if proto.startswith(BEARER_PREFIX):
            return proto[len(BEARER_PREFIX) :]
    return None


# --- who owns what ---


class AccessStore(Protocol):
    async def claim_private(self, room: str, owner: str, title: str, now: float) -> bool:
        """True when ``room`` is (now) ``owner``'s private conversation."""
        ...

    async def open_room(self, room: str) -> tuple[str, str]:
        """(kind, owner) of ``room``, making it a shared room if it is new."""
        ...

    async def get(self, room: str) -> tuple[str, str] | None: ...

    async def conversations(
        self, owner: str, limit: int, before: float | None = None
    ) -> list[dict[str, Any]]:
        """``owner``'s conversations, newest first: ``limit`` of them, active before
        ``before`` (exclusive) when given."""
        ...

    async def forget(self, room: str, owner: str) -> None: ...

    async def rename(self, room: str, owner: str, title: str) -> bool:
        """True when ``room`` is ``owner``'s private conversation, now titled ``title``."""
        ...

    async def aclose(self) -> None: ...


_CLAIM = """
local kind = redis.call('HGET', KEYS[1], 'kind')
if not kind then
  redis.call('HSET', KEYS[1], 'kind', 'private', 'owner', ARGV[1], 'title', ARGV[3])
elseif kind ~= 'private' or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
elseif ARGV[3] ~= '' and (redis.call('HGET', KEYS[1], 'title') or '') == '' then
  redis.call('HSET', KEYS[1], 'title', ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

_RENAME = """
if redis.call('HGET', KEYS[1], 'kind') ~= 'private'
   or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'title', ARGV[2])
return 1
"""

_OPEN = """
local kind = redis.call('HGET', KEYS[1], 'kind')
if not kind then
  redis.call('HSET', KEYS[1], 'kind', 'room')
  kind = 'room'
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {kind, redis.call('HGET', KEYS[1], 'owner') or ''}
"""


class RedisAccess:
    def __init__(self, url: str, prefix: str, ttl_s: int) -> None:
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.1), retries=3)
        from rag_chat.rooms.log import redis_client  # a pool that waits, not fails

        self._redis: Any = redis_client(
            url, socket_connect_timeout=2, socket_timeout=5, retry=retry
        )
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._claim = self._redis.register_script(_CLAIM)
        self._open = self._redis.register_script(_OPEN)
        self._rename = self._redis.register_script(_RENAME)

    def _acl(self, room: str) -> str:
        return f"{self.prefix}acl:{room}"

    def _convs(self, owner: str) -> str:
        return f"{self.prefix}convs:{owner}"

    def _unavailable(self, exc: Exception) -> MemoryUnavailable:
        return MemoryUnavailable(f"Redis is not reachable to check access ({exc})")

    async def claim_private(self, room: str, owner: str, title: str, now: float) -> bool:
        try:
            ok = await self._claim(
                keys=[self._acl(room), self._convs(owner)],
                args=[owner, now, title, self.ttl_s, room],
            )
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        return bool(ok)

    async def open_room(self, room: str) -> tuple[str, str]:
        try:
            kind, owner = await self._open(keys=[self._acl(room)], args=[self.ttl_s])
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        return str(kind), str(owner)

    async def get(self, room: str) -> tuple[str, str] | None:
        try:
            acl = await self._redis.hgetall(self._acl(room))
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        return (acl["kind"], acl.get("owner", "")) if acl else None

    async def conversations(
        self, owner: str, limit: int, before: float | None = None
    ) -> list[dict[str, Any]]:
        key = self._convs(owner)
        out: list[dict[str, Any]] = []
        try:
            while len(out) < limit:
                want = limit - len(out)
                rows = await self._redis.zrevrangebyscore(
                    key,
                    "+inf" if before is None else f"({before!r}",
                    "-inf",
                    start=0,
                    num=want,
                    withscores=True,
                )
                if not rows:
                    break
                pipe = self._redis.pipeline(transaction=False)  # the titles in one round trip
                for room, _ in rows:
                    pipe.hget(self._acl(room), "title")
                gone = []
                for (room, ts), title in zip(rows, await pipe.execute(), strict=True):
                    if title is None:  # expired: dropped from the list for good
                        gone.append(room)
                    else:
                        out.append({"id": room, "title": title, "updated_at": ts})
                if gone:
                    await self._redis.zrem(key, *gone)
                if len(rows) < want:
                    break
                before = rows[-1][1]
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        return out

    async def forget(self, room: str, owner: str) -> None:
        try:
            await self._redis.zrem(self._convs(owner), room)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def rename(self, room: str, owner: str, title: str) -> bool:
        try:
            return bool(await self._rename(keys=[self._acl(room)], args=[owner, title]))
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def aclose(self) -> None:
        await self._redis.aclose()


class LocalAccess:
    def __init__(self) -> None:
        self._acl: dict[str, dict[str, str]] = {}
        self._convs: dict[str, dict[str, float]] = {}

    async def claim_private(self, room: str, owner: str, title: str, now: float) -> bool:
        acl = self._acl.setdefault(room, {"kind": "private", "owner": owner, "title": title})
        if acl["kind"] != "private" or acl["owner"] != owner:
            return False
        if title and not acl.get("title"):
            acl["title"] = title
        self._convs.setdefault(owner, {})[room] = now
        return True

    async def open_room(self, room: str) -> tuple[str, str]:
        acl = self._acl.setdefault(room, {"kind": "room"})
        return acl["kind"], acl.get("owner", "")

    async def get(self, room: str) -> tuple[str, str] | None:
        acl = self._acl.get(room)
        return (acl["kind"], acl.get("owner", "")) if acl else None

    async def conversations(
        self, owner: str, limit: int, before: float | None = None
    ) -> list[dict[str, Any]]:
        rows = sorted(
            ((r, t) for r, t in self._convs.get(owner, {}).items() if before is None or t < before),
            key=lambda r: -r[1],
        )[:limit]
        return [{"id": r, "title": self._acl[r].get("title", ""), "updated_at": t} for r, t in rows]

    async def forget(self, room: str, owner: str) -> None:
        self._convs.get(owner, {}).pop(room, None)

    async def rename(self, room: str, owner: str, title: str) -> bool:
        acl = self._acl.get(room)
        if acl is None or acl["kind"] != "private" or acl.get("owner") != owner:
            return False
        acl["title"] = title
        return True

    async def aclose(self) -> None:
        return None


class Access:
    """The checks every transport makes, in one place."""

    def __init__(self, store: AccessStore) -> None:
        self.store = store

    async def private(self, who: Principal, room: str, first_text: str = "") -> None:
        """``room`` is ``who``'s private conversation (claimed now if it is new)."""
        title = " ".join(first_text.split())[:TITLE_CHARS]
        if await self.store.claim_private(room, who.owner, title, time.time()):
            return
        found = await self.store.get(room)
        if found is not None and found[0] == "room":
            raise Forbidden(
                f"{room!r} is a shared room: join it and send with 'room', not 'conversation_id'"
            )
        raise NotFound(f"no conversation {room!r}")

    async def join(self, who: Principal, room: str) -> None:
        """``who`` may join ``room``: their own private conversation, or an allowed shared room."""
        kind, owner = await self.store.open_room(room)
        if kind == "private":
            if owner != who.owner:
                raise NotFound(f"no conversation {room!r}")
        elif not who.may_join_shared(room):
            raise Forbidden(f"you may not join room {room!r}")

    async def read(self, who: Principal, room: str) -> str:
        """``who`` may read ``room``'s history; returns its kind."""
        found = await self.store.get(room)
        if found is None:
            raise NotFound(f"no conversation {room!r}")
        kind, owner = found
        if kind == "private" and owner != who.owner:
            raise NotFound(f"no conversation {room!r}")
        if kind == "room" and not who.may_join_shared(room):
            raise Forbidden(f"you may not read room {room!r}")
        return kind

    async def rename(self, who: Principal, room: str, title: str) -> str:
        """Give ``who``'s private conversation ``room`` a title of their choosing (one line,
        at most TITLE_CHARS characters); returns it as kept. Anyone else's is 404."""
        kept = one_line(title)
        if not kept:
            raise BadRequest("the title is empty")
        if len(kept) > TITLE_CHARS:
            raise BadRequest(f"the title has {len(kept)} characters; at most {TITLE_CHARS}")
        if not await self.store.rename(room, who.owner, kept):
            found = await self.store.get(room)
            if found is not None and found[0] == "room" and who.may_join_shared(room):
                raise Forbidden(f"{room!r} is a shared room: its name is its id")
            raise NotFound(f"no conversation {room!r}")
        return kept

    async def delete(self, who: Principal, room: str) -> None:
        if await self.read(who, room) != "private":
            raise Forbidden(
                f"the history of shared room {room!r} cannot be deleted through the API"
            )
        await self.store.forget(room, who.owner)
