"""Screenshots of the main screens at desktop (1280x800) and phone (390x844) width, light and
dark, saved under build/screenshots/ for a person to look at; the test checks that they were
written, that dark is dark, and that nothing scrolls sideways on a phone."""

from __future__ import annotations

import re
import struct
import uuid
from pathlib import Path

from playwright.sync_api import expect

from tests.browser.conftest import DESKTOP, PHONE, SCREENSHOTS, UI, ChatPage

QUESTION = "Which port does the server listen on?"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def background(chat: ChatPage) -> tuple[int, ...]:
    css = chat.page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    return tuple(int(float(x)) for x in re.findall(r"[\d.]+", css)[:3])


def luminance(rgb: tuple[int, ...]) -> float:
    r, g, b = rgb
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


def test_screenshots_of_the_main_screens(ui: UI) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    # one answered conversation for every screen (each page opens it from the sidebar)
    asker = ui.open("asker")
    asker.ask(QUESTION)
    asker.wait_answer_done(0)

    # the toggle switches the theme (and back to following the system)
    toggle = asker.by_id("theme-toggle")
    light_bg = background(asker)
    toggle.click()
    expect(asker.page.locator("html")).to_have_attribute("data-theme", "dark")
    assert luminance(background(asker)) < luminance(light_bg)
    toggle.click()
    assert background(asker) == light_bg
    asker.page.context.close()

    written: dict[str, tuple[int, int]] = {}
    overflow: dict[str, tuple[int, int]] = {}
    backgrounds: dict[str, tuple[int, ...]] = {}
    room = f"screens-{uuid.uuid4().hex[:6]}"

    for phone in (False, True):
        for dark in (False, True):
            tag = f"{'phone' if phone else 'desktop'}-{'dark' if dark else 'light'}"
            chat = ui.open(tag, phone=phone, dark=dark)
            viewport = PHONE if phone else DESKTOP

            def shoot(screen: str, chat: ChatPage = chat, tag: str = tag) -> None:
                path = SCREENSHOTS / f"{tag}-{screen}.png"
                chat.page.screenshot(path=str(path), animations="disabled")
                written[path.name] = png_size(path)
                if chat.page.viewport_size == PHONE:
                    overflow[path.name] = chat.no_horizontal_scroll()

            backgrounds[tag] = background(chat)
            shoot("start")

            # the answered conversation, opened from the sidebar (the drawer on a phone)
            if phone:
                chat.page.locator(".menu").click()
                expect(chat.page.locator(".app.drawer-open")).to_have_count(1)
                shoot("drawer")
            chat.page.locator(
                "section[aria-labelledby=conv-h] .item", has_text=QUESTION
            ).first.click()
            chat.wait_answer_done(0)
            chat.page.locator(".timeline").evaluate("(t) => { t.scrollTop = 0; }")
            shoot("answer")

            chat.ai(0).locator(".sources .source-link").first.click()
            expect(chat.by_id("source-panel")).to_be_visible()
            shoot("source")
            chat.page.keyboard.press("Escape")
            expect(chat.by_id("source-panel")).to_have_count(0)

            # a shared room with a message in it
            if phone:
                chat.page.locator(".menu").click()
            chat.by_id("room-input").fill(room)
            chat.by_id("room-join").click()
            expect(chat.by_id("members").locator("li")).not_to_have_count(0)
            chat.ask(f"hello from {tag}")
            expect(
                chat.page.locator('[data-testid="message"]', has_text=f"hello from {tag}")
            ).to_have_count(1)
            shoot("room")
            assert viewport == chat.page.viewport_size
            chat.page.context.close()

    # every screen written as a PNG of the viewport's size
    assert len(written) == 4 * 4 + 2, sorted(written)
    for name, size in written.items():
        path = SCREENSHOTS / name
        assert path.stat().st_size > 1000, path
        expect_size = PHONE if name.startswith("phone") else DESKTOP
        assert size == (expect_size["width"], expect_size["height"]), (name, size)

    # dark is darker than light, at both widths
    for width in ("desktop", "phone"):
        assert luminance(backgrounds[f"{width}-dark"]) < luminance(backgrounds[f"{width}-light"])

    # nothing wider than a phone's screen
    wide = {name: w for name, w in overflow.items() if w[0] > w[1]}
    assert len(overflow) == 2 * 5 and not wide, overflow
