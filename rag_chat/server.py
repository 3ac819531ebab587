"""uvicorn, adapted: a graceful drain before shutdown, sockets of stalled clients released,
short WebSocket messages sent uncompressed, and a WebSocket send the app can make from plain
code (``send_text_now``, offered in the scope's extensions) when nothing stands in its way.

uvicorn's WebSocket protocol ends a connection with ``transport.close()``, which waits for the
write buffer to drain: a client that stopped reading would hold its socket (and megabytes of
unsent data) for as long as it likes. ``DroppingWebSocketsProtocol`` resets such a connection
``close_timeout`` (10 s) after the app ended it or after a missed keepalive. It builds on
uvicorn's sans-I/O websockets protocol (uvicorn 0.54); where that is missing, uvicorn's
default is used as it is.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI
from websockets.exceptions import InvalidState
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import ExtensionName, ExtensionParameter

from rag_chat.api.ws import SEND_TEXT_NOW
from rag_chat.app import drain
from rag_chat.metrics import tune_gc

log = logging.getLogger(__name__)


# messages shorter than this go out uncompressed even when the client negotiated
# permessage-deflate (RFC 7692 lets either side send any message uncompressed)
COMPRESS_MIN_BYTES = 256


class SmallMessagesPlain(Extension):
    """permessage-deflate that leaves short messages uncompressed, the way Node's ``ws`` and
    Socket.IO do (their ``threshold``): a token's frame is ~100 bytes, which deflate barely
    shrinks, and compressing each one was a third of the cost of sending it
    (benchmarks/concurrency.py under py-spy). Longer messages (sources, history, a reply
    merged for a slow reader) are compressed as before."""

    name = ExtensionName("permessage-deflate")

    def __init__(self, inner: Extension, min_bytes: int = COMPRESS_MIN_BYTES) -> None:
        self.inner = inner
        self.min_bytes = min_bytes

    def decode(self, frame: Frame, *, max_size: int | None = None) -> Frame:
        return self.inner.decode(frame, max_size=max_size)

    def encode(self, frame: Frame) -> Frame:
        # a whole message in one frame (what the server sends): RSV1 stays clear, so the
        # client reads it as uncompressed; fragments follow their first frame's choice
        whole = frame.fin and frame.opcode in (Opcode.TEXT, Opcode.BINARY)
        if whole and len(frame.data) < self.min_bytes:
            return frame
        return self.inner.encode(frame)


class ThresholdDeflateFactory(ServerPerMessageDeflateFactory):
    def process_request_params(  # type: ignore[override]  # it returns a wrapper
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension]
    ) -> tuple[list[ExtensionParameter], Extension]:
        response, extension = super().process_request_params(params, accepted_extensions)
        return response, SmallMessagesPlain(extension)


MAX_PLAIN_FRAME = 1 << 16  # longer ones (rare) take websockets' own way


def _text_header(length: int) -> bytes:
    """The header of a whole, unmasked, uncompressed text frame (RFC 6455 5.2) of a payload
    of ``length`` < 65,536 bytes."""
    if length < 126:
        return bytes((0x81, length))
    return bytes((0x81, 126)) + length.to_bytes(2, "big")


def _dropping_protocol() -> Any:
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    except ImportError:  # pragma: no cover - another uvicorn: its default, as it is
        return "auto"

    class DroppingWebSocketsProtocol(WebSocketsSansIOProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.config.ws_per_message_deflate:
                # uvicorn's own settings, with short messages left uncompressed
                self.conn = ServerProtocol(
                    extensions=[
                        ThresholdDeflateFactory(
                            server_max_window_bits=12,
                            client_max_window_bits=12,
                            compress_settings={"memLevel": 5},
                        )
                    ],
                    max_size=self.config.ws_max_size,
                    logger=logging.getLogger("uvicorn.error"),
                )

        _plain_below: int | None = None

        @property
        def plain_below(self) -> int:
            """Text messages shorter than this go out as a plain frame: any length without
            an extension, below the threshold with ours, none with any other (known once
            the handshake is done, which ``send_text_now`` checks first)."""
            if self._plain_below is None:
                extensions = self.conn.extensions
                if not extensions:
                    self._plain_below = MAX_PLAIN_FRAME
                elif len(extensions) == 1 and isinstance(extensions[0], SmallMessagesPlain):
                    self._plain_below = extensions[0].min_bytes
                else:
                    self._plain_below = 0
            return self._plain_below

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            scope = getattr(self, "scope", None)
            if isinstance(scope, dict):  # the app's task starts later: it sees this
                scope.setdefault("extensions", {})[SEND_TEXT_NOW] = self.send_text_now

        def send_text_now(self, text: str) -> bool:
            """Send a text message at once, from plain code: True when it went to the socket;
            False when anything stands in the way (the socket's buffer is full, the
            handshake or the close is under way, the client is gone), and the app then
            sends through ASGI, which waits or raises as it should. The same steps as the
            ASGI send of a text message, without its coroutine and the four wrappers around
            it (Starlette's WebSocket, its exception middleware, the request-id middleware)."""
            if (
                self.disconnected
                or self.close_sent
                or not self.handshake_complete
                or self.initial_response is not None
                or not self.writable.is_set()
                or self.transport.is_closing()
            ):
                return False
            try:
                data = text.encode()
            except UnicodeEncodeError:  # the ASGI send reports it
                return False
            conn = self.conn
            if (
                len(data) < self.plain_below
                and conn.state is State.OPEN
                and not conn.expect_continuation_frame
                and not conn.writes
                and not conn.debug
            ):
                # what conn.send_text would write, without building and serialising a Frame
                # (a server's frames are unmasked; this one is uncompressed): that machinery
                # was about 2% of the server's loop at 1,000 clients (py-spy)
                self.transport.write(_text_header(len(data)) + data)
                return True
            try:
                conn.send_text(data)
            except InvalidState:  # the ASGI send reports it
                return False
            self.transport.write(b"".join(conn.data_to_send()))
            return True

        def _drop_later(self) -> None:
            if not self.disconnected:
                self.loop.call_later(self.close_timeout, self._drop)

        def _drop(self) -> None:
            if self.disconnected:
                return
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # RST: the kernel frees the unsent data too
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            log.info("dropped a connection whose client stopped reading")
            self.transport.abort()

        async def run_asgi(self) -> None:
            await super().run_asgi()
            self._drop_later()

        def keepalive_timeout(self) -> None:
            super().keepalive_timeout()
            self._drop_later()

    return DroppingWebSocketsProtocol


class Server(uvicorn.Server):
    """uvicorn closes WebSockets (1012) as its first shutdown step: end the replies in flight
    with their final events before that."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        tune_gc()

    async def shutdown(self, sockets: Any = None) -> None:
        try:
            await drain(self.app)
        except Exception:
            log.exception("draining connections failed")
        await super().shutdown(sockets)


def ws_protocol() -> Any:
    return _dropping_protocol()
