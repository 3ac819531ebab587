"""Sign-in on a server that requires a token (RAG_JWT_SECRET): the form, a refused token, a
minted one, and a session that survives a reload."""

from __future__ import annotations

import subprocess
import sys
import uuid

from playwright.sync_api import expect

from tests.browser.conftest import JWT_SECRET, SCREENSHOTS, UI, ChatServer
from tests.conftest import ROOT
from tests.rooms.conftest import base_env


def mint(user: str) -> str:
    """What an operator does: ``python -m rag_chat token --user NAME``."""
    result = subprocess.run(
        [sys.executable, "-m", "rag_chat", "token", "--user", user],
        cwd=ROOT,
        env={**base_env(), "RAG_JWT_SECRET": JWT_SECRET},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_sign_in_with_a_token(ui: UI, jwt_server: ChatServer) -> None:
    token = mint("alice")
    chat = ui.open("signin", server=jwt_server, connect=False)
    form = chat.by_id("signin-token")
    expect(form).to_be_visible()
    expect(chat.by_id("composer")).to_have_count(0)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    chat.page.screenshot(path=str(SCREENSHOTS / "desktop-light-signin.png"))

    # a token with a broken signature is refused, and the form stays
    form.fill(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"))
    chat.by_id("signin-submit").click()
    expect(chat.page.locator("#signin-error")).to_have_text("That token was not accepted.")
    assert not chat.page.context.cookies()

    form.fill(token)
    chat.by_id("signin-submit").click()
    chat.wait_status("connected")
    expect(chat.page.locator(".account .user")).to_have_text("alice")
    assert "rag_session" in {c["name"] for c in chat.page.context.cookies()}

    # the WebSocket is alice's: in a room she is listed under her token's name
    room = f"signin-{uuid.uuid4().hex[:6]}"
    chat.by_id("room-input").fill(room)
    chat.by_id("room-join").click()
    expect(chat.by_id("members")).to_have_text("alice (you)")

    # the session cookie survives a reload: no form again
    chat.page.reload()
    chat.wait_status("connected")
    expect(chat.by_id("signin-token")).to_have_count(0)
    expect(chat.page.locator(".account .user")).to_have_text("alice")
