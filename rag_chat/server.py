"""uvicorn, adapted: a graceful drain before shutdown, and sockets of stalled clients released.

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
from typing import Any

import uvicorn
from fastapi import FastAPI

from rag_chat.app import drain

log = logging.getLogger(__name__)


def _dropping_protocol() -> Any:
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    except ImportError:  # pragma: no cover - another uvicorn: its default, as it is
        return "auto"

    class DroppingWebSocketsProtocol(WebSocketsSansIOProtocol):
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

    async def shutdown(self, sockets: Any = None) -> None:
        try:
            await drain(self.app)
        except Exception:
            log.exception("draining connections failed")
        await super().shutdown(sockets)


def ws_protocol() -> Any:
    return _dropping_protocol()
