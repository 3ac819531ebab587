"""End-to-end browser tests: Debian's Chromium driven by Playwright's sync API against a real
``python -m rag_chat`` (the embedded SmolLM2 through llama-cpp-python, Redis DB 13 under a key
prefix of its own) that serves the built React UI (frontend/dist) at ``/``.

One open-mode server (plus one that requires a token, for the sign-in test, started beside it)
and one browser serve the whole package (package scope: all gone before the next package's
tests run). Each test opens fresh browser contexts (their own cookies and localStorage)
through the ``ui`` fixture. Every page gets an init script that records the WebSocket frames
it sends and receives, the sockets themselves (so a test can drop one), and each change of the
connection status indicator.

On a failure, ``pytest_runtest_makereport`` below saves a screenshot of every page the test
opened under build/screenshots/failures/ and appends to the report the server's log tail, each
page's status history and its console errors.

The UI keeps its strict CSP here (no ``bypass_csp``): ``wait_for_function`` gets function
source, never a bare expression, because the page's CSP forbids ``eval``.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)
from prometheus_client.parser import text_string_to_metric_families

from rag_chat.testing.procs import Proc, free_port, spawn
from rag_chat.testing.procs import wait_ready as _wait_ready
from tests.conftest import ROOT
from tests.rooms.conftest import REDIS_URL, base_env, delete_prefix

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DIST = ROOT / "frontend" / "dist"
SCREENSHOTS = ROOT / "build" / "screenshots"
FAILURES = SCREENSHOTS / "failures"

DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}

# The embedded model on a shared 2-core machine: seconds of prompt evaluation before the first
# token, then ~15-40 tokens/s for up to 512 tokens. Generous limits, never speed goals.
ANSWER_S = 120.0
START_S = 240.0
UI_S = 20.0
# every expect(...) waits this long, not 5 s: the machine is shared and often busy
expect.set_options(timeout=UI_S * 1000)
# the secret of the server that requires a token (mint with ``python -m rag_chat token``)
JWT_SECRET = secrets.token_hex(32)

# Set on every page before its own scripts run. It wraps WebSocket to keep every socket and
# every frame (``_sock``: the index of the socket that carried it), lets a test refuse new
# connections for a while (``__blockWs``: they go to a path with no WebSocket route, so the
# upgrade fails like a server that is unreachable), and logs each change of the status text.
HOOKS_JS = """
(() => {
  const w = window;
  const Native = w.WebSocket;
  w.__sockets = [];
  w.__sent = [];
  w.__recv = [];
  w.__blockWs = false;
  w.__statusLog = [];
  class RecordingWebSocket extends Native {
    constructor(url, protocols) {
      const target = w.__blockWs ? String(url).replace(/\\/ws$/, "/ws-blocked-by-test") : url;
      super(target, protocols);
      const sock = w.__sockets.length;
      w.__sockets.push(this);
      this.addEventListener("message", (ev) => {
        try {
          const e = JSON.parse(ev.data);
          e._sock = sock;
          w.__recv.push(e);
        } catch (err) {}
      });
    }
    send(data) {
      try {
        const e = JSON.parse(data);
        e._sock = w.__sockets.indexOf(this);
        w.__sent.push(e);
      } catch (err) {}
      return super.send(data);
    }
  }
  w.WebSocket = RecordingWebSocket;
  let last = null;
  const note = () => {
    const el = document.querySelector('[data-testid="status"]');
    const s = el ? el.textContent : null;
    if (s !== last) {
      last = s;
      w.__statusLog.push({ status: s, t: performance.now(), sockets: w.__sockets.length });
    }
  };
  new MutationObserver(note).observe(document, {
    subtree: true, childList: true, characterData: true,
  });
})();
"""

AI_MESSAGES = '[data-testid="message"][data-role="ai"]'
USER_MESSAGES = '[data-testid="message"][data-role="user"]'

# i-th AI message (0-based) exists and has finished streaming
_ANSWER_DONE_JS = """([sel, i]) => {
  const m = document.querySelectorAll(sel)[i];
  return !!m && m.querySelector('.answer')?.getAttribute('aria-busy') === 'false';
}"""
# i-th AI message (0-based) shows some answer text while it is still streaming
_ANSWER_STREAMING_JS = """([sel, i]) => {
  const m = document.querySelectorAll(sel)[i];
  const a = m && m.querySelector('.answer');
  return !!a && a.getAttribute('aria-busy') === 'true'
    && (a.querySelector('.md')?.textContent ?? '').length > 0;
}"""
# every 100 ms: the last AI message's text length, whether it streams, whether Stop is shown
_SAMPLER_START_JS = """(sel) => {
  window.__samples = [];
  window.__sampler = setInterval(() => {
    const all = document.querySelectorAll(sel);
    const m = all[all.length - 1];
    if (!m) return;
    const a = m.querySelector('.answer');
    window.__samples.push({
      t: performance.now(),
      len: (a?.querySelector('.md')?.textContent ?? '').length,
      busy: a?.getAttribute('aria-busy') ?? null,
      stop: !!document.querySelector('[data-testid="stop"]'),
    });
  }, 100);
}"""


def norm(text: str | None) -> str:
    """Whitespace collapsed: the DOM's textContent of rendered text vs the raw string."""
    return re.sub(r"\s+", " ", text or "").strip()


