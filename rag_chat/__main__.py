"""``python -m rag_chat`` serves the chat (``--host``, ``--port``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

# uvicorn sends a WebSocket ping every WS_PING_S and drops peers that miss a pong
WS_PING_S = 20.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rag_chat", description=__doc__)
    parser.add_argument("--host", help="interface to bind (default: RAG_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: RAG_PORT or 8000)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)

    from rag_chat.settings import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        print(
            f"rag_chat: bad setting {'.'.join(map(str, first['loc']))}: {first['msg']}",
            file=sys.stderr,
        )
        return 2

    import asyncio

    import uvicorn

    from rag_chat.app import create_app
    from rag_chat.errors import RagChatError
    from rag_chat.memory import open_memory

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    async def preflight() -> None:
        # an explicitly configured Redis that does not answer: refuse to start, in one line
        memory = await open_memory(settings)
        await memory.aclose()

    try:
        asyncio.run(preflight())
    except RagChatError as exc:
        print(f"rag_chat: cannot start: {exc}", file=sys.stderr)
        return 1

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        ws_ping_interval=WS_PING_S,
        ws_ping_timeout=WS_PING_S,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
