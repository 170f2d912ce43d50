"""Bad input: always a clear 4xx, never a 5xx, never an echo, and nothing stored changes.

CONTRACT §2 ("no input, however large or malformed, yields a 5xx"; no error
echoes a password or token) and §4 ("nothing a client sends can lose or
corrupt stored data").
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa

from authserver.store.schema import refresh_families, refresh_tokens, users
from authserver.store.sql import SqlStore
from tests.helpers.app import Running, StartApp
from tests.helpers.factories import DEFAULT_PASSWORD, make_user

SECRET = "Sentinel-Secret-7f3a"  # a password or token that must never come back
MB = 1024 * 1024
JSON_CT = {"Content-Type": "application/json"}
FORM_CT = {"Content-Type": "application/x-www-form-urlencoded"}


@dataclass
class Session:
    running: Running
    refresh_token: str
    access_token: str
    before: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)


async def snapshot(running: Running) -> dict[str, list[tuple[Any, ...]]]:
    """Every row that matters: users, refresh families and refresh tokens."""
    store = running.store
    assert isinstance(store, SqlStore)
    rows = {}
    async with store.engine.connect() as conn:
        for table in (users, refresh_families, refresh_tokens):
            query = sa.select(table).order_by(*table.primary_key.columns)
            rows[table.name] = [tuple(row) for row in (await conn.execute(query)).all()]
    return rows


@pytest.fixture
async def session(start_app: StartApp, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Session]:
    """Alice, logged in; afterwards, check that nothing stored changed or leaked."""
    caplog.set_level(logging.DEBUG, logger="authserver")
    running = await start_app(login_max_failures=100_000)
    await make_user(running.store, "alice")
    tokens = await running.login()
    state = Session(running, tokens["refresh_token"], tokens["access_token"])
    state.before = await snapshot(running)
    yield state
    assert await snapshot(running) == state.before, "bad input changed stored data"
    for record in caplog.records:
        logged = str(record.__dict__)
        assert SECRET not in logged, record.getMessage()
        assert DEFAULT_PASSWORD not in logged
        assert state.refresh_token not in logged
    # The session still works: nothing was spent or revoked.
    r = await running.client.post("/refresh", json={"refresh_token": state.refresh_token})
    assert r.status_code == 200, r.text


def check(r: httpx.Response, expected: int | tuple[int, ...], name: str) -> None:
    allowed = expected if isinstance(expected, tuple) else (expected,)
    assert r.status_code in allowed, (name, r.status_code, r.text[:300])
    assert r.status_code < 500, name
    assert SECRET not in r.text, name
    assert SECRET not in str(r.headers), name
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body.get("error"), str), (name, body)
        assert isinstance(body.get("error_description"), str), (name, body)


async def test_login(session: Session) -> None:
    client = session.running.client
    cases: dict[str, tuple[int | tuple[int, ...], dict[str, Any]]] = {
        "malformed JSON": (400, {"content": f'{{"username": "alice", "password": "{SECRET}'}),
        "trailing garbage": (400, {"content": f'{{"username":"alice","password":"{SECRET}"}}x'}),
        "JSON array": (400, {"json": ["alice", SECRET]}),
        "JSON string": (400, {"content": json.dumps(SECRET)}),
        "JSON number": (400, {"content": "1"}),
        "JSON null": (400, {"content": "null"}),
        "empty body": (400, {"content": b""}),
        "empty object": (400, {"json": {}}),
        "no password": (400, {"json": {"username": "alice"}}),
        "no username": (400, {"json": {"password": SECRET}}),
        "empty username": (400, {"json": {"username": "", "password": SECRET}}),
        "extra fields": (401, {"json": {"username": "alice", "password": SECRET, "admin": True}}),
        "number username": (400, {"json": {"username": 123, "password": SECRET}}),
        "number password": (400, {"json": {"username": "alice", "password": 12345678}}),
        "bool password": (400, {"json": {"username": "alice", "password": True}}),
        "null password": (400, {"json": {"username": "alice", "password": None}}),
        "list username": (400, {"json": {"username": ["alice"], "password": SECRET}}),
        "object password": (400, {"json": {"username": "alice", "password": {"p": SECRET}}}),
        "list scope": (400, {"json": {"username": "alice", "password": SECRET, "scope": ["r"]}}),
        "number client_id": (
            400,
            {"json": {"username": "alice", "password": SECRET, "client_id": 5}},
        ),
        "bad client_id": (
            400,
            {"json": {"username": "alice", "password": SECRET, "client_id": "a\nb"}},
        ),
        "non-UTF-8 JSON": (
            400,
            {"content": b'{"username": "alice", "password": "\xff\xfe' + SECRET.encode() + b'"}'},
        ),
        "lone surrogate": (
            (400, 401),
            {"content": '{"username": "alice", "password": "\\ud800' + SECRET + '"}'},
        ),
        "NUL in password": (401, {"json": {"username": "alice", "password": "\x00" + SECRET}}),
        # PostgreSQL cannot even compare a string with a NUL in it.
        "NUL in username": (401, {"json": {"username": "ali\x00ce", "password": SECRET}}),
        "deeply nested": (400, {"content": "[" * 100_000}),
        "deeply nested object": (400, {"content": '{"a":' * 50_000}),
        "huge number": (400, {"content": '{"username": "alice", "password": 1e999999}'}),
        "1 MB password": (401, {"json": {"username": "alice", "password": SECRET * (MB // 20)}}),
        "1 MB username": (401, {"json": {"username": "a" * MB, "password": SECRET}}),
        "control characters": (401, {"json": {"username": "al\x1bice\r\n", "password": SECRET}}),
        "unicode": (401, {"json": {"username": "ålice😀", "password": SECRET + "😀"}}),
        "3 MB body": (413, {"json": {"username": "alice", "password": SECRET * (3 * MB // 20)}}),
    }
    for name, (expected, kwargs) in cases.items():
        headers = JSON_CT if "content" in kwargs else {}
        check(await client.post("/login", headers=headers, **kwargs), expected, name)

    form_cases: dict[str, tuple[int, bytes]] = {
        "non-UTF-8 form": (400, b"username=alice&password=%ff%fe" + SECRET.encode()),
        "raw non-UTF-8 form": (400, b"username=alice&password=\xff" + SECRET.encode()),
        "repeated field": (400, f"username=alice&username=bob&password={SECRET}".encode()),
        "too many fields": (400, b"&".join(b"f%d=x" % i for i in range(100))),
        "form without password": (400, b"username=alice"),
        "1 MB form password": (401, b"username=alice&password=" + SECRET.encode() * (MB // 20)),
        "form nonsense": (400, b"=&&==&%%%"),
    }
    for name, (expected, body) in form_cases.items():
        check(await client.post("/login", headers=FORM_CT, content=body), expected, name)

    for method in ("GET", "PUT", "DELETE"):
        r = await client.request(method, "/login")
        check(r, 405, method)
        assert r.json()["error"] == "invalid_request", method  # an RFC 6749 §5.2 code
        assert "POST" in r.headers["Allow"], method


async def test_unknown_paths_answer_with_the_contract_error_body(session: Session) -> None:
    for path in ("/nowhere", "/tokens", "/.well-known/webfinger"):
        r = await session.running.client.get(path)
        check(r, 404, path)
        assert r.json()["error"] == "invalid_request", path


async def test_refresh_and_logout(session: Session) -> None:
    client = session.running.client
    token = session.refresh_token
    bodies: dict[str, tuple[int | tuple[int, ...], dict[str, Any]]] = {
        "malformed JSON": (400, {"content": f'{{"refresh_token": "{SECRET}', "headers": JSON_CT}),
        "JSON array": (400, {"json": [SECRET]}),
        "empty object": (400, {"json": {}}),
        "empty token": (400, {"json": {"refresh_token": ""}}),
        "number token": (400, {"json": {"refresh_token": 1234}}),
        "null token": (400, {"json": {"refresh_token": None}}),
        "list token": (400, {"json": {"refresh_token": [token]}}),
        "object token": (400, {"json": {"refresh_token": {"t": token}}}),
        "non-UTF-8": (
            400,
            {"content": b'{"refresh_token": "\xff' + SECRET.encode() + b'"}', "headers": JSON_CT},
        ),
        "deeply nested": (400, {"content": "[" * 100_000, "headers": JSON_CT}),
        "1 MB token": (401, {"json": {"refresh_token": SECRET * (MB // 20)}}),
    }
    for name, (expected, kwargs) in bodies.items():
        check(await client.post("/refresh", **kwargs), expected, f"/refresh {name}")
        logout_expected = 204 if expected == 401 else expected
        check(await client.post("/logout", **kwargs), logout_expected, f"/logout {name}")
    # A scope of the wrong type, next to the real token, must not spend it.
    for scope in (["read"], 5, "re\x00ad", "admin"):
        r = await client.post("/refresh", json={"refresh_token": token, "scope": scope})
        check(r, 400, f"scope {scope!r}")
        assert token not in r.text


def basic(raw: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def test_token_and_revoke(session: Session) -> None:
    client = session.running.client
    password_form = {"grant_type": "password", "username": "alice", "password": SECRET}
    cases: dict[str, tuple[int, str, dict[str, Any]]] = {
        "JSON body": (400, "/token", {"json": password_form}),
        "non-UTF-8 form": (
            400,
            "/token",
            {"content": b"grant_type=password&password=\xff" + SECRET.encode(), "headers": FORM_CT},
        ),
        "grant_type array": (400, "/token", {"content": b"grant_type[]=password"}),
        "1 MB password": (
            400,
            "/token",
            {"data": {**password_form, "password": SECRET * (MB // 20)}},
        ),
        "100 KB Basic header": (
            401,
            "/token",
            {"data": password_form, "headers": {"Authorization": "Basic " + "QUFB" * 25_000}},
        ),
        "100 KB Basic client_id": (
            400,
            "/token",
            {"data": password_form, "headers": basic(b"c" * 100_000 + b":")},
        ),
        "non-UTF-8 Basic": (401, "/token", {"data": password_form, "headers": basic(b"\xff:")}),
        "Basic with secret": (
            401,
            "/token",
            {"data": password_form, "headers": basic(f"c:{SECRET}".encode())},
        ),
        "Basic not base64": (
            401,
            "/token",
            {"data": password_form, "headers": {"Authorization": "Basic %%%"}},
        ),
        "revoke JSON": (400, "/revoke", {"json": {"token": SECRET}}),
        "revoke non-UTF-8": (
            400,
            "/revoke",
            {"content": b"token=\xff" + SECRET.encode(), "headers": FORM_CT},
        ),
        "revoke 1 MB token": (200, "/revoke", {"data": {"token": SECRET * (MB // 20)}}),
        "revoke repeated": (
            400,
            "/revoke",
            {"content": f"token={SECRET}&token=x".encode(), "headers": FORM_CT},
        ),
    }
    for name, (expected, path, kwargs) in cases.items():
        check(await client.post(path, **kwargs), expected, name)


async def test_protected_headers(session: Session) -> None:
    client = session.running.client
    headers: dict[str, tuple[int, dict[str, Any]]] = {
        "100 KB bearer": (401, {"Authorization": "Bearer " + "A" * 100_000}),
        "100 KB JWT-shaped": (401, {"Authorization": "Bearer " + ".".join(["A" * 33_000] * 3)}),
        "100 KB other scheme": (401, {"Authorization": "Digest " + "A" * 100_000}),
        "non-ASCII bytes": (401, {"Authorization": b"Bearer \xff\xfe" + SECRET.encode()}),
        "UTF-8 token": (401, {"Authorization": ("Bearer é" + SECRET).encode()}),
        "two tokens": (401, {"Authorization": f"Bearer {SECRET} {SECRET}"}),
        "doubled scheme": (401, {"Authorization": f"Bearer Bearer {session.access_token}"}),
    }
    for name, (expected, header) in headers.items():
        r = await client.get("/protected", headers=header)
        check(r, expected, name)
        assert "Bearer" in r.headers["www-authenticate"]


# Shapes a token can take: empty, tiny, huge, JWT-like, binary, unicode, injections.
GARBAGE_TOKENS = [
    " ",
    "\t",
    "a",
    "null",
    "{}",
    "[]",
    "...",
    "a.b.c",
    SECRET,
    SECRET + "." + SECRET + "." + SECRET,
    "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9." + SECRET,
    base64.b64encode(SECRET.encode() * 10).decode(),
    "%00" + SECRET,
    "é" + SECRET,
    "😀" + SECRET,
    "' OR '1'='1" + SECRET,
    "x" * 512,
    "x" * 513,
    SECRET * 500,
]


async def test_garbage_tokens_everywhere(session: Session) -> None:
    client = session.running.client
    token = session.refresh_token
    variants = [token + "x", token[:-1], token.upper(), token + " ", "\n" + token]
    for garbage in [*GARBAGE_TOKENS, *variants, session.access_token]:
        name = repr(garbage[:30])
        check(await client.post("/refresh", json={"refresh_token": garbage}), 401, name)
        check(
            await client.post(
                "/token", data={"grant_type": "refresh_token", "refresh_token": garbage}
            ),
            400,
            name,
        )
        check(await client.post("/revoke", data={"token": garbage}), 200, name)
        check(await client.post("/logout", json={"refresh_token": garbage}), 204, name)
        if garbage != session.access_token:
            r = await client.get(
                "/protected", headers={b"Authorization": b"Bearer " + garbage.encode()}
            )
            check(r, 401, name)


@pytest.mark.parametrize("path", ["/login", "/refresh", "/logout"])
@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "multipart/form-data; boundary=x", "application/xml", "text/json"],
)
async def test_a_seed_body_of_another_media_type_is_415(
    session: Session, path: str, content_type: str | None
) -> None:
    """A browser posts text/plain (or a form) cross-site without a CORS preflight: only the
    two media types these endpoints document are read at all."""
    body = json.dumps(
        {"username": "alice", "password": DEFAULT_PASSWORD, "refresh_token": session.refresh_token}
    )
    headers = {"Content-Type": content_type} if content_type else {}
    r = await session.running.client.post(path, content=body.encode(), headers=headers)
    assert r.status_code == 415, r.text
    assert set(r.json()) == {"error", "error_description"}
    assert r.json()["error"] == "invalid_request"


_DESCRIPTION = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")
MARK = 'zq"\\é\x01mark'


async def test_no_error_description_carries_what_the_client_sent(session: Session) -> None:
    """RFC 6749 §5.2's characters only, and never a parameter name or value from the
    request, however the request goes wrong."""
    client = session.running.client
    q = quote(MARK)
    attempts = [
        client.post("/token", content=f"{q}=1&{q}=2".encode(), headers=FORM_CT),
        client.post("/token", content=f"grant_type={q}".encode(), headers=FORM_CT),
        client.post(
            "/token",
            content=f"grant_type=password&username=alice&password=x&scope={q}".encode(),
            headers=FORM_CT,
        ),
        client.post("/login", json={"username": "alice", "password": "x", "scope": "read " + MARK}),
        client.post("/login", json={"username": "alice", "password": "x", "scope": MARK + "b"}),
        client.post("/login", json={"username": {MARK: 1}, "password": MARK}),
        client.post("/login", json={MARK: MARK}),
        client.post("/login", content=f"{q}={q}&{q}=1".encode(), headers=FORM_CT),
        client.post("/refresh", json={"refresh_token": [MARK]}),
        client.post("/revoke", content=f"token={q}&token={q}".encode(), headers=FORM_CT),
        client.get("/protected", headers={"Authorization": "Bearer " + MARK.encode().hex()}),
        client.get("/" + q),
    ]
    for response in [await a for a in attempts]:
        assert 400 <= response.status_code < 500, response.text
        description = response.json()["error_description"]
        assert _DESCRIPTION.fullmatch(description), description
        assert "mark" not in description, description
        assert "zq" not in description, description
