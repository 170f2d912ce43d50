"""POST /introspect (CONTRACT §6, RFC 7662) on both databases."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest

from authserver.audit import RequestContext
from tests.helpers.app import Running, StartApp
from tests.helpers.factories import make_client, make_user
from tests.helpers.tokens import jwt_parts

ACCESS_FIELDS = {
    "active",
    "token_type",
    "scope",
    "client_id",
    "username",
    "sub",
    "aud",
    "iss",
    "exp",
    "iat",
    "jti",
    "sid",
}


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


class Introspect:
    def __init__(self, running: Running, secret: str) -> None:
        self.running, self.headers = running, basic("api", secret)

    async def __call__(self, token: str, **extra: str) -> httpx.Response:
        r = await self.running.client.post(
            "/introspect", data={"token": token, **extra}, headers=self.headers
        )
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        return r


@pytest.fixture
async def app(start_app: StartApp) -> Running:
    running = await start_app()
    await make_user(running.store, "alice")
    return running


@pytest.fixture
async def introspect(app: Running) -> Introspect:
    _, secret = await make_client(app.store, "api")
    assert secret is not None
    return Introspect(app, secret)


async def test_a_user_access_token_is_active_with_its_claims(
    app: Running, introspect: Introspect
) -> None:
    tokens = await app.login()
    body = (await introspect(tokens["access_token"])).json()
    assert set(body) == ACCESS_FIELDS
    assert body["active"] is True
    assert body["token_type"] == "access_token"
    assert body["username"] == body["sub"] == "alice"
    assert body["client_id"] == "authserver"
    assert body["scope"] == "read write"
    assert body["iss"] == "http://testserver"
    assert body["aud"] == "authserver"
    assert body["exp"] > body["iat"]


async def test_logout_and_reuse_detection_make_access_tokens_inactive_at_once(
    app: Running, introspect: Introspect
) -> None:
    first = await app.login()
    await app.client.post("/logout", json={"refresh_token": first["refresh_token"]})
    assert (await introspect(first["access_token"])).json() == {"active": False}
    second = await app.login()
    r = await app.client.post("/refresh", json={"refresh_token": second["refresh_token"]})
    rotated = r.json()
    assert (await introspect(rotated["access_token"])).json()["active"] is True
    # The spent token again: reuse, the family is revoked, every access token of it dies.
    await app.client.post("/refresh", json={"refresh_token": second["refresh_token"]})
    for token in (second["access_token"], rotated["access_token"]):
        assert (await introspect(token)).json() == {"active": False}


async def test_a_client_token_is_active_while_its_client_is_enabled(
    app: Running, introspect: Introspect
) -> None:
    _, secret = await make_client(app.store, "worker", audience="jobs")
    assert secret is not None
    r = await app.client.post(
        "/token", data={"grant_type": "client_credentials"}, headers=basic("worker", secret)
    )
    token = r.json()["access_token"]
    body = (await introspect(token)).json()
    assert body["active"] is True
    assert body["sub"] == body["client_id"] == "worker"
    assert body["aud"] == "jobs"
    assert "username" not in body and "sid" not in body
    await app.app.state.services.clients.set_disabled(RequestContext(), "worker", True)
    assert (await introspect(token)).json() == {"active": False}


async def test_a_resource_server_may_introspect_its_own_token_while_enabled(
    app: Running, introspect: Introspect
) -> None:
    r = await app.client.post(
        "/token", data={"grant_type": "client_credentials"}, headers=introspect.headers
    )
    token = r.json()["access_token"]
    body = (await introspect(token)).json()
    assert body["active"] is True and body["client_id"] == "api"
    await app.app.state.services.clients.set_disabled(RequestContext(), "api", True)
    r = await app.client.post("/introspect", data={"token": token}, headers=introspect.headers)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"


async def test_a_users_token_tells_nothing_to_a_client_that_fails_authentication(
    app: Running, introspect: Introspect
) -> None:
    # The session is read in the client's query: an unknown, disabled or wrongly
    # authenticated client still gets the one 401, audited, and nothing of the token.
    token = (await app.login())["access_token"]
    await make_client(app.store, "off")
    await app.app.state.services.clients.set_disabled(RequestContext(), "off", True)
    for headers in (basic("nobody", "x"), basic("api", "wrong"), basic("off", "x")):
        r = await app.client.post("/introspect", data={"token": token}, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json() == {
            "error": "invalid_client",
            "error_description": "Client authentication failed.",
        }
    failures = await app.store.list_audit_events(event="client_auth_failed")
    assert sorted(str(e.details.get("client_id")) for e in failures) == ["None", "api", "off"]
    assert (await introspect(token)).json()["active"] is True


@pytest.mark.parametrize(
    "token", ["garbage", "a.b.c", "", "x" * 10_000], ids=["garbage", "dots", "empty", "long"]
)
async def test_anything_else_is_inactive_without_a_reason(
    app: Running, introspect: Introspect, token: str
) -> None:
    if not token:
        r = await app.client.post("/introspect", data={"token": ""}, headers=introspect.headers)
        assert r.status_code == 400
        assert r.json()["error"] == "invalid_request"
        return
    assert (await introspect(token, token_type_hint="access_token")).json() == {"active": False}


async def test_an_expired_token_is_inactive(start_app: StartApp) -> None:
    running = await start_app(access_token_ttl=1)
    await make_user(running.store, "alice")
    _, secret = await make_client(running.store, "api")
    assert secret is not None
    introspect = Introspect(running, secret)
    token = (await running.login())["access_token"]
    await asyncio.sleep(2.1)
    assert (await introspect(token)).json() == {"active": False}


async def test_only_registered_confidential_clients_may_introspect(app: Running) -> None:
    token = (await app.login())["access_token"]
    for headers, data in (
        ({}, {}),
        ({"Authorization": "Basic Og=="}, {}),
        (basic("api", "wrong"), {}),
        ({}, {"client_id": "authserver"}),
    ):
        r = await app.client.post("/introspect", data={"token": token, **data}, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "invalid_client"
        assert "active" not in r.json()
    await make_client(app.store, "spa", public=True)
    r = await app.client.post("/introspect", data={"token": token, "client_id": "spa"})
    assert r.status_code == 401


async def test_metadata_lists_the_endpoint(app: Running) -> None:
    meta = (await app.client.get("/.well-known/oauth-authorization-server")).json()
    assert meta["introspection_endpoint"] == "http://testserver/introspect"
    assert "none" not in meta["introspection_endpoint_auth_methods_supported"]
    assert "private_key_jwt" in meta["introspection_endpoint_auth_methods_supported"]


async def test_a_refresh_token_is_active_while_it_can_be_exchanged(
    app: Running, introspect: Introspect
) -> None:
    tokens = await app.login()
    body = (await introspect(tokens["refresh_token"], token_type_hint="refresh_token")).json()
    assert body["active"] is True
    assert body["token_type"] == "refresh_token"
    assert body["username"] == body["sub"] == "alice"
    assert body["client_id"] == "authserver"
    assert body["scope"] == "read write"
    assert body["exp"] > body["iat"]
    _, claims = jwt_parts(tokens["access_token"])
    assert body["sid"] == claims["sid"]
    assert "jti" not in body
    # Rotated: the old one is spent, the new one active.
    r = await app.client.post("/refresh", json={"refresh_token": tokens["refresh_token"]})
    new = r.json()["refresh_token"]
    assert (await introspect(tokens["refresh_token"])).json() == {"active": False}
    assert (await introspect(new)).json()["active"] is True
    await app.client.post("/logout", json={"refresh_token": new})
    assert (await introspect(new)).json() == {"active": False}


async def test_a_disabled_clients_refresh_token_is_inactive(
    app: Running, introspect: Introspect
) -> None:
    await make_client(app.store, "app", public=True)
    login = {"username": "alice", "password": "correct horse battery", "client_id": "app"}
    token = (await app.client.post("/login", json=login)).json()["refresh_token"]
    assert (await introspect(token)).json()["active"] is True
    await app.app.state.services.clients.set_disabled(RequestContext(), "app", True)
    assert (await introspect(token)).json() == {"active": False}
