"""Two people in one shared room, each in their own browser context: members, typing, messages,
an @ai question whose answer both of them watch stream in, and an edited message."""

from __future__ import annotations

import uuid

from playwright.sync_api import expect

from tests.browser.conftest import AI_MESSAGES, UI, USER_MESSAGES, ChatPage


def join(chat: ChatPage, name: str, room: str) -> None:
    chat.page.locator("#display-name").fill(name)
    chat.by_id("room-input").fill(room)
    chat.by_id("room-join").click()
    expect(chat.page.locator(".room-name")).to_have_text(f"#{room}")


def members(chat: ChatPage) -> list[str]:
    return [
        t.replace(" (you)", "").strip()
        for t in chat.by_id("members").locator("li").all_inner_texts()
    ]


def test_two_people_in_a_room(ui: UI) -> None:
    room = f"browser-{uuid.uuid4().hex[:8]}"
    alice = ui.open("alice")
    bob = ui.open("bob")
    join(alice, "alice", room)
    join(bob, "bob", room)

    # both see both in the member list
    for chat in (alice, bob):
        expect(chat.by_id("members").locator("li")).to_have_count(2)
        assert sorted(members(chat)) == ["alice", "bob"], members(chat)
    expect(alice.by_id("members")).to_contain_text("alice (you)")

    # bob types: alice sees it; bob sends: alice sees the message and the typing line clears
    bob.by_id("composer").press_sequentially("hello ali", delay=30)
    expect(alice.by_id("typing")).to_contain_text("bob is typing")
    expect(bob.by_id("typing")).not_to_contain_text("bob")  # not shown to the typist
    bob.by_id("composer").press_sequentially("ce")
    bob.by_id("composer").press("Enter")
    from_bob = alice.page.locator(USER_MESSAGES, has_text="hello alice")
    expect(from_bob).to_have_count(1)
    expect(from_bob.locator(".author")).to_have_text("bob")
    expect(alice.by_id("typing")).to_have_text("")

    # alice asks the assistant: both see one AI-badged answer stream in; bob stops it (any
    # member may), and both end with the same text, stopped by bob
    alice.ask("@ai How do I ingest PDF files?")
    expect(bob.page.locator(USER_MESSAGES, has_text="@ai How do I ingest")).to_have_count(1)
    for chat in (alice, bob):
        chat.wait_answer_streaming(0)
        ai = chat.page.locator(AI_MESSAGES)
        expect(ai).to_have_count(1)
        expect(ai.locator(".badge-ai")).to_have_text("AI")
    bob.by_id("stop").click()
    for chat in (alice, bob):
        chat.wait_answer_done(0)
        expect(chat.ai(0).locator(".reply-note")).to_have_text("Stopped by bob.")
    text = alice.answer_text(0)
    assert text.strip(), "empty answer"
    assert bob.answer_text(0) == text
    ids = {c.ai(0).get_attribute("data-message-id") for c in (alice, bob)}
    assert len(ids) == 1, ids
    # both received the answer token by token, the same tokens
    message_id = ids.pop()
    assert message_id
    assert alice.streamed_text(message_id) == bob.streamed_text(message_id) != ""

    # bob edits his latest message (it asks nothing: no answer): alice sees the new text,
    # marked edited; only its author is offered the edit
    bob.ask("see you tomorow")
    mine, theirs = (chat.page.locator(USER_MESSAGES).last for chat in (bob, alice))
    for message in (mine, theirs):
        expect(message.locator(".text")).to_have_text("see you tomorow")
    expect(theirs.get_by_test_id("edit")).to_have_count(0)
    mine.get_by_test_id("edit").click()
    mine.get_by_test_id("edit-text").fill("see you tomorrow")
    expect(mine.get_by_test_id("edit-save")).to_have_text("Save")
    mine.get_by_test_id("edit-save").click()
    for chat in (alice, bob):
        edited = chat.page.locator(USER_MESSAGES).last
        expect(edited.locator(".text")).to_have_text("see you tomorrow")
        expect(edited.locator(".edited")).to_have_text("(edited)")
        expect(chat.page.locator(AI_MESSAGES)).to_have_count(1)
    (sent,) = bob.sent("edit")
    assert (sent["text"], sent["ai"]) == ("see you tomorrow", False)
