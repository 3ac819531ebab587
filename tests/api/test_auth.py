"""Auth and authorisation on every transport: real Redis, real retrieval, a scripted FakeLLM.

Tokens come from the same code as ``python -m rag_chat token`` (HS256), or are signed with a
freshly generated RSA key (RS256). Each test tries what an attacker would: no token, a forged
or expired one, someone else's conversation, a room outside the token's patterns.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from openai import AuthenticationError, OpenAI
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from rag_chat.auth import Authenticator
from rag_chat.llm.fake import FakeLLM
from rag_chat.settings import Settings

SECRET = "test-secret-that-is-long-enough-for-hs256"


@pytest.fixture
def auth_settings(server_settings: Settings) -> Settings:
    return server_settings.model_copy(update={"jwt_secret": SECRET})


def mint(settings: Settings, user: str, **kw: Any) -> str:
    return Authenticator(settings).mint(user, **kw)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def until(ws: WebSocketTestSession, *types: str) -> dict[str, Any]:
    while True:
        event: dict[str, Any] = ws.receive_json()
        if event["type"] in (*types, "error"):
            return event


def refused(ws: WebSocketTestSession) -> tuple[dict[str, Any], int]:
    """The error event the server sent, and the close code that followed it."""
    event = ws.receive_json()
    with pytest.raises(WebSocketDisconnect) as info:
        ws.receive_json()
    return event, info.value.code


# --- authentication ---


def test_websocket_needs_a_valid_token(make_app: Any, auth_settings: Settings) -> None:
    good = mint(auth_settings, "alice")
    other_secret = auth_settings.model_copy(
        update={"jwt_secret": "another-secret-entirely-and-long-enough!!"}
    )
    expired = jwt.encode({"sub": "alice", "exp": int(time.time()) - 3600}, SECRET, "HS256")
    none_alg = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, "", algorithm="none")
    with TestClient(make_app(FakeLLM(), auth_settings)) as client:
        # no credential at all: the first event must be `auth`
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "message", "text": "hello"})
            event, code = refused(ws)
        assert (event["code"], code) == ("unauthorized", 4401)
        assert "first event must be" in event["message"]
        for token, reason in [
            (mint(other_secret, "alice"), "Signature verification failed"),
            (expired, "token expired"),
            (none_alg, "'none' are not accepted"),
            ("not-a-jwt", "malformed token"),
        ]:
            with client.websocket_connect(
                "/ws", subprotocols=["rag_chat", f"bearer.{token}"]
            ) as ws:
                event, code = refused(ws)
            assert (event["code"], code) == ("unauthorized", 4401), token
            assert reason in event["message"], (reason, event)

        # the three ways in: subprotocol, cookie, first `auth` event
        with client.websocket_connect("/ws", subprotocols=["rag_chat", f"bearer.{good}"]) as ws:
            assert ws.accepted_subprotocol == "rag_chat"
            ws.send_json({"type": "join", "room": "lobby", "user": "mallory"})
            joined = until(ws, "joined")
            assert joined["user"] == "alice"  # the token's subject, not a name the client picks
        with client.websocket_connect("/ws", headers={"cookie": f"rag_session={good}"}) as ws:
            ws.send_json({"type": "join", "room": "lobby"})
            assert until(ws, "joined")["user"] == "alice"
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "auth", "token": good})
            ws.send_json({"type": "join", "room": "lobby"})
            assert until(ws, "joined")["user"] == "alice"


def test_rs256_public_key(make_app: Any, server_settings: Settings, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = tmp_path / "public.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    settings = server_settings.model_copy(update={"jwt_public_key": str(public)})
    token = Authenticator(settings).mint("carol", private_key=private_pem)
    hs_token = mint(server_settings.model_copy(update={"jwt_secret": SECRET}), "carol")
    with TestClient(make_app(FakeLLM(), settings)) as client:
        ok = client.post("/api/search", json={"query": "ports", "k": 1}, headers=bearer(token))
        assert ok.status_code == 200
        # an HS256 token when only a public key is configured: refused, not "verified" with it
        bad = client.post("/api/search", json={"query": "ports"}, headers=bearer(hs_token))
        assert (
            bad.status_code == 401 and "'HS256' are not accepted" in bad.json()["error"]["message"]
        )


def test_http_endpoints_need_a_bearer_token(make_app: Any, auth_settings: Settings) -> None:
    token = mint(auth_settings, "alice")
    llm = FakeLLM()
    with TestClient(make_app(llm, auth_settings)) as client:
        for method, path, body in [
            ("POST", "/api/chat", {"message": "hi"}),
            ("POST", "/api/search", {"query": "hi"}),
            ("GET", "/api/conversations", None),
            ("GET", "/api/conversations/abc/messages", None),
            ("DELETE", "/api/conversations/abc/messages", None),
            ("PATCH", "/api/conversations/abc", {"title": "x"}),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("GET", "/v1/models", None),
        ]:
            r = client.request(method, path, json=body)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            bad = client.request(method, path, json=body, headers=bearer(token + "x"))
            assert bad.status_code == 401, path
        # open to probes and scrapers
        for path in ("/healthz", "/readyz", "/metrics", "/api/auth"):
            assert client.get(path).status_code in (200, 503), path
        assert client.get("/api/auth").json() == {"mode": "jwt", "user": None}

        # the official SDK, with the token as its API key
        sdk = OpenAI(base_url="http://testserver/v1", api_key=token, http_client=client)
        assert [m.id for m in sdk.models.list()] == ["rag_chat"]
        llm.enqueue(["Port ", "8000 [1]."])
        done = sdk.chat.completions.create(
            model="rag_chat", messages=[{"role": "user", "content": "Which port?"}]
        )
        assert done.choices[0].message.content == "Port 8000 [1]."
        wrong = OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=client)
        with pytest.raises(AuthenticationError):
            wrong.models.list()

        # sign-in keeps the token in an HttpOnly, SameSite=Strict cookie
        r = client.post("/api/auth/session", json={"token": token})
        assert r.status_code == 200 and r.json()["user"] == "alice"
        cookie = r.headers["set-cookie"]
        assert "rag_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert client.get("/api/auth").json() == {"mode": "jwt", "user": "alice"}
        assert client.get("/api/conversations").status_code == 200  # via the cookie
        assert client.delete("/api/auth/session").status_code == 204
        client.cookies.clear()
        assert client.get("/api/conversations").status_code == 401
        assert client.post("/api/auth/session", json={"token": "bad"}).status_code == 401


# --- authorisation ---


def sse_chat(client: TestClient, token: str, message: str, **body: Any) -> dict[str, Any]:
    """POST /api/chat; returns the ai.start event (the conversation it went to)."""
    with client.stream(
        "POST", "/api/chat", json={"message": message, **body}, headers=bearer(token)
    ) as r:
        assert r.status_code == 200, r.read()
        start = None
        for line in r.iter_lines():
            if line.startswith("data: ") and '"ai.start"' in line:
                import json

                start = json.loads(line[6:])
        assert start is not None
        return start


def test_nobody_reads_resumes_or_joins_someone_elses_conversation(
    make_app: Any, auth_settings: Settings
) -> None:
    alice, bob = mint(auth_settings, "alice"), mint(auth_settings, "bob")
    llm = FakeLLM()
    with TestClient(make_app(llm, auth_settings)) as client:
        llm.enqueue(["Alice's ", "secret ", "answer."])
        conv = sse_chat(client, alice, "What is the default port?")["conversation_id"]
        path = f"/api/conversations/{conv}/messages"
        assert client.get(path, headers=bearer(alice)).status_code == 200
        # to bob, alice's conversation does not exist
        for method in ("GET", "DELETE"):
            r = client.request(method, path, headers=bearer(bob))
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", method
        r = client.post(
            "/api/chat",
            json={"message": "continue", "conversation_id": conv},
            headers={**bearer(bob), "Last-Event-ID": "0"},
        )
        assert r.status_code == 404  # resume
        r = client.post(
            "/api/chat", json={"message": "hi", "conversation_id": conv}, headers=bearer(bob)
        )
        assert r.status_code == 404  # continue
        listed = client.get("/api/conversations", headers=bearer(alice)).json()["conversations"]
        assert [c["id"] for c in listed] == [conv]
        assert listed[0]["title"] == "What is the default port?"
        assert client.get("/api/conversations", headers=bearer(bob)).json() == {
            "conversations": [],
            "next_before": None,
        }

        with client.websocket_connect("/ws", subprotocols=["rag_chat", f"bearer.{bob}"]) as ws:
            ws.send_json({"type": "join", "room": conv, "last_seq": 0})  # resume
            event = until(ws, "joined")
            assert event["code"] == "not_found"
            ws.send_json({"type": "join", "room": conv, "private": True})
            assert until(ws, "joined")["code"] == "not_found"
            ws.send_json(
                {"type": "message", "text": "hi", "conversation_id": conv, "client_id": "b1"}
            )
            error = until(ws, "ai.start")
            assert error["code"] == "not_found"
            # the error says what it is about
            assert (error["conversation_id"], error["client_id"]) == (conv, "b1")
            ws.send_json({"type": "cancel", "message_id": "x", "room": conv})
            assert until(ws, "ai.done")["code"] == "not_joined"
        assert len(llm.calls) == 1  # bob never got an answer out of alice's conversation
        # alice's own history is intact
        messages = client.get(path, headers=bearer(alice)).json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]

        # and alice resumes her own conversation over the WebSocket, and starts a new one by
        # joining it as private before its first message
        with client.websocket_connect("/ws", subprotocols=["rag_chat", f"bearer.{alice}"]) as ws:
            ws.send_json({"type": "join", "room": conv, "last_seq": 0})
            assert until(ws, "joined")["room"] == conv
            ws.send_json({"type": "join", "room": "alice-new", "private": True})
            assert until(ws, "joined")["room"] == "alice-new"
            llm.enqueue(["fine"])
            ws.send_json({"type": "message", "text": "hello", "conversation_id": "alice-new"})
            assert until(ws, "ai.done")["finish_reason"] == "stop"
        listed = client.get("/api/conversations", headers=bearer(alice)).json()["conversations"]
        assert {c["id"] for c in listed} == {conv, "alice-new"}


def test_a_conversation_is_renamed_by_its_owner_alone(
    make_app: Any, auth_settings: Settings
) -> None:
    alice = mint(auth_settings, "alice", rooms=["team-*"])
    bob = mint(auth_settings, "bob")
    llm = FakeLLM()
    with TestClient(make_app(llm, auth_settings)) as client:
        convs = []
        for question in ("First question?", "Second question?", "Third question?"):
            llm.enqueue(["An answer."])
            convs.append(sse_chat(client, alice, question)["conversation_id"])
            time.sleep(0.01)  # distinct times: the listing's order
        conv = convs[1]

        r = client.patch(
            f"/api/conversations/{conv}",
            json={"title": "Bell\x07 and\x00NUL\x1b[31m"},
            headers=bearer(alice),
        )
        assert r.json() == {"id": conv, "title": "Bell and NUL [31m"}  # control characters out
        r = client.patch(
            f"/api/conversations/{conv}",
            json={"title": "  Ports\tand \n servers  "},
            headers=bearer(alice),
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"id": conv, "title": "Ports and servers"}
        listed = client.get("/api/conversations", headers=bearer(alice)).json()["conversations"]
        assert [(c["id"], c["title"]) for c in listed] == [
            (convs[2], "Third question?"),
            (conv, "Ports and servers"),
            (convs[0], "First question?"),
        ]
        # paged, newest first: next_before is the cursor, null on the last page
        page = client.get("/api/conversations?limit=2", headers=bearer(alice)).json()
        assert [c["id"] for c in page["conversations"]] == [convs[2], conv]
        assert page["next_before"] == page["conversations"][-1]["updated_at"]
        older = client.get(
            "/api/conversations",
            params={"limit": 2, "before": page["next_before"]},
            headers=bearer(alice),
        ).json()
        assert [c["id"] for c in older["conversations"]] == [convs[0]]
        assert older["next_before"] is None
        for query in ("limit=0", "limit=201", "before=nan", "before=soon", "limit=x"):
            r = client.get(f"/api/conversations?{query}", headers=bearer(alice))
            assert r.status_code == 422 and r.json()["error"]["code"] == "bad_request", query

        llm.enqueue(["More."])  # a later message keeps the title given
        sse_chat(client, alice, "And then?", conversation_id=conv)
        listed = client.get("/api/conversations", headers=bearer(alice)).json()["conversations"]
        assert (listed[0]["id"], listed[0]["title"]) == (conv, "Ports and servers")

        refused = [
            (bob, conv, {"title": "mine now"}, 404, "not_found", "no conversation"),
            (alice, "nope", {"title": "x"}, 404, "not_found", "no conversation"),
            (alice, conv, {"title": " \n\t "}, 400, "bad_request", "the title is empty"),
            (alice, conv, {"title": "x" * 81}, 400, "bad_request", "81 characters; at most 80"),
            (alice, conv, {}, 422, "bad_request", "title"),
            (alice, conv, {"title": 5}, 422, "bad_request", "title"),
        ]
        for token, cid, body, status, code, message in refused:
            r = client.patch(f"/api/conversations/{cid}", json=body, headers=bearer(token))
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert error["code"] == code and message in error["message"], error
            assert "\n" not in error["message"]
        # a shared room's name is its id
        with client.websocket_connect("/ws", subprotocols=["rag_chat", f"bearer.{alice}"]) as ws:
            ws.send_json({"type": "join", "room": "team-red"})
            assert until(ws, "joined")["room"] == "team-red"
        r = client.patch("/api/conversations/team-red", json={"title": "x"}, headers=bearer(alice))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
        listed = client.get("/api/conversations", headers=bearer(alice)).json()["conversations"]
        assert [c["title"] for c in listed] == [
            "Ports and servers",
            "Third question?",
            "First question?",
        ]  # nothing a refused request changed


def test_cancel_only_by_members_and_rooms_only_by_pattern(
    make_app: Any, auth_settings: Settings
) -> None:
    alice = mint(auth_settings, "alice", rooms=["team-*"])
    bob = mint(auth_settings, "bob", rooms=["other-*"])
    llm = FakeLLM(delay=0.05)
    with TestClient(make_app(llm, auth_settings)) as client:
        with client.websocket_connect("/ws", subprotocols=["rag_chat", f"bearer.{bob}"]) as ws:
            ws.send_json({"type": "join", "room": "team-red"})
            event = until(ws, "joined")
            assert event["code"] == "forbidden" and "team-red" in event["message"]
        with (
            client.websocket_connect("/ws", subprotocols=["rag_chat", f"bearer.{alice}"]) as wa,
            client.websocket_connect("/ws", subprotocols=["rag_chat", f"bearer.{bob}"]) as wb,
        ):
            wa.send_json({"type": "join", "room": "team-red"})
            assert until(wa, "joined")["room"] == "team-red"
            llm.enqueue(["slow "] * 200)
            wa.send_json({"type": "message", "room": "team-red", "text": "@ai explain"})
            reply = until(wa, "ai.start")["message_id"]
            wb.send_json({"type": "cancel", "message_id": reply, "room": "team-red"})
            assert until(wb, "ai.done")["code"] == "not_joined"
            wb.send_json({"type": "cancel", "message_id": reply})
            assert until(wb, "ai.done")["code"] == "not_found"
            # alice's reply was not stopped by bob: it runs to the end
            done = until(wa, "ai.done")
            assert done["finish_reason"] == "stop", done
        # a shared room's history is readable by those allowed in, deletable by nobody via API
        r = client.get("/api/conversations/team-red/messages", headers=bearer(alice))
        assert r.status_code == 200
        r = client.get("/api/conversations/team-red/messages", headers=bearer(bob))
        assert r.status_code == 403
        r = client.delete("/api/conversations/team-red/messages", headers=bearer(alice))
        assert r.status_code == 403


# --- origins and CORS ---


def test_cross_site_websocket_upgrades_are_refused(
    make_app: Any, server_settings: Settings
) -> None:
    settings = server_settings.model_copy(update={"allowed_origins": ["https://chat.example"]})
    with TestClient(make_app(FakeLLM(), settings)) as client:
        for origin in ("http://evil.example", "null", "http://testserver.evil.example"):
            with (
                pytest.raises(WebSocketDisconnect) as info,
                client.websocket_connect("/ws", headers={"origin": origin}) as ws,
            ):
                ws.receive_json()
            assert info.value.code == 4403, origin
        for origin in ("http://testserver", "https://chat.example"):  # same origin, allowed
            with client.websocket_connect("/ws", headers={"origin": origin}) as ws:
                ws.send_json({"type": "ping"})
                assert ws.receive_json() == {"type": "pong"}
        with client.websocket_connect("/ws") as ws:  # not a browser: no Origin
            ws.send_json({"type": "ping"})
            assert ws.receive_json() == {"type": "pong"}

        preflight = {"Access-Control-Request-Method": "POST"}
        ok = client.options("/api/search", headers={"Origin": "https://chat.example", **preflight})
        assert ok.headers["access-control-allow-origin"] == "https://chat.example"
        assert ok.headers["access-control-allow-credentials"] == "true"
        no = client.options("/api/search", headers={"Origin": "http://evil.example", **preflight})
        assert "access-control-allow-origin" not in no.headers


def test_allowed_origins_setting_parses_lists() -> None:
    def parse(value: str) -> list[str]:
        return Settings(allowed_origins=value, _env_file=None).allowed_origins  # type: ignore[call-arg,arg-type]

    assert parse("https://a.example, https://b.example/") == [
        "https://a.example",
        "https://b.example",
    ]
    assert parse('["https://a.example"]') == ["https://a.example"]
    assert parse("") == []
