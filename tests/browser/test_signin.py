"""Sign-in on a server that requires a token (RAG_JWT_SECRET): the form, a refused token, a
minted one, and a session that survives a reload."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import httpx
from playwright.sync_api import expect
from websockets.sync.client import connect
from websockets.typing import Subprotocol

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


def test_more_conversations_than_a_page_show_on_request(ui: UI, jwt_server: ChatServer) -> None:
    """The list shows the newest 100; "Show older conversations" loads the rest."""
    user = f"pager-{uuid.uuid4().hex[:6]}"
    token = mint(user)
    url = jwt_server.url.replace("http", "ws", 1) + "/ws"
    with connect(url, subprotocols=[Subprotocol("rag_chat"), Subprotocol(f"bearer.{token}")]) as ws:
        for i in range(103):  # what a private join claims: a conversation of this user's
            ws.send(json.dumps({"type": "join", "room": f"{user}-c{i:03}", "private": True}))
            while json.loads(ws.recv(timeout=30))["type"] != "joined":
                pass
    renamed = httpx.patch(  # one of the older ones gets a title to find it by
        f"{jwt_server.url}/api/conversations/{user}-c010",
        json={"title": "Quarterly budget notes"},
        headers={"authorization": f"Bearer {token}"},
    )
    assert renamed.status_code == 200, renamed.text
    chat = ui.open("pager", server=jwt_server, connect=False)
    chat.by_id("signin-token").fill(token)
    chat.by_id("signin-submit").click()
    chat.wait_status("connected")
    items = chat.page.locator(".sidebar .list li .item")
    expect(items).to_have_count(100)
    older = chat.by_id("older-conversations")
    older.click()
    expect(items).to_have_count(103)
    expect(older).to_have_count(0)  # nothing older left
    labels = chat.by_id("rename-conversation").evaluate_all(
        "els => els.map((e) => e.getAttribute('aria-label'))"
    )  # untitled conversations are named by their ids: newest first, then the older page
    names = [f"{user}-c{i:03}" for i in reversed(range(103))]
    names[102 - 10] = "Quarterly budget notes"
    assert labels == [f"Rename conversation {name}" for name in names]

    # the filter keeps the conversations whose titles hold every word typed
    box = chat.by_id("conversation-filter")
    box.fill("BUDGET quarterly")
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("Quarterly budget notes")
    box.fill("budget 2025")
    expect(items).to_have_count(0)
    expect(chat.page.locator(".sidebar .list li.hint")).to_have_text(
        "No conversation titles match “budget 2025”."
    )
    box.fill("")
    expect(items).to_have_count(103)
