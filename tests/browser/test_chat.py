"""A private conversation in the browser against the real model: the answer streams in with its
sources (then is copied, exported, regenerated and rated, and its question edited), Stop cancels
it in the backend, a dropped connection resumes the answer without a gap or a repeat, and an
uploaded document is found by the next question.

The embedded SmolLM2-135M answers poorly and rarely cites, so nothing here checks what an answer
says: only that text streams, ends, and matches what the server stored.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from playwright.sync_api import FilePayload, expect

from tests.browser.conftest import (
    AI_MESSAGES,
    ANSWER_S,
    UI,
    USER_MESSAGES,
    ChatPage,
    ChatServer,
    norm,
)
from tests.conftest import ROOT

GUIDE_FILES = {p.name for p in (ROOT / "data" / "guide").iterdir()}


def stored_answer(server: ChatServer, chat: ChatPage) -> dict[str, Any]:
    """The conversation as the server stored it: one question, one answer."""
    messages = server.messages(chat.conversation_id())
    assert [m["role"] for m in messages] == ["user", "assistant"], messages
    return messages[1]


def check_source_panel(chat: ChatPage, source: dict[str, Any]) -> None:
    panel = chat.by_id("source-panel")
    expect(panel).to_be_visible()
    expect(panel.locator("h2 .n")).to_have_text(f"[{source['n']}]")
    file = panel.locator("dt", has_text="File").locator("xpath=following-sibling::dd[1]")
    expect(file).to_have_text(source["source"])
    assert norm(panel.locator(".snippet").inner_text()) == norm(source["snippet"])
    chat.page.keyboard.press("Escape")
    expect(panel).to_have_count(0)


def test_answer_streams_in_with_its_sources(ui: UI, chat_server: ChatServer) -> None:
    chat = ui.open()
    chat.start_sampler()
    chat.ask("How do I ingest PDF files?")
    chat.wait_answer_done(0)
    samples = chat.stop_sampler()

    # tokens arrived before the answer was complete: while it streamed (aria-busy, Stop shown)
    # the text was visible and grew over several samples (the rendered text, not the raw one:
    # it may shrink by a character when markdown closes, e.g. "**" turning into bold)
    streaming = [s["len"] for s in samples if s["busy"] == "true" and s["stop"] and s["len"] > 0]
    assert len(set(streaming)) >= 3, f"no growing text while streaming: {samples[-40:]}"
    assert streaming[-1] > streaming[0], streaming
    final = chat.answer_text(0)
    assert final.strip(), "empty answer"
    assert len(final) > streaming[0], (streaming[0], len(final))
    expect(chat.by_id("stop")).to_have_count(0)
    expect(chat.page.locator(USER_MESSAGES)).to_have_count(1)

    # the sources came first, then the tokens
    message_id = chat.ai(0).get_attribute("data-message-id")
    assert message_id
    kinds = [e["type"] for e in chat.recv() if e.get("message_id") == message_id]
    assert kinds[0] == "ai.start" and kinds[-1] == "ai.done", kinds
    assert kinds.index("ai.sources") < kinds.index("ai.token"), kinds

    answer = stored_answer(chat_server, chat)
    assert answer["id"] == message_id
    assert answer["content"] == chat.streamed_text(message_id)

    # Copy puts the answer's markdown on the clipboard, as the server stored it
    chat.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    copy = chat.ai(0).get_by_test_id("copy")
    expect(copy).to_have_text("Copy")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert chat.page.evaluate("navigator.clipboard.readText()") == answer["content"]
    expect(copy).to_have_text("Copy", timeout=5000)

    sources = answer["sources"]
    assert sources, answer
    assert all(s["source"].startswith("data/guide/") for s in sources), sources

    # Export downloads the conversation as Markdown: the question, the answer as stored, and
    # the answer's sources with their files
    with chat.page.expect_download() as download:
        chat.by_id("export").click()
    name = download.value.suggested_filename
    assert re.fullmatch(r"how-do-i-ingest-pdf-files-\d{4}-\d\d-\d\d\.md", name), name
    exported = Path(download.value.path()).read_text(encoding="utf-8")
    assert exported.startswith("# How do I ingest PDF files?\n"), exported[:200]
    assert "**You** · " in exported and "\nHow do I ingest PDF files?\n" in exported
    assert "**Assistant** · " in exported and answer["content"].strip() in exported
    for source in sources:
        assert f"{source['n']}. {source['title']}" in exported and source["source"] in exported

    # Rename (the conversation list's ✎) asks for a title and keeps it on the server: the
    # list, the top bar and GET /api/conversations all say it
    chat.prompt_answers.append("  Ingesting   PDFs ")
    chat.page.get_by_role("button", name="Rename conversation How do I ingest PDF files?").click()
    expect(chat.page.locator(".sidebar .list li.active .item-title")).to_have_text("Ingesting PDFs")
    expect(chat.page.locator(".topbar .room-name")).to_have_text("Ingesting PDFs")
    assert chat.prompts == ["Rename this conversation"]
    listed = httpx.get(f"{chat_server.url}/api/conversations").json()["conversations"]
    assert {c["id"]: c["title"] for c in listed}[chat.conversation_id()] == "Ingesting PDFs"

    # the answer's source list: one entry per source, each naming its file from data/guide
    ai = chat.ai(0)
    links = ai.locator(".sources .source-link")
    expect(links).to_have_count(len(sources))
    for link, source in zip(links.all(), sources, strict=True):
        text = link.inner_text()
        assert f"[{source['n']}]" in text and source["title"] in text, (text, source)
        name = PurePosixPath(source["source"]).name
        assert name in GUIDE_FILES
        if name != source["title"]:
            assert name in text, (text, source)

    # open a source: the panel shows its file and snippet as the server sent them
    links.first.click()
    check_source_panel(chat, sources[0])
    # and a citation, if the small model wrote one
    citations = ai.get_by_test_id("citation")
    if citations.count():
        n = int(citations.first.inner_text().strip("[]"))
        citations.first.click()
        check_source_panel(chat, next(s for s in sources if s["n"] == n))

    # Regenerate: a new answer to the same question streams in the old one's place; the page
    # and the server both keep the new one alone
    regenerate = chat.ai(0).get_by_test_id("regenerate")
    expect(regenerate).to_have_text("Regenerate")
    regenerate.click()
    expect(chat.ai(0)).not_to_have_attribute("data-message-id", message_id)
    chat.wait_answer_done(0)
    new_id = chat.ai(0).get_attribute("data-message-id")
    assert new_id and new_id != message_id
    sent = [(e["room"], e["message_id"]) for e in chat.sent("regenerate")]
    assert sent == [(chat.conversation_id(), message_id)]
    start = next(e for e in chat.recv("ai.start") if e["message_id"] == new_id)
    assert start["replaces"] == message_id
    expect(chat.page.locator(AI_MESSAGES)).to_have_count(1)
    expect(chat.page.locator(USER_MESSAGES)).to_have_count(1)
    again = stored_answer(chat_server, chat)
    assert again["id"] == new_id
    assert again["content"] == chat.streamed_text(new_id)
    # the new answer is the latest: it may be asked for again
    expect(chat.ai(0).get_by_test_id("regenerate")).to_have_count(1)

    # 👎 asks what was wrong, and the server keeps the rating and the comment with the answer
    # (one per user: 👍 then replaces it; pressing it again takes it back)
    down, up = chat.ai(0).get_by_test_id("rate-down"), chat.ai(0).get_by_test_id("rate-up")
    chat.prompt_answers.append("  it missed\nthe PDF part ")
    down.click()
    expect(down).to_have_attribute("aria-pressed", "true")
    expect(up).to_have_attribute("aria-pressed", "false")
    assert chat.prompts[-1] == "What was wrong with this answer? (optional)"
    (given,) = stored_answer(chat_server, chat)["feedback"].values()
    assert (given["rating"], given["comment"]) == ("down", "it missed the PDF part")
    up.click()
    expect(up).to_have_attribute("aria-pressed", "true")
    expect(down).to_have_attribute("aria-pressed", "false")
    assert [f["rating"] for f in stored_answer(chat_server, chat)["feedback"].values()] == ["up"]
    up.click()
    expect(up).to_have_attribute("aria-pressed", "false")
    assert stored_answer(chat_server, chat)["feedback"] == {}
    assert chat_server.metric("rag_answer_feedback_total", rating="down") >= 1

    # Edit the question: Enter saves, the new text shows as edited and is answered again in
    # the old answer's place; the server keeps the new text and the new answer alone
    question = chat.page.locator(USER_MESSAGES).first
    question.get_by_test_id("edit").click()
    box = question.get_by_test_id("edit-text")
    expect(box).to_be_focused()
    box.fill("How do I ingest PDF files into rag_chat?")
    box.press("Enter")
    expect(question.locator(".text")).to_have_text("How do I ingest PDF files into rag_chat?")
    expect(question.locator(".edited")).to_have_text("(edited)")
    expect(chat.ai(0)).not_to_have_attribute("data-message-id", new_id)
    chat.wait_answer_done(0)
    edited_id = chat.ai(0).get_attribute("data-message-id")
    assert edited_id and edited_id != new_id
    (sent_edit,) = chat.sent("edit")
    assert sent_edit["text"] == "How do I ingest PDF files into rag_chat?"
    expect(chat.page.locator(AI_MESSAGES)).to_have_count(1)
    messages = chat_server.messages(chat.conversation_id())
    assert [(m["role"], m["id"]) for m in messages] == [
        ("user", sent_edit["message_id"]),
        ("assistant", edited_id),
    ]
    assert messages[0]["content"] == "How do I ingest PDF files into rag_chat?"
    assert messages[0]["edited_at"] > 0
    assert messages[1]["content"] == chat.streamed_text(edited_id)
    # Up in the empty composer opens the editor; Escape leaves it without sending anything,
    # back in the composer
    chat.by_id("composer").press("ArrowUp")
    expect(question.get_by_test_id("edit-text")).to_be_focused()
    expect(question.get_by_test_id("edit-text")).to_have_value(
        "How do I ingest PDF files into rag_chat?"
    )
    question.get_by_test_id("edit-text").press("Escape")
    expect(question.get_by_test_id("edit-text")).to_have_count(0)
    expect(chat.by_id("composer")).to_be_focused()
    assert len(chat.sent("edit")) == 1


def test_stop_cancels_the_reply_in_the_backend(ui: UI, chat_server: ChatServer) -> None:
    labels = {"transport": "ws", "finish_reason": "cancelled"}
    cancelled_before = chat_server.metric("rag_replies_total", **labels)
    chat = ui.open()
    chat.ask("How do I ingest PDF files? List every step.")
    chat.wait_answer_streaming(0)
    chat.by_id("stop").click()
    chat.wait_answer_done(0)

    ai = chat.ai(0)
    message_id = ai.get_attribute("data-message-id")
    assert message_id
    # "Stopped." or "Stopped by <who pressed it>." (in open mode: this page's guest name)
    expect(ai.locator(".reply-note")).to_have_text(re.compile(r"^Stopped( by \S+)?\.$"))
    expect(chat.by_id("stop")).to_have_count(0)
    assert [e["message_id"] for e in chat.sent("cancel")] == [message_id]
    done = [e for e in chat.recv("ai.done") if e["message_id"] == message_id]
    assert len(done) == 1, done
    assert done[0]["finish_reason"] == "cancelled", done
    assert done[0].get("cancel_reason") == "user", done

    # the text stops growing
    text = chat.answer_text(0)
    assert text.strip(), "stopped before any text: the test pressed Stop too early"
    time.sleep(2.0)
    assert chat.answer_text(0) == text

    # the backend cancelled it: counted as a cancelled WebSocket reply, nothing in flight, and
    # the partial answer is stored, exactly what was streamed
    after = chat_server.wait_metric("rag_replies_total", labels, lambda v: v > cancelled_before)
    assert after == cancelled_before + 1
    assert chat_server.wait_metric("rag_replies_in_flight", {}, lambda v: v == 0) == 0
    answer = stored_answer(chat_server, chat)
    assert answer["id"] == message_id
    assert answer["content"] and answer["content"] == chat.streamed_text(message_id)


def test_dropped_connection_resumes_the_answer(ui: UI, chat_server: ChatServer) -> None:
    chat = ui.open()
    question = f"How do I ingest PDF files? (resume {uuid.uuid4().hex[:6]})"
    chat.ask(question)
    chat.wait_answer_streaming(0)
    before = len(chat.answer_text(0))

    # drop the socket mid-answer and refuse reconnects for a while, so that tokens are missed
    dropped = chat.page.evaluate(
        """() => {
          window.__blockWs = true;
          const ws = window.__sockets[window.__sockets.length - 1];
          ws.close(4000, "dropped by the test");
          return window.__sockets.length - 1;
        }"""
    )
    chat.wait_status("reconnecting")
    time.sleep(1.5)
    assert chat.status() != "connected"
    chat.page.evaluate("() => { window.__blockWs = false; }")
    chat.wait_status("connected", timeout=30)
    chat.wait_answer_done(0)

    # the indicator went connected → reconnecting → connected
    log = [e["status"] for e in chat.status_log()]
    last_drop = max(i for i, s in enumerate(log) if s == "reconnecting")
    assert log[:last_drop].count("connected") >= 1 and log[-1] == "connected", log

    # the conversation was re-joined from where it left off, and the answer went on streaming
    # on the new connection (it was not over before the drop)
    cid = chat.conversation_id()
    joins = [e for e in chat.sent("join") if e["_sock"] > dropped and e["room"] == cid]
    assert joins and isinstance(joins[0].get("last_seq"), int), chat.sent("join")
    ai = chat.ai(0)
    message_id = ai.get_attribute("data-message-id")
    assert message_id
    resumed = [
        e
        for e in chat.recv()
        if e["_sock"] > dropped and e.get("message_id") == message_id and e["type"] == "ai.token"
    ]
    assert resumed, "no token of the answer after the reconnect: it ended before the drop"
    done = [e for e in chat.recv("ai.done") if e["message_id"] == message_id]
    assert len(done) == 1 and done[0]["finish_reason"] in ("stop", "length"), done

    # no gap, no repeat: what the page received is what the server stored, and one answer
    answer = stored_answer(chat_server, chat)
    assert answer["id"] == message_id
    assert chat.streamed_text(message_id) == answer["content"]
    expect(chat.page.locator(AI_MESSAGES)).to_have_count(1)
    expect(chat.page.locator(USER_MESSAGES)).to_have_count(1)
    shown = chat.answer_text(0)
    assert len(shown) > before

    # and the page shows exactly what a fresh page renders from the stored history
    other = ui.open("history")
    other.page.locator("section[aria-labelledby=conv-h] .item", has_text=question).click()
    other.wait_answer_done(0)
    assert other.answer_text(0) == shown


def test_uploaded_document_is_found_by_the_next_question(ui: UI, chat_server: ChatServer) -> None:
    chat = ui.open()
    word = f"zorblax{uuid.uuid4().hex[:6]}"
    doc = (
        f"# The {word} relay\n\n"
        f"The {word} relay forwards chat messages between two rag_chat servers. "
        f"It listens on port 4242 and retries every 7 seconds.\n"
    )
    upload: FilePayload = {
        "name": f"{word}.md",
        "mimeType": "text/markdown",
        "buffer": doc.encode(),
    }
    chat.by_id("upload-input").set_input_files(files=[upload])
    task = chat.by_id("upload-status").locator(".upload")
    expect(task).to_have_attribute("data-phase", "done", timeout=ANSWER_S * 1000)
    expect(task.locator(".upload-phase")).to_have_text("Added")

    chat.ask(f"What does the {word} relay do?")
    chat.wait_answer_streaming(0)
    # the answer itself is not the point here: stop it if it is still going (saves time)
    chat.page.evaluate("() => document.querySelector('[data-testid=\"stop\"]')?.click()")
    chat.wait_answer_done(0)
    answer = stored_answer(chat_server, chat)
    files = [PurePosixPath(s["source"]).name for s in answer["sources"]]
    assert f"{word}.md" in files, answer["sources"]
    # the uploaded file is listed among the answer's sources in the page too
    n = files.index(f"{word}.md")
    link = chat.ai(0).locator(".sources .source-link").nth(n)
    link.click()
    check_source_panel(chat, answer["sources"][n])

    # listed among the user's documents, and removed from there: out of the list and the index
    listed = chat.by_id("your-documents").locator("li", has_text=f"{word}.md")
    expect(listed).to_contain_text(re.compile(r"\d+ chunks?"))
    asked: list[str] = []  # the page's fixture accepts every dialog; this one must come
    chat.page.on("dialog", lambda d: asked.append(d.message))
    listed.get_by_role("button", name=f"Remove {word}.md").click()
    expect(listed).to_have_count(0, timeout=ANSWER_S * 1000)
    assert len(asked) == 1 and f"Remove “{word}.md”?" in asked[0], asked
    r = httpx.post(
        chat_server.url + "/api/search", json={"query": word, "k": 5, "mode": "bm25"}, timeout=30
    )
    assert r.status_code == 200 and not [h for h in r.json()["results"] if word in h["text"]]
