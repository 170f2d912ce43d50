"""The notes API's tests, against a real authserver from `authserver.testing` alone."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from notes import create_app

from authserver.testing import AuthServerKit


@pytest.fixture
async def api(authserver: AuthServerKit) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(authserver.issuer, authserver.audience)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://notes") as client:
            yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_user_keeps_notes_of_their_own(
    authserver: AuthServerKit, api: httpx.AsyncClient
) -> None:
    alice, bob = await authserver.create_user(), await authserver.create_user()
    alice_token, bob_token = await authserver.token(alice), await authserver.token(bob)
    r = await api.post("/notes", json={"text": "buy milk"}, headers=bearer(alice_token))
    assert r.status_code == 201, r.text
    assert (await api.get("/notes", headers=bearer(alice_token))).json() == {"notes": ["buy milk"]}
    assert (await api.get("/notes", headers=bearer(bob_token))).json() == {"notes": []}


async def test_reading_needs_only_read(authserver: AuthServerKit, api: httpx.AsyncClient) -> None:
    token = authserver.mint_token("carol", scope="read")
    assert (await api.get("/notes", headers=bearer(token))).status_code == 200
    r = await api.post("/notes", json={"text": "x"}, headers=bearer(token))
    assert r.status_code == 403
    assert r.json()["error"] == "insufficient_scope"


async def test_a_login_with_a_narrow_scope(
    authserver: AuthServerKit, api: httpx.AsyncClient
) -> None:
    user = await authserver.create_user()
    token = await authserver.token(user, scope="read")
    assert (await api.post("/notes", json={"text": "x"}, headers=bearer(token))).status_code == 403


@pytest.mark.parametrize(
    "bad",
    [
        {"expired": True},
        {"not_yet_valid": True},
        {"foreign_key": True},
        {"audience": "another-api"},
        {"issuer": "http://127.0.0.1:1"},
    ],
)
async def test_bad_tokens_are_refused(
    authserver: AuthServerKit, api: httpx.AsyncClient, bad: dict[str, object]
) -> None:
    token = authserver.mint_token("dave", **bad)  # type: ignore[arg-type]
    r = await api.get("/notes", headers=bearer(token))
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token"


async def test_no_token(api: httpx.AsyncClient) -> None:
    r = await api.get("/notes")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
