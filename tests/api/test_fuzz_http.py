"""Bad input on the HTTP API: schemathesis over the app's own OpenAPI schema, in process
(real Redis and retrieval, a FakeLLM whose every answer is three tokens, HTML included), and
named hostile requests sent by hand.

For every operation and every generated request (valid and invalid): no 5xx, a documented 2xx
body conforms to its schema, every error is ``{"error": {"code", "message", "type"}}`` with a
one-line message, and no response carries a live ``<script`` (README "Chatting": errors; the
server escapes ``<``, ``>``, ``&`` in JSON). The uploads the fuzzing sends go to a copy of the
test index, never to the shared one.

How many requests were made is written to the terminal at the end of the module (and to
``fuzz_http_tally.json`` in pytest's base temp dir).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.transport import STREAM_CUT_SHORT_ATTRIBUTE
from schemathesis.specs.openapi.checks import response_schema_conformance

from rag_chat.api import sse
from rag_chat.app import create_app
from rag_chat.llm.fake import FakeLLM
from rag_chat.settings import Settings

# requests made, by kind; reported once at the end of the module
TALLY: Counter[str] = Counter()
HTML = "<script>alert(1)</script>"
STREAM_LIMIT_S = 4.0  # an answer (three tokens) streams in well under this


class ShortLLM(FakeLLM):
    """Every answer is the same three tokens, HTML included: streams end at once."""

    def stream(self, messages: Any, **kwargs: Any) -> Any:
        self.enqueue([f"{HTML} ", "Port 8000", " [1]."])
        return super().stream(messages, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def _report_tally(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    TALLY.clear()
    yield
    total = sum(TALLY.values())
    fuzzed = sum(n for k, n in TALLY.items() if k.startswith("schemathesis "))
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(TALLY.items()))
    line = f"test_fuzz_http: {total} HTTP requests made, {fuzzed} by schemathesis ({kinds})"
    out = tmp_path_factory.getbasetemp() / "fuzz_http_tally.json"
    out.write_text(json.dumps({"total": total, "schemathesis": fuzzed, **TALLY}, indent=1))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture is not None else nullcontext():
            reporter.ensure_newline()
            reporter.write_line(line)


# --- what every response must be ---


def body_problems(status: int, content_type: str, raw: bytes) -> list[str]:
    """Why a response is not acceptable, whatever the request was (empty: it is)."""
    problems = []
    if status >= 500:
        problems.append(f"server error {status}: {raw[:200]!r}")
    if b"<script" in raw.lower():
        at = raw.lower().index(b"<script")
        problems.append(f"unescaped HTML in the body: {raw[max(0, at - 60) : at + 40]!r}")
    if status >= 400:
        if not content_type.startswith("application/json"):
            problems.append(f"an error as {content_type!r}, not JSON: {raw[:200]!r}")
            return problems
        try:
            body = json.loads(raw)
        except ValueError:
            return [*problems, f"an error body that is not JSON: {raw[:200]!r}"]
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or set(body) != {"error"}:
            return [*problems, f'not {{"error": {{...}}}}: {raw[:300]!r}']
        for key in ("code", "message", "type"):
            if not isinstance(error.get(key), str) or not error[key]:
                problems.append(f"error.{key} missing or not a string: {error}")
        message = error.get("message")
        if isinstance(message, str):
            if "\n" in message or "\r" in message:
                problems.append(f"a multi-line error message: {message!r}")
            if "Traceback" in message or 'File "' in message:
                problems.append(f"a traceback in the error message: {message[:300]!r}")
    return problems


def _header(response: schemathesis.Response, name: str) -> str:
    for key, values in response.headers.items():
        if key.lower() == name:
            return values[0] if values else ""
    return ""


def well_formed(ctx: Any, response: schemathesis.Response, case: Any) -> None:
    """Error envelope, one-line messages, no live HTML (what README promises of every route)."""
    problems = body_problems(
        response.status_code, _header(response, "content-type"), response.content
    )
    problems = [p for p in problems if not p.startswith("server error")]  # its own check
    assert not problems, "; ".join(problems)


def conforms_when_2xx(ctx: Any, response: schemathesis.Response, case: Any) -> bool | None:
    """A documented success conforms to its schema. (Errors are checked by well_formed: the
    schema documents 422 as FastAPI's {"detail": [...]}, which the server never sends.)"""
    if 200 <= response.status_code < 300:
        return response_schema_conformance(ctx, response, case)
    return None


# --- the app ---


def _openapi() -> dict[str, Any]:
    # building the app reads nothing: services open in the lifespan, which does not run here
    return create_app(Settings(_env_file=None)).openapi()  # type: ignore[call-arg]


SCHEMA = schemathesis.openapi.from_dict(
    _openapi(),
    config=schemathesis.Config.from_dict(
        {
            "generation": {"mode": "all", "deterministic": True, "database": "none"},
            "max-stream-events": 200,
            "request-timeout": 60,
        }
    ),
)


@pytest.fixture
def http_settings(server_settings: Settings, tmp_path: Path) -> Settings:
    # a private copy of the index: fuzzed uploads are ingested into it
    index = tmp_path / "index"
    shutil.copytree(server_settings.data_dir, index)
    # per-user limits are not under test; a 1 MiB upload limit keeps a 10 MB upload from
    # being ingested for a minute
    update = {
        "data_dir": index,
        "rate_limit_per_minute": 0,
        "max_replies_per_user": 1000,
        "upload_max_bytes": 1 << 20,
    }
    return server_settings.model_copy(update=update)


@pytest.fixture
def asgi_app(make_app: Any, http_settings: Settings) -> Iterator[Any]:
    """The app as schemathesis drives it: its lifespan runs in schemathesis' own event loop
    from the first request until it is shut down here."""
    from schemathesis.python import asgi

    app = make_app(ShortLLM(), http_settings)
    try:
        yield app
    finally:
        asgi.shutdown_lifespans()


@pytest.fixture
def http(
    make_app: Any, http_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    monkeypatch.setattr(sse, "HEARTBEAT_S", 1, raising=False)
    with TestClient(make_app(ShortLLM(), http_settings)) as client:
        yield client


# --- schemathesis: every operation ---


@SCHEMA.parametrize()
@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_survives_fuzzing(case: Any, asgi_app: Any) -> None:
    TALLY[f"schemathesis {case.operation.label}"] += 1
    response = case.call(app=asgi_app)
    case.validate_response(
        response,
        checks=[not_a_server_error, conforms_when_2xx, well_formed],
        transport_kwargs={"app": asgi_app},
    )


def test_every_operation_is_in_the_schema() -> None:
    """The fuzzing covers what the schema lists: the routes README names must be there."""
    labels = {op.label for op in _operations()}
    for label in (
        "POST /api/chat",
        "POST /api/search",
        "POST /v1/chat/completions",
        "GET /v1/models",
        "GET /api/conversations/{conversation_id}/messages",
        "DELETE /api/conversations/{conversation_id}/messages",
        "POST /api/conversations/{conversation_id}/regenerate",
        "PATCH /api/conversations/{conversation_id}/messages/{message_id}",
        "PUT /api/conversations/{conversation_id}/messages/{message_id}/feedback",
        "DELETE /api/conversations/{conversation_id}/messages/{message_id}/feedback",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    ):
        assert label in labels, labels


def _operations() -> list[Any]:
    return [result.ok() for result in SCHEMA.get_all_operations()]  # type: ignore[union-attr]


# --- named hostile requests ---


@dataclass
class Reply:
    status: int
    headers: Any
    content: bytes
    ended: bool  # False: still streaming when the deadline came

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


def send(client: TestClient, method: str, url: str, **kwargs: Any) -> Reply:
    """One request, read as a stream with a deadline: an SSE answer that never ends is a
    finding, not a hung test (the heartbeat is 1 s here, so a silent stream still yields)."""
    TALLY["named requests"] += 1
    deadline = time.monotonic() + STREAM_LIMIT_S
    chunks: list[bytes] = []
    ended = True
    with client.stream(method, url, **kwargs) as response:
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            if time.monotonic() > deadline:
                ended = False
                break
        return Reply(response.status_code, response.headers, b"".join(chunks), ended)


def run_named(
    client: Any, cases: dict[str, tuple[Any, ...]], sender: Any = send
) -> dict[str, Reply]:
    """Send each; every response must be well formed. All failures are listed, by name."""
    failures, responses = [], {}
    for name, (method, url, kwargs) in cases.items():
        try:
            response = sender(client, method, url, **kwargs)
        except Exception as exc:  # the app raised instead of answering: a 500 behind a server
            failures.append(f"{name}: the app raised {exc!r}"[:600])
            continue
        responses[name] = response
        problems = body_problems(
            response.status, response.headers.get("content-type", ""), response.content
        )
        if not response.ended:
            problems.append(
                f"still streaming after {STREAM_LIMIT_S} s: {response.content[-200:]!r}"
            )
        if problems:
            failures.append(f"{name}: {response.status}: {'; '.join(problems)}"[:600])
    assert not failures, f"{len(failures)} of {len(cases)} failed:\n" + "\n".join(failures)
    return responses


JSON = {"content-type": "application/json"}
J = {"headers": JSON}
CHAT = {"message": "Which port?"}
COMPLETION = {"messages": [{"role": "user", "content": "Which port?"}]}
JSON_ROUTES = {
    "chat": ("POST", "/api/chat"),
    "search": ("POST", "/api/search"),
    "openai": ("POST", "/v1/chat/completions"),
    "session": ("POST", "/api/auth/session"),
}


def test_bodies_that_are_not_json(http: TestClient) -> None:
    bodies = {
        "garbage": b"{not json",
        "empty": b"",
        "truncated": b'{"message": "hi"',
        "trailing-comma": b'{"message": "hi",}',
        "single-quotes": b"{'message': 'hi'}",
        "a-list": b"[1, 2]",
        "a-string": b'"hi"',
        "null": b"null",
        "latin-1": '{"message": "caf\xe9"}'.encode("latin-1"),
        "nul-bytes": b'{"message": "hi"}\x00\x00',
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "int-5000-digits": b'{"message": "hi", "k": ' + b"9" * 5000 + b"}",
        "nan": b'{"query": NaN, "k": NaN, "message": NaN}',
    }
    cases = {
        f"{route}-{name}": (method, url, {"content": body, "headers": JSON})
        for route, (method, url) in JSON_ROUTES.items()
        for name, body in bodies.items()
    }
    statuses = {name: r.status for name, r in run_named(http, cases).items()}
    assert all(400 <= s < 500 for s in statuses.values()), statuses


def test_wrong_content_types(http: TestClient) -> None:
    body = json.dumps({"message": "hi", "query": "hi", **COMPLETION}).encode()
    types = {
        "text-plain": "text/plain",
        "form": "application/x-www-form-urlencoded",
        "multipart-no-boundary": "multipart/form-data",
        "xml": "application/xml",
        "nonsense": "nonsense",
        "json-latin1-charset": "application/json; charset=latin-1",
        "html": "text/html",
    }
    cases = {
        f"{route}-{name}": (method, url, {"content": body, "headers": {"content-type": ctype}})
        for route, (method, url) in JSON_ROUTES.items()
        for name, ctype in types.items()
    }
    cases["chat-form-fields"] = ("POST", "/api/chat", {"data": {"message": "hi"}})
    cases["search-multipart"] = ("POST", "/api/search", {"files": {"query": ("q", b"hi")}})
    cases["upload-as-json"] = ("POST", "/api/documents", {"json": {"files": ["a.md"]}})
    run_named(http, cases)


def test_ten_megabyte_bodies(http: TestClient) -> None:
    big = "x" * (10 * 1024 * 1024)
    cases = {
        "chat-message": ("POST", "/api/chat", {"json": {"message": big}}),
        "search-query": ("POST", "/api/search", {"json": {"query": big}}),
        "openai-content": ("POST", "/v1/chat/completions", {"json": _completion(big)}),
        "openai-model": (
            "POST",
            "/v1/chat/completions",
            {"json": {**COMPLETION, "model": big}},
        ),
        "session-token": ("POST", "/api/auth/session", {"json": {"token": big}}),
        "chat-unknown-field": ("POST", "/api/chat", {"json": {**CHAT, "padding": big}}),
        "raw-bytes": ("POST", "/api/search", {"content": b"\xff" * len(big), "headers": JSON}),
        "upload": ("POST", "/api/documents", {"files": {"files": ("big.txt", big.encode())}}),
    }
    responses = run_named(http, cases)
    # a body the size of a small book is refused, not answered
    for name in ("chat-message", "search-query", "openai-content", "session-token", "upload"):
        assert 400 <= responses[name].status < 500, (name, responses[name].status)


def _completion(content: Any, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **extra}


def test_out_of_range_values(http: TestClient) -> None:
    search = {
        f"k={k}": ("POST", "/api/search", {"content": f'{{"query": "Redis", "k": {k}}}', **J})
        for k in ("-1", "0", "201", "-9999999999", "10000000000000000000000", "1" + "0" * 400)
    }
    odd: tuple[Any, ...] = (1.5, "five", None, [], {}, -0.5, float("inf"), float("nan"))
    search |= {
        f"k={k!r}": (
            "POST",
            "/api/search",
            {"content": json.dumps({"query": "Redis", "k": k}), **J},
        )
        for k in odd
    }
    cases = {
        **search,
        "mode-unknown": ("POST", "/api/search", {"json": {"query": "x", "mode": "magic"}}),
        "message-8001": ("POST", "/api/chat", {"json": {"message": "x" * 8001}}),
        "message-empty": ("POST", "/api/chat", {"json": {"message": ""}}),
        "message-not-a-string": ("POST", "/api/chat", {"json": {"message": 42}}),
        "conversation-id-129": (
            "POST",
            "/api/chat",
            {"json": {**CHAT, "conversation_id": "c" * 129}},
        ),
        "client-id-empty": ("POST", "/api/chat", {"json": {**CHAT, "client_id": ""}}),
        "openai-no-messages": ("POST", "/v1/chat/completions", {"json": {"messages": []}}),
        "openai-max-tokens-0": (
            "POST",
            "/v1/chat/completions",
            {"json": _completion("hi", max_tokens=0)},
        ),
        "openai-max-tokens-huge": (
            "POST",
            "/v1/chat/completions",
            {"json": _completion("Which port?", max_tokens=10**30)},
        ),
        "openai-role-unknown": (
            "POST",
            "/v1/chat/completions",
            {"json": {"messages": [{"role": "wizard", "content": "hi"}]}},
        ),
        "openai-content-parts-bad": (
            "POST",
            "/v1/chat/completions",
            {"json": _completion([{"text": "hi"}, 42])},
        ),
        "openai-stream-not-bool": (
            "POST",
            "/v1/chat/completions",
            {"json": _completion("hi", stream="perhaps")},
        ),
        "openai-only-system": (
            "POST",
            "/v1/chat/completions",
            {"json": {"messages": [{"role": "system", "content": "hi"}]}},
        ),
        "openai-user-content-8001": (
            "POST",
            "/v1/chat/completions",
            {"json": _completion("x" * 8001)},
        ),
        "openai-user-content-blank": (
            "POST",
            "/v1/chat/completions",
            {"json": _completion("   ")},
        ),
        "job-id-not-hex": ("GET", "/api/documents/jobs/not-a-job", {}),
        "job-id-unknown": ("GET", "/api/documents/jobs/" + "0" * 32, {}),
    }
    responses = run_named(http, cases)
    for name in (
        "k=-1",
        "k=0",
        "k=201",
        "mode-unknown",
        "message-8001",
        "openai-max-tokens-0",
        "openai-user-content-8001",
    ):
        assert 400 <= responses[name].status < 500, (name, responses[name].text)
    assert "at most 8000" in responses["message-8001"].json()["error"]["message"]


def test_unknown_fields_are_ignored(http: TestClient) -> None:
    extra = {"evil": HTML, "__proto__": {"admin": True}, "k2": [1, {"x": None}]}
    cases = {
        "search": ("POST", "/api/search", {"json": {"query": "Redis", **extra}}),
        "chat": ("POST", "/api/chat", {"json": {**CHAT, **extra}}),
        "openai": ("POST", "/v1/chat/completions", {"json": {**COMPLETION, **extra}}),
        "openai-message": (
            "POST",
            "/v1/chat/completions",
            {"json": {"messages": [{"role": "user", "content": "Which port?", **extra}]}},
        ),
    }
    for name, response in run_named(http, cases).items():
        assert response.status == 200, (name, response.text)


def test_path_ids(http: TestClient) -> None:
    ids = {
        "dot-dot": "..",
        "dot-dot-encoded": "%2e%2e",
        "traversal-encoded": "..%2F..%2Fetc%2Fpasswd",
        "traversal-double-encoded": "..%252F..%252Fetc%252Fpasswd",
        "backslashes": "..%5C..%5Cwindows",
        "nul": "a%00b",
        "unicode": "caf%C3%A9",
        "rtl-override": "%E2%80%AEtxt",
        "emoji": "%F0%9F%92%A9",
        "invalid-utf8": "%FF%FE",
        "html": "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        "length-129": "c" * 129,
        "length-10000": "c" * 10_000,
        "spaces": "a%20b",
        "newline": "a%0Ab",
    }
    cases: dict[str, tuple[Any, ...]] = {}
    for name, cid in ids.items():
        url = f"http://testserver/api/conversations/{cid}/messages"
        cases[f"get-{name}"] = ("GET", url, {})
        cases[f"delete-{name}"] = ("DELETE", url, {})
        cases[f"job-{name}"] = ("GET", f"http://testserver/api/documents/jobs/{cid}", {})
        cases[f"remove-{name}"] = ("DELETE", f"http://testserver/api/documents/{cid}", {})
        cases[f"rename-{name}"] = (
            "PATCH",
            f"http://testserver/api/conversations/{cid}",
            {"json": {"title": "renamed"}},
        )
    # dot segments as a client writes them (httpx removes them, as browsers do)
    cases["literal-traversal"] = ("GET", "/api/conversations/../../etc/passwd/messages", {})
    for name, response in run_named(http, cases).items():
        if name == "job-dot-dot":  # /api/documents/jobs/.. is /api/documents: the listing
            assert response.status == 200 and "documents" in response.json(), response.text
            continue
        assert response.status in (404, 405, 422), (name, response.status)


def send_asgi(session: Any, method: str, url: str, **kwargs: Any) -> Reply:
    """Through schemathesis' ASGI client: header values reach the app as the latin-1 bytes a
    real server passes on (TestClient re-encodes them as UTF-8), with a read deadline."""
    TALLY["named requests"] += 1
    r = session.request(method, url, timeout=STREAM_LIMIT_S, **kwargs)
    cut = getattr(r, STREAM_CUT_SHORT_ATTRIBUTE, False)
    return Reply(r.status_code, r.headers, r.content, not cut)


def test_last_event_id(asgi_app: Any) -> None:
    """Resuming an SSE stream: Last-Event-ID must be a seq (else 400), and a resumed stream
    ends like any other."""
    from schemathesis.python import asgi

    with asgi.get_client(asgi_app) as session:
        first = send_asgi(session, "POST", "/api/chat", json={"message": "Which port?"})
        assert first.status == 200 and first.ended, first
        events = [
            json.loads(line[6:]) for line in first.text.splitlines() if line.startswith("data: ")
        ]
        cid = next(e["conversation_id"] for e in events if e["type"] == "ai.start")
        last = str(events[-1]["seq"])
        body = {"message": "Which port?", "conversation_id": cid}
        values = {
            "letters": "abc",
            "negative": "-1",
            "fraction": "1.5",
            "exponent": "1e3",
            "empty": "",
            "html": HTML,
            "hex": "0x10",
            "huge": "9" * 40,  # a seq far past the end: nothing to replay
            # a client whose connection dropped right after the last event resumes from it
            "after-the-end": last,
            "digits-over-4300": "9" * 4301,  # str.isdigit() is True; int() refuses it
            "superscript-two": "\xb2",  # the byte 0xB2 is '²': isdigit() True, int() refuses
            "superscript-one": "\xb9",
            "fullwidth-one-as-utf8": "１".encode().decode("latin-1"),
        }
        cases = {
            name: ("POST", "/api/chat", {"json": body, "headers": {"last-event-id": value}})
            for name, value in values.items()
        }
        cases["without-conversation"] = (
            "POST",
            "/api/chat",
            {"json": {"message": "hi"}, "headers": {"last-event-id": "1"}},
        )
        responses = run_named(session, cases, send_asgi)
    for name in ("letters", "negative", "fraction", "html", "without-conversation"):
        assert responses[name].status == 400, (name, responses[name].text)


def test_html_never_comes_back_live(http: TestClient) -> None:
    """HTML in every string field of every route; the answers echo it (the FakeLLM's every
    answer also starts with a <script>): nothing may come back as live markup."""
    cid = "html-test"
    cases = {
        "chat-message": ("POST", "/api/chat", {"json": {"message": HTML}}),
        "chat-client-id": ("POST", "/api/chat", {"json": {**CHAT, "client_id": HTML}}),
        "chat-conversation-id": ("POST", "/api/chat", {"json": {**CHAT, "conversation_id": HTML}}),
        "chat-kept": ("POST", "/api/chat", {"json": {"message": HTML, "conversation_id": cid}}),
        "history": ("GET", f"/api/conversations/{cid}/messages", {}),
        "search-query": ("POST", "/api/search", {"json": {"query": HTML}}),
        "search-mode": ("POST", "/api/search", {"json": {"query": "x", "mode": HTML}}),
        "openai": ("POST", "/v1/chat/completions", {"json": _completion(HTML, model=HTML)}),
        "openai-stream": (
            "POST",
            "/v1/chat/completions",
            {"json": _completion(HTML, model=HTML, stream=True)},
        ),
        "openai-parts": (
            "POST",
            "/v1/chat/completions",
            {"json": _completion([{"type": HTML, "text": HTML}], user=HTML)},
        ),
        "openai-role": (
            "POST",
            "/v1/chat/completions",
            {"json": {"messages": [{"role": HTML, "content": HTML}]}},
        ),
        "session-token": ("POST", "/api/auth/session", {"json": {"token": HTML}}),
        "session-jwt-alg": ("POST", "/api/auth/session", {"json": {"token": _jwt({"alg": HTML})}}),
        "last-event-id": (
            "POST",
            "/api/chat",
            {"json": {**CHAT, "conversation_id": cid}, "headers": {"last-event-id": HTML}},
        ),
        "upload-name": ("POST", "/api/documents", {"files": {"files": (f"{HTML}.md", b"# hi")}}),
        "upload-type": ("POST", "/api/documents", {"files": {"files": (f"a.{HTML}", b"hi")}}),
        "unknown-path": ("GET", f"/api/{HTML}", {}),
        "wrong-method": ("PUT", "/api/search", {"json": {"query": HTML}}),
    }
    run_named(http, cases)


def _jwt(header: dict[str, Any]) -> str:
    import base64

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part(header)}.{part({'sub': 'x'})}.c2ln"


def test_lone_surrogates(http: TestClient) -> None:
    """ "\\ud800" is valid JSON but no UTF-8 can carry it: a field that keeps it and echoes it
    back must not break the response (UnicodeEncodeError while rendering: a 500)."""

    def raw(obj: dict[str, Any]) -> dict[str, Any]:
        return {"content": json.dumps(obj).encode(), "headers": JSON}  # \\ud800 stays escaped

    s = "hi \ud800 there"
    cases = {
        "chat-message": ("POST", "/api/chat", raw({"message": s})),
        "chat-client-id": ("POST", "/api/chat", raw({**CHAT, "client_id": s})),
        "search-query": ("POST", "/api/search", raw({"query": s})),
        "edit-message": ("PATCH", "/api/conversations/c1/messages/m1", raw({"message": s})),
        "feedback-comment": (
            "PUT",
            "/api/conversations/c1/messages/m1/feedback",
            raw({"rating": "down", "comment": s}),
        ),
        "openai-content": ("POST", "/v1/chat/completions", raw(_completion(s))),
        "openai-model": ("POST", "/v1/chat/completions", raw({**COMPLETION, "model": s})),
        "openai-model-stream": (
            "POST",
            "/v1/chat/completions",
            raw({**COMPLETION, "model": s, "stream": True}),
        ),
        "openai-part-text": (
            "POST",
            "/v1/chat/completions",
            raw(_completion([{"type": "text", "text": s}])),
        ),
        "session-token": ("POST", "/api/auth/session", raw({"token": s})),
        "session-jwt-alg": ("POST", "/api/auth/session", raw({"token": _jwt({"alg": s})})),
    }
    run_named(http, cases)


def test_methods_and_paths_that_do_not_exist(http: TestClient) -> None:
    cases = {
        "put-search": ("PUT", "/api/search", {"json": {"query": "x"}}),
        "get-chat": ("GET", "/api/chat", {}),
        "patch-completions": ("PATCH", "/v1/chat/completions", {"json": COMPLETION}),
        "unknown": ("GET", "/api/nope", {}),
        "trailing-slash": ("POST", "/api/search/", {"json": {"query": "x"}}),
    }
    responses = run_named(http, cases)
    assert responses["unknown"].json()["error"]["code"] == "not_found"
    assert responses["put-search"].json()["error"]["code"] == "method_not_allowed"