# --- the server ------------------------------------------------------------------------------


@dataclass
class ChatServer:
    proc: Proc
    prefix: str
    data_dir: Path
    ready: bool = False

    @property
    def url(self) -> str:
        return self.proc.url

    def get_json(self, path: str, **kwargs: Any) -> Any:
        r = httpx.get(self.url + path, timeout=10, **kwargs)
        r.raise_for_status()
        return r.json()

    def messages(self, conversation_id: str) -> list[dict[str, Any]]:
        """The stored history (GET /api/conversations/{id}/messages)."""
        body = self.get_json(f"/api/conversations/{conversation_id}/messages")
        out: list[dict[str, Any]] = body["messages"]
        return out

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics (0 when the labelled series does not exist yet)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def wait_metric(
        self,
        name: str,
        labels: dict[str, str],
        pred: Callable[[float], bool],
        timeout: float = 15.0,
    ) -> float:
        """The metric once ``pred`` holds for it (or as it is after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while not pred(value := self.metric(name, **labels)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return value


def spawn_server(name: str, data_dir: Path, log_dir: Path, **extra: str) -> ChatServer:
    """``python -m rag_chat`` on a free port with the embedded model (base_env drops every
    RAG_* variable, RAG_LLM_BASE_URL included); not waited for (``_ready`` does)."""
    prefix = f"test:browser:{uuid.uuid4().hex}:"
    port = free_port()
    env = {
        **base_env(),
        "RAG_DATA_DIR": str(data_dir),
        "RAG_REDIS_URL": REDIS_URL,
        "RAG_REDIS_PREFIX": prefix,
        "RAG_RATE_LIMIT_PER_MINUTE": "0",
        # Two sources instead of five: the prompt's evaluation dominates the time to the first
        # token on a shared 2-core box (~7 s instead of ~17 s), and every test waits for it.
        "RAG_TOP_K": "2",
        # every page here is one anonymous user on 127.0.0.1: a reply left running by a failed
        # test, or the pages of the screenshot test, must not hit the per-user caps
        "RAG_MAX_REPLIES_PER_USER": "10",
        "RAG_MAX_CONNECTIONS_PER_USER": "500",
        **extra,
    }
    cmd = [sys.executable, "-m", "rag_chat", "--port", str(port), "--log-level", "warning"]
    proc = spawn(name, cmd, env, log_dir, f"http://127.0.0.1:{port}")
    return ChatServer(proc, prefix, data_dir)


def stop_server(server: ChatServer) -> None:
    try:
        server.proc.stop()
    finally:
        delete_prefix(server.prefix)


def ensure_ui_built() -> None:
    if (DIST / "index.html").is_file():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("frontend/dist is not built and npm is missing: run `make ui`")
    result = subprocess.run(
        [npm, "run", "build"],
        cwd=ROOT / "frontend",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, "npm run build failed:\n" + result.stdout + result.stderr


@dataclass
class Servers:
    main: ChatServer
    jwt: ChatServer


@pytest.fixture(scope="package")
def servers(tmp_path_factory: pytest.TempPathFactory, guide_index: Path) -> Iterator[Servers]:
    """Both servers of the package, started side by side (start-up takes ~20 s each here):
    the open one every test uses, on a copy of the ingested guide (an upload must not change
    the index other packages' tests use), and one that requires a token (RAG_JWT_SECRET), on
    an empty data dir, for the sign-in test."""
    ensure_ui_built()
    root = tmp_path_factory.mktemp("browser-servers")
    shutil.copytree(guide_index, root / "data")
    started: list[ChatServer] = []
    try:
        started.append(spawn_server("server", root / "data", root))
        started.append(
            spawn_server("jwt-server", root / "jwt-data", root, RAG_JWT_SECRET=JWT_SECRET)
        )
        yield Servers(*started)
    finally:
        for server in started:
            stop_server(server)


def _ready(server: ChatServer) -> ChatServer:
    if not server.ready:
        _wait_ready([server.proc], "/readyz", timeout=START_S)
        page = httpx.get(server.url + "/", timeout=10).text
        assert '<div id="root">' in page, "the server does not serve the built UI:\n" + page[:300]
        server.ready = True
    return server


@pytest.fixture(scope="package")
def chat_server(servers: Servers) -> ChatServer:
    """The open-mode server every test talks to (anyone is the same anonymous user)."""
    return _ready(servers.main)


@pytest.fixture(scope="package")
def jwt_server(servers: Servers) -> ChatServer:
    """The server that requires a token signed with JWT_SECRET."""
    return _ready(servers.jwt)


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (or `make chromium`)")
    # failure screenshots are about this run only
    shutil.rmtree(FAILURES, ignore_errors=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


# --- pages -----------------------------------------------------------------------------------


@dataclass
class ChatPage:
    """One page of the UI in its own browser context, with helpers to drive and read it."""

    name: str
    page: Page
    server: ChatServer
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    # what the next window.prompt()s are answered with, in turn (confirms are accepted)
    prompt_answers: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # the prompts' messages, as asked

    # driving

    def on_dialog(self, dialog: Any) -> None:
        if dialog.type == "prompt":
            self.prompts.append(dialog.message)
            if self.prompt_answers:
                dialog.accept(self.prompt_answers.pop(0))
                return
        dialog.accept()

    def goto(self) -> None:
        self.page.goto(self.server.url + "/")

    def by_id(self, test_id: str) -> Locator:
        return self.page.get_by_test_id(test_id)

    def wait_js(self, fn: str, arg: Any = None, timeout: float = UI_S) -> None:
        """``fn`` is function source (the page's CSP forbids evaluating bare expressions)."""
        self.page.wait_for_function(fn, arg=arg, timeout=timeout * 1000, polling=50)

    def status(self) -> str:
        return self.by_id("status").inner_text()

    def wait_status(self, status: str, timeout: float = UI_S) -> None:
        self.wait_js(
            "(s) => document.querySelector('[data-testid=\"status\"]')?.textContent === s",
            status,
            timeout,
        )

    def ask(self, text: str) -> None:
        """Type into the composer and press Enter (what a user does)."""
        composer = self.by_id("composer")
        composer.fill(text)
        composer.press("Enter")

    def ai(self, i: int) -> Locator:
        return self.page.locator(AI_MESSAGES).nth(i)

    def wait_answer_streaming(self, i: int, timeout: float = ANSWER_S) -> None:
        self.wait_js(_ANSWER_STREAMING_JS, [AI_MESSAGES, i], timeout)

    def wait_answer_done(self, i: int, timeout: float = ANSWER_S) -> None:
        self.wait_js(_ANSWER_DONE_JS, [AI_MESSAGES, i], timeout)

    def answer_text(self, i: int) -> str:
        return self.ai(i).locator(".answer").inner_text()

    def start_sampler(self) -> None:
        self.page.evaluate(_SAMPLER_START_JS, AI_MESSAGES)

    def stop_sampler(self) -> list[dict[str, Any]]:
        samples: list[dict[str, Any]] = self.page.evaluate(
            "() => { clearInterval(window.__sampler); return window.__samples; }"
        )
        return samples

    # what went over the wire (recorded by HOOKS_JS)

    def recv(self, kind: str | None = None) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.page.evaluate("() => window.__recv")
        return [e for e in events if kind is None or e.get("type") == kind]

    def sent(self, kind: str | None = None) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.page.evaluate("() => window.__sent")
        return [e for e in events if kind is None or e.get("type") == kind]

    def status_log(self) -> list[dict[str, Any]]:
        log: list[dict[str, Any]] = self.page.evaluate("() => window.__statusLog")
        return log

    def conversation_id(self) -> str:
        """The private conversation this page's first question went to."""
        ids = [e["conversation_id"] for e in self.sent("message") if e.get("conversation_id")]
        assert ids, f"{self.name}: no message with a conversation_id was sent"
        return str(ids[0])

    def streamed_text(self, message_id: str) -> str:
        """The answer as the frames carried it: each ``ai.token`` once (a replay after a
        resume repeats nothing, but a seq seen twice would count once), in seq order."""
        by_seq: dict[int, str] = {}
        for e in self.recv("ai.token"):
            if e.get("message_id") == message_id:
                by_seq.setdefault(int(e["seq"]), str(e["delta"]))
        return "".join(by_seq[s] for s in sorted(by_seq))

    def no_horizontal_scroll(self) -> tuple[int, int]:
        """(document scroll width, viewport width)."""
        w: list[int] = self.page.evaluate(
            "() => [Math.max(document.documentElement.scrollWidth, document.body.scrollWidth),"
            " window.innerWidth]"
        )
        return w[0], w[1]

    def report(self) -> str:
        try:
            log = json.dumps(self.status_log())
        except Exception as exc:  # the page may be gone
            log = f"(unavailable: {exc})"
        lines = [f"--- page {self.name} ({self.page.url}) ---", f"status log: {log[-1500:]}"]
        lines += [f"page error: {e}" for e in self.errors]
        lines += [f"console: {c}" for c in self.console[-30:]]
        return "\n".join(lines)


class UI:
    """Opens pages for one test and closes them afterwards."""

    def __init__(self, browser: Browser, server: ChatServer) -> None:
        self.browser = browser
        self.server = server
        self.pages: list[ChatPage] = []
        self.contexts: list[BrowserContext] = []

    def open(
        self,
        name: str = "page",
        *,
        phone: bool = False,
        dark: bool = False,
        server: ChatServer | None = None,
        connect: bool = True,
    ) -> ChatPage:
        """A new context (fresh storage) and page at the UI; ``connect``: wait for
        ``connected``."""
        ctx = self.browser.new_context(
            viewport=PHONE if phone else DESKTOP,
            is_mobile=phone,
            has_touch=phone,
            color_scheme="dark" if dark else "light",
        )
        self.contexts.append(ctx)
        ctx.set_default_timeout(UI_S * 1000)
        ctx.add_init_script(HOOKS_JS)
        page = ctx.new_page()
        chat = ChatPage(name, page, server or self.server)
        page.on("pageerror", lambda e: chat.errors.append(str(e)))
        page.on(
            "console",
            lambda m: (
                chat.console.append(f"{m.type}: {m.text}")
                if m.type in ("error", "warning")
                else None
            ),
        )
        page.on("dialog", chat.on_dialog)
        self.pages.append(chat)
        chat.goto()
        if connect:
            chat.wait_status("connected")
        return chat

    def check_clean(self) -> None:
        """No uncaught exception in any page, no CSP violation."""
        for chat in self.pages:
            assert not chat.errors, f"{chat.name}: uncaught errors in the page: {chat.errors}"
            csp = [c for c in chat.console if "Content Security Policy" in c]
            assert not csp, f"{chat.name}: CSP violations: {csp}"

    def close(self) -> None:
        for ctx in self.contexts:
            # the browser may already be gone after a failure
            with contextlib.suppress(Exception):
                ctx.close()
        self.contexts.clear()


@pytest.fixture
def ui(browser: Browser, chat_server: ChatServer) -> Iterator[UI]:
    pages = UI(browser, chat_server)
    try:
        yield pages
        pages.check_clean()
    finally:
        pages.close()


# --- debugging a failure ---------------------------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        funcargs: dict[str, Any] = getattr(item, "funcargs", {})
        ui = funcargs.get("ui")
        if isinstance(ui, UI):
            FAILURES.mkdir(parents=True, exist_ok=True)
            shots = []
            for n, chat in enumerate(ui.pages):
                path = FAILURES / f"{item.name}-{n}-{chat.name}.png"
                try:
                    chat.page.screenshot(path=str(path), full_page=True)
                    shots.append(str(path.relative_to(ROOT)))
                except Exception as exc:
                    shots.append(f"{chat.name}: no screenshot ({exc})")
            report.sections.append(
                ("browser pages", "\n".join([*shots, *map(ChatPage.report, ui.pages)]))
            )
        servers = {id(v): v for v in funcargs.values() if isinstance(v, ChatServer)}
        if isinstance(ui, UI):
            servers[id(ui.server)] = ui.server
        for server in servers.values():
            report.sections.append((f"server log {server.proc.name}", server.proc.tail(4000)))
    return report
