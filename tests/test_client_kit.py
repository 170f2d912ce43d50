"""The client kit (`authserver.client.TokenAuth`) against the real auth server app.

Requests go through `httpx.ASGITransport` to the in-process server (or, for
the sync flow, Starlette's `TestClient`); an event hook counts every request
per path, token requests included, and the audit trail counts what the server
saw. The kit's clock is its seam: tests move it to make a token stale.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI, Form, Header
from fastapi.responses import JSONResponse
from jwcrypto.jwk import JWK

from authserver.app import create_app
from authserver.client import (
    ClientAuth,
    ClientSecret,
    Endpoints,
    LoginEndpoints,
    LoginFailed,
    PrivateKeyJWT,
    SessionExpired,
    TokenAuth,
    TokenEndpoint,
    TokenEndpointError,
    TokenPair,
)
from tests.helpers.app import Running
from tests.helpers.factories import DEFAULT_PASSWORD, make_client

PROTECTED = "/protected"
TOKEN_URL = "http://testserver/token"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: single flight happens in the client, whatever the server's store."""
    return f"sqlite:///{tmp_path / 'authserver.db'}"


class ManualClock:
    """Wall-clock seam of `TokenAuth`: starts now, moves when the test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


ENDPOINTS: dict[str, Callable[[], Endpoints]] = {
    "token": lambda: TokenEndpoint("http://testserver/token"),
    "login": lambda: LoginEndpoints("http://testserver"),
}
REFRESH_PATH = {"token": "/token", "login": "/refresh"}


def client_for(
    server: Running, auth: TokenAuth, hits: Counter[str], **mounts: Any
) -> httpx.AsyncClient:
    async def count(request: httpx.Request) -> None:
        hits[request.url.path] += 1

    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=server.app),
        mounts={f"http://{host}": httpx.ASGITransport(app=app) for host, app in mounts.items()},
        base_url="http://testserver",
        auth=auth,
        event_hooks={"request": [count]},
    )


def password_auth(endpoint: str = "token", **kwargs: Any) -> TokenAuth:
    return TokenAuth(ENDPOINTS[endpoint](), username="alice", password=DEFAULT_PASSWORD, **kwargs)


def claims_of(access_token: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(access_token.split(".")[1] + "==")
    )
    return payload


async def audit_count(server: Running, event: str) -> int:
    return len(await server.store.list_audit_events(event=event))


@pytest.mark.parametrize("endpoint", ["token", "login"])
async def test_logs_in_and_attaches_the_token(server: Running, endpoint: str) -> None:
    saved: list[TokenPair] = []
    hits: Counter[str] = Counter()
    auth = password_auth(endpoint, on_tokens=saved.append)
    async with client_for(server, auth, hits) as client:
        for _ in range(3):
            r = await client.get(PROTECTED)
            assert r.status_code == 200, r.text
            assert r.json()["username"] == "alice"
    login_path = "/token" if endpoint == "token" else "/login"
    assert hits == {login_path: 1, PROTECTED: 3}
    assert len(saved) == 1
    assert saved[0] is auth.tokens
    assert saved[0].refresh_token
    assert saved[0].expires_in == 900
    assert saved[0].scope == "read write"
    assert await audit_count(server, "login_succeeded") == 1


async def test_scope_and_client_id_go_to_the_token_endpoint(server: Running) -> None:
    await make_client(server.store, "reporting", public=True)
    auth = TokenAuth(
        TokenEndpoint("http://testserver/token", client_id="reporting"),
        username="alice",
        password=DEFAULT_PASSWORD,
        scope="read",
    )
    async with client_for(server, auth, Counter()) as client:
        assert (await client.get(PROTECTED)).status_code == 200
    assert auth.tokens is not None
    claims = claims_of(auth.tokens.access_token)
    assert claims["client_id"] == "reporting"
    assert claims["scope"] == "read"


@pytest.mark.parametrize("endpoint", ["token", "login"])
async def test_refreshes_shortly_before_expiry(server: Running, endpoint: str) -> None:
    clock = ManualClock()
    saved: list[TokenPair] = []
    hits: Counter[str] = Counter()
    auth = password_auth(endpoint, on_tokens=saved.append, clock=clock)
    async with client_for(server, auth, hits) as client:
        assert (await client.get(PROTECTED)).status_code == 200
        first = auth.tokens
        assert first is not None and first.expires_at is not None
        clock.now = first.expires_at - 31  # margin: min(30 s, a fifth of 900 s)
        assert (await client.get(PROTECTED)).status_code == 200
        assert auth.tokens is first
        clock.now = first.expires_at - 29
        assert (await client.get(PROTECTED)).status_code == 200
    second = auth.tokens
    assert second is not first and second is not None
    assert second.refresh_token != first.refresh_token  # the rotated one is kept
    assert saved == [first, second]
    assert hits[REFRESH_PATH[endpoint]] == (2 if endpoint == "token" else 1)
    assert await audit_count(server, "refreshed") == 1


async def test_refreshes_once_on_401(server: Running) -> None:
    tokens = await server.login()
    hits: Counter[str] = Counter()
    stale = TokenPair(
        access_token="revoked-or-garbage",
        refresh_token=tokens["refresh_token"],
        expires_at=time.time() + 3600,
    )
    auth = TokenAuth(TOKEN_URL, tokens=stale)
    async with client_for(server, auth, hits) as client:
        r = await client.get(PROTECTED)
    assert r.status_code == 200
    assert hits == {PROTECTED: 2, "/token": 1}
    assert await audit_count(server, "refreshed") == 1


async def test_a_second_401_is_returned_not_retried(server: Running) -> None:
    refuses = FastAPI()

    @refuses.get("/data")
    async def data() -> JSONResponse:
        return JSONResponse(
            {"error": "invalid_token"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )

    clock = ManualClock()
    hits: Counter[str] = Counter()
    auth = password_auth(clock=clock)
    async with client_for(server, auth, hits, api=refuses) as client:
        r = await client.get("http://api/data")
        assert r.status_code == 401
        # A token obtained this very second is not refreshed for a 401: an API
        # that refuses everything must not turn each request into a refresh.
        assert hits == {"/token": 1, "/data": 1}
        clock.now += 1
        for _ in range(3):
            r = await client.get("http://api/data")
            assert r.status_code == 401
    # Then: try, refresh once, try again, and the 401 is the caller's; the
    # next requests carry a token refreshed "this second" again.
    assert hits == {"/token": 2, "/data": 1 + 2 + 1 + 1}
    assert await audit_count(server, "refreshed") == 1


@pytest.mark.parametrize("endpoint", ["token", "login"])
async def test_concurrent_stale_requests_send_one_refresh(server: Running, endpoint: str) -> None:
    clock = ManualClock()
    saved: list[TokenPair] = []
    hits: Counter[str] = Counter()
    auth = password_auth(endpoint, on_tokens=saved.append, clock=clock)
    async with client_for(server, auth, hits) as client:
        assert (await client.get(PROTECTED)).status_code == 200
        assert auth.tokens is not None and auth.tokens.expires_at is not None
        clock.now = auth.tokens.expires_at + 1
        results = await asyncio.gather(*(client.get(PROTECTED) for _ in range(50)))
    assert [r.status_code for r in results] == [200] * 50
    assert await audit_count(server, "refreshed") == 1
    assert await audit_count(server, "refresh_reuse_detected") == 0
    assert hits[PROTECTED] == 51
    assert len(saved) == 2


async def test_concurrent_first_requests_log_in_once(server: Running) -> None:
    hits: Counter[str] = Counter()
    auth = password_auth()
    async with client_for(server, auth, hits) as client:
        results = await asyncio.gather(*(client.get(PROTECTED) for _ in range(50)))
    assert {r.status_code for r in results} == {200}
    assert hits["/token"] == 1
    assert await audit_count(server, "login_succeeded") == 1


@pytest.mark.parametrize("endpoint", ["token", "login"])
async def test_revoked_refresh_token_raises_session_expired(server: Running, endpoint: str) -> None:
    clock = ManualClock()
    hits: Counter[str] = Counter()
    auth = password_auth(endpoint, clock=clock)
    async with client_for(server, auth, hits) as client:
        assert (await client.get(PROTECTED)).status_code == 200
        assert auth.tokens is not None and auth.tokens.expires_at is not None
        r = await server.client.post("/revoke", data={"token": auth.tokens.refresh_token})
        assert r.status_code == 200
        clock.now = auth.tokens.expires_at + 1
        results = await asyncio.gather(
            *(client.get(PROTECTED) for _ in range(10)), return_exceptions=True
        )
        assert all(isinstance(e, SessionExpired) for e in results), results
        assert hits[REFRESH_PATH[endpoint]] == (2 if endpoint == "token" else 1)
        # Dead is dead: the next request raises at once, sending nothing.
        with pytest.raises(SessionExpired) as caught:
            await client.get(PROTECTED)
    assert caught.value.error == "invalid_grant"
    assert hits[REFRESH_PATH[endpoint]] == (2 if endpoint == "token" else 1)
    assert hits[PROTECTED] == 1


async def test_reused_refresh_token_raises_and_set_tokens_resumes(server: Running) -> None:
    tokens = await server.login()
    # Another holder of the same pair rotates it first: ours is now spent.
    r = await server.client.post("/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 200
    auth = TokenAuth(TOKEN_URL, tokens=TokenPair.from_refresh_token(tokens["refresh_token"]))
    async with client_for(server, auth, Counter()) as client:
        with pytest.raises(SessionExpired):
            await client.get(PROTECTED)
        assert await audit_count(server, "refresh_reuse_detected") == 1
        fresh = await server.login()
        auth.set_tokens(TokenPair.from_refresh_token(fresh["refresh_token"]))
        assert (await client.get(PROTECTED)).status_code == 200


@pytest.mark.parametrize("endpoint", ["token", "login"])
async def test_wrong_password_raises_login_failed_once(server: Running, endpoint: str) -> None:
    hits: Counter[str] = Counter()
    auth = TokenAuth(ENDPOINTS[endpoint](), username="alice", password="wrong password")
    async with client_for(server, auth, hits) as client:
        for _ in range(3):
            with pytest.raises(LoginFailed) as caught:
                await client.get(PROTECTED)
    assert "wrong password" not in str(caught.value)
    assert sum(hits.values()) == 1  # refused credentials are not sent again
    assert await audit_count(server, "login_failed") == 1


async def test_starts_from_a_saved_refresh_token(server: Running) -> None:
    tokens = await server.login()
    saved: list[TokenPair] = []

    async def save(pair: TokenPair) -> None:  # an async callback is awaited
        await asyncio.sleep(0)
        saved.append(pair)

    auth = TokenAuth(
        LoginEndpoints("http://testserver"),
        tokens=TokenPair.from_refresh_token(tokens["refresh_token"]),
        on_tokens=save,
    )
    async with client_for(server, auth, Counter()) as client:
        assert (await client.get(PROTECTED)).status_code == 200
    assert len(saved) == 1
    assert saved[0].refresh_token not in (None, tokens["refresh_token"])


def test_token_pair_repr_shows_no_token() -> None:
    pair = TokenPair("access-secret", "refresh-secret", expires_at=1.0)
    assert "secret" not in repr(pair)
    with pytest.raises(ValueError, match="username and password"):
        TokenAuth("http://testserver/token", username="alice")
    with pytest.raises(ValueError, match="absolute"):
        TokenAuth("/token", username="alice", password="pw")


def standin_token_endpoint() -> tuple[FastAPI, list[dict[str, str]]]:
    """Another RFC 6749 token endpoint: busy once, then grants without rotating."""
    app = FastAPI()
    seen: list[dict[str, str]] = []

    @app.post("/oauth/token")
    async def token(
        grant_type: str = Form(),
        username: str | None = Form(None),
        refresh_token: str | None = Form(None),
    ) -> JSONResponse:
        seen.append({"grant_type": grant_type, "who": username or refresh_token or ""})
        if len(seen) == 1:
            return JSONResponse(
                {"error": "temporarily_unavailable"}, status_code=503, headers={"Retry-After": "3"}
            )
        body = {"access_token": f"at-{len(seen)}", "token_type": "Bearer", "expires_in": 60}
        if grant_type == "password":
            body["refresh_token"] = "rt-1"
        return JSONResponse(body)

    @app.get("/whoami")
    async def whoami(authorization: str = Header("")) -> dict[str, str]:
        return {"authorization": authorization}

    return app, seen


async def test_any_rfc6749_endpoint_and_transient_errors(server: Running) -> None:
    other, seen = standin_token_endpoint()
    clock = ManualClock()
    auth = TokenAuth("http://issuer/oauth/token", username="bob", password="pw", clock=clock)
    hits: Counter[str] = Counter()
    async with client_for(server, auth, hits, issuer=other) as client:
        with pytest.raises(TokenEndpointError) as caught:
            await client.get(PROTECTED)
        assert caught.value.status_code == 503
        assert caught.value.retry_after == 3.0
        # Not fatal: the next request logs in.
        r = await client.get("http://issuer/whoami")
        assert r.json() == {"authorization": "Bearer at-2"}
        clock.now += 59
        r = await client.get("http://issuer/whoami")
        assert r.json() == {"authorization": "Bearer at-3"}
    # A server that does not rotate: the refresh token is kept (RFC 6749 §6).
    assert auth.tokens is not None and auth.tokens.refresh_token == "rt-1"
    assert [s["grant_type"] for s in seen] == ["password", "password", "refresh_token"]
    assert seen[2]["who"] == "rt-1"


@contextlib.contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """A real uvicorn server on a free port, in a thread of this process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(3000):
            if server.started or not thread.is_alive():
                break
            time.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


