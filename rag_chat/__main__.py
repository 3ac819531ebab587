"""``python -m rag_chat`` serves the chat (``--host``, ``--port``, ``--log-format``);
``python -m rag_chat token --user NAME`` mints an access token;
``python -m rag_chat schema`` prints the WebSocket protocol as JSON Schema."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

# uvicorn sends a WebSocket ping every WS_PING_S and drops peers that miss a pong
WS_PING_S = 20.0
OPEN_MODE_WARNING = """
  !! rag_chat is in OPEN DEVELOPMENT MODE: no RAG_JWT_SECRET or RAG_JWT_PUBLIC_KEY is set,
  !! so anyone who can reach this port can chat, read every conversation and use the LLM.
  !! Set RAG_JWT_SECRET (and mint tokens with `python -m rag_chat token --user NAME`)
  !! before exposing it.
"""


def _settings(**overrides: Any) -> Any:
    from rag_chat.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        print(
            f"rag_chat: bad setting {'.'.join(map(str, first['loc']))}: {first['msg']}",
            file=sys.stderr,
        )
        return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rag_chat token",
        description="Mint an access token (HS256 with RAG_JWT_SECRET, or RS256 with a private "
        "key) for the WebSocket, SSE, OpenAI-compatible and REST endpoints.",
    )
    parser.add_argument("--user", required=True, help="the user name (the token's subject)")
    parser.add_argument(
        "--days", type=float, default=7.0, help="how long it is valid (default: 7 days)"
    )
    parser.add_argument(
        "--room",
        action="append",
        dest="rooms",
        metavar="PATTERN",
        help="shared rooms this user may join (glob, repeatable); default: any",
    )
    parser.add_argument(
        "--private-key", type=Path, help="sign with RS256 using this PEM private key"
    )
    args = parser.parse_args(argv)
    settings = _settings()
    if settings is None:
        return 2
    if args.days <= 0:
        print("rag_chat token: --days must be positive", file=sys.stderr)
        return 2

    from rag_chat.auth import Authenticator

    key = None
    if args.private_key is not None:
        try:
            key = args.private_key.read_text()
        except OSError as exc:
            print(
                f"rag_chat token: cannot read {args.private_key}: {exc.strerror}", file=sys.stderr
            )
            return 2
    try:
        token = Authenticator(settings).mint(
            args.user, ttl_s=args.days * 86400, rooms=args.rooms, private_key=key
        )
    except ValueError as exc:
        print(f"rag_chat token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["token"]:
        return token_main(argv[1:])
    if argv[:1] == ["schema"]:  # the WebSocket protocol as JSON Schema (the UI's types)
        from rag_chat.api.protocol import schema_text

        sys.stdout.write(schema_text())
        return 0
    parser = argparse.ArgumentParser(prog="python -m rag_chat", description=__doc__)
    parser.add_argument("--host", help="interface to bind (default: RAG_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: RAG_PORT or 8000)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="text, or one JSON object per line (default: RAG_LOG_FORMAT or text)",
    )
    args = parser.parse_args(argv)
    settings = _settings(host=args.host, port=args.port, log_format=args.log_format)
    if settings is None:
        return 2

    from rag_chat.logs import configure_logging

    # uvicorn's own logs too (it runs with log_config=None below)
    configure_logging(args.log_level, settings.log_format, trace_ws=settings.trace_ws)
    if not settings.auth_required:
        if not is_loopback(settings.host) and not settings.allow_open:
            print(
                f"rag_chat: refusing to serve {settings.host} in open development mode (no auth): "
                "set RAG_JWT_SECRET, or RAG_ALLOW_OPEN=true to allow it anyway",
                file=sys.stderr,
            )
            return 2
        if settings.log_format == "json":  # one record, not a box a log shipper would split
            logging.getLogger("rag_chat").warning(
                " ".join(line.strip(" !") for line in OPEN_MODE_WARNING.strip().splitlines())
            )
        else:
            print(OPEN_MODE_WARNING, file=sys.stderr)

    import asyncio

    import uvicorn

    from rag_chat.api.ws import MAX_FRAME_BYTES
    from rag_chat.app import create_app
    from rag_chat.auth import Authenticator
    from rag_chat.errors import RagChatError
    from rag_chat.memory import open_memory
    from rag_chat.server import Server, ws_protocol

    try:
        Authenticator(settings)  # a public key that cannot be read: say so now
    except ValueError as exc:
        print(f"rag_chat: cannot start: {exc}", file=sys.stderr)
        return 1

    try:  # all local state lives there: a folder that cannot hold it is said now, in one line
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.data_dir / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        print(
            f"rag_chat: cannot start: RAG_DATA_DIR {settings.data_dir} cannot be written: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1

    async def preflight() -> None:
        # an explicitly configured Redis that does not answer: refuse to start, in one line
        memory = await open_memory(settings)
        await memory.aclose()

    try:
        asyncio.run(preflight())
    except RagChatError as exc:
        print(f"rag_chat: cannot start: {exc}", file=sys.stderr)
        return 1

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        log_config=None,  # configure_logging above formats uvicorn's records too
        ws=ws_protocol(),
        ws_ping_interval=WS_PING_S,
        ws_ping_timeout=WS_PING_S,
        ws_max_size=MAX_FRAME_BYTES,
        timeout_graceful_shutdown=10,
    )
    Server(config, app).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