async def test_sync_client_refreshes_once_across_threads(server: Running) -> None:
    clock = ManualClock()
    hits: Counter[str] = Counter()

    def count(request: httpx.Request) -> None:
        hits[request.url.path] += 1

    def run() -> list[int]:
        # Another app instance on the same database, served over real HTTP.
        with (
            serve_in_thread(create_app(server.settings)) as url,
            httpx.Client(base_url=url, event_hooks={"request": [count]}) as client,
        ):
            client.auth = auth = TokenAuth(
                f"{url}/token", username="alice", password=DEFAULT_PASSWORD, clock=clock
            )
            assert client.get(PROTECTED).status_code == 200
            assert auth.tokens is not None and auth.tokens.expires_at is not None
            clock.now = auth.tokens.expires_at + 1
            with ThreadPoolExecutor(max_workers=20) as pool:
                return list(pool.map(lambda _: client.get(PROTECTED).status_code, range(40)))

    codes = await asyncio.to_thread(run)
    assert codes == [200] * 40
    assert hits["/token"] == 2  # one login, one refresh
    assert hits[PROTECTED] == 41
    assert await audit_count(server, "refreshed") == 1
    assert await audit_count(server, "refresh_reuse_detected") == 0


def _robot_auth(kind: str, secret: str | None, key: Any, **kwargs: Any) -> TokenAuth:
    client_auth: ClientAuth
    if kind == "private_key_jwt":
        client_auth = PrivateKeyJWT("robot", key)
    else:
        assert secret is not None
        client_auth = ClientSecret("robot", secret, method=kind)
    return TokenAuth(
        TokenEndpoint(TOKEN_URL, client_auth=client_auth),
        client_credentials=True,
        scope="read",
        **kwargs,
    )


@pytest.mark.parametrize("kind", ["client_secret_basic", "client_secret_post", "private_key_jwt"])
async def test_a_confidential_client_gets_its_own_token_and_renews_it_once(
    server: Running, kind: str
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(JWK.from_pyca(key.public_key()).export_public())
    jwks = json.dumps({"keys": [public]}) if kind == "private_key_jwt" else None
    _, secret = await make_client(server.store, "robot", jwks=jwks)
    clock = ManualClock()
    hits: Counter[str] = Counter()
    auth = _robot_auth(kind, secret, key, clock=clock)
    async with client_for(server, auth, hits) as client:
        responses = await asyncio.gather(*(client.get(PROTECTED) for _ in range(10)))
        assert [r.status_code for r in responses] == [200] * 10
        assert responses[0].json()["username"] == "robot"
        assert hits["/token"] == 1  # single flight: one token request for ten callers
        first = auth.tokens
        assert first is not None and first.refresh_token is None
        assert claims_of(first.access_token)["sub"] == "robot"
        assert first.scope == "read"
        assert first.expires_at is not None
        clock.now = first.expires_at - 1  # stale: a new client_credentials request
        responses = await asyncio.gather(*(client.get(PROTECTED) for _ in range(10)))
        assert [r.status_code for r in responses] == [200] * 10
        assert hits["/token"] == 2
        assert auth.tokens is not first


async def test_a_refused_client_raises_without_looping(server: Running) -> None:
    await make_client(server.store, "robot")
    hits: Counter[str] = Counter()
    auth = _robot_auth("client_secret_basic", "not the secret", None)
    async with client_for(server, auth, hits) as client:
        with pytest.raises(LoginFailed) as refused:
            await client.get(PROTECTED)
        assert refused.value.error == "invalid_client"
        with pytest.raises(LoginFailed):
            await client.get(PROTECTED)
    assert hits == {"/token": 1}
