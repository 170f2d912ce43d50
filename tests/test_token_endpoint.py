"""POST /token: the RFC 6749 token endpoint (§4.3 password, §6 refresh_token, §5.2 errors)."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from tests.helpers.app import Running, StartApp
from tests.helpers.factories import DEFAULT_PASSWORD, make_client, make_user
from tests.helpers.tokens import TOKEN_FIELDS, assert_no_store, jwt_parts

PASSWORD_FORM = {"grant_type": "password", "username": "alice", "password": DEFAULT_PASSWORD}


def basic(credentials: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def assert_error(r: httpx.Response, status: int, error: str) -> None:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["error"] == error, body
    assert set(body) == {"error", "error_description"}
    assert isinstance(body["error_description"], str) and body["error_description"]
    assert DEFAULT_PASSWORD not in r.text
    assert r.headers["cache-control"] == "no-store"


async def test_password_grant(server: Running) -> None:
    r = await server.client.post("/token", data=PASSWORD_FORM)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == TOKEN_FIELDS
    assert body["token_type"] == "bearer"
    assert body["scope"] == "read write"
    assert_no_store(r)
    _header, claims = jwt_parts(body["access_token"])
    assert claims["sub"] == "alice"
    assert claims["client_id"] == "authserver"
    protected = await server.client.get(
        "/protected", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert protected.status_code == 200


async def test_password_grant_scope(server: Running) -> None:
    r = await server.client.post("/token", data={**PASSWORD_FORM, "scope": "write"})
    assert r.status_code == 200
    assert r.json()["scope"] == "write"
    assert jwt_parts(r.json()["access_token"])[1]["scope"] == "write"
    assert_error(
        await server.client.post("/token", data={**PASSWORD_FORM, "scope": "read admin"}),
        400,
        "invalid_scope",
    )


async def test_refresh_token_grant_rotates(server: Running) -> None:
    first = (await server.client.post("/token", data=PASSWORD_FORM)).json()
    r = await server.client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert r.status_code == 200, r.text
    second = r.json()
    assert set(second) == TOKEN_FIELDS
    assert second["refresh_token"] != first["refresh_token"]
    assert_no_store(r)
    # The presented token is spent: presenting it again is a 400 invalid_grant here.
    again = await server.client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert_error(again, 400, "invalid_grant")
    assert first["refresh_token"] not in again.text


async def test_refresh_token_grant_narrows_scope_and_refuses_widening(server: Running) -> None:
    tokens = await server.login(scope="read")
    form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    assert_error(
        await server.client.post("/token", data={**form, "scope": "read write"}),
        400,
        "invalid_scope",
    )
    r = await server.client.post("/token", data={**form, "scope": "read"})
    assert r.status_code == 200
    assert r.json()["scope"] == "read"


async def test_bad_credentials_are_400_invalid_grant(server: Running) -> None:
    await make_user(server.store, "mallory", disabled=True)
    bodies = set()
    for username, password in (
        ("alice", "wrong"),
        ("nobody", "wrong"),
        ("mallory", DEFAULT_PASSWORD),
    ):
        r = await server.client.post(
            "/token", data={"grant_type": "password", "username": username, "password": password}
        )
        assert_error(r, 400, "invalid_grant")
        bodies.add(r.content)
    assert len(bodies) == 1


async def test_invalid_refresh_tokens_are_400_invalid_grant(server: Running) -> None:
    access = (await server.login())["access_token"]
    for token in ("garbage", "x" * 600, access):
        r = await server.client.post(
            "/token", data={"grant_type": "refresh_token", "refresh_token": token}
        )
        assert_error(r, 400, "invalid_grant")
        assert token not in r.text


async def test_invalid_request(server: Running) -> None:
    client = server.client
    cases: list[tuple[str, httpx.Response]] = [
        ("no grant_type", await client.post("/token", data={"username": "alice"})),
        ("empty grant_type", await client.post("/token", data={"grant_type": ""})),
        ("empty body", await client.post("/token", content=b"", headers=_form_type())),
        ("json body", await client.post("/token", json=PASSWORD_FORM)),
        (
            "form bytes sent as text/plain",
            await client.post(
                "/token",
                content=b"grant_type=password&username=alice&password=x",
                headers={"Content-Type": "text/plain"},
            ),
        ),
        (
            "no content type",
            await client.post("/token", content=b"grant_type=password&username=alice"),
        ),
        (
            "repeated parameter",
            await client.post(
                "/token",
                content=b"grant_type=password&username=alice&username=bob&password=x",
                headers=_form_type(),
            ),
        ),
        (
            "repeated grant_type",
            await client.post(
                "/token",
                content=b"grant_type=password&grant_type=refresh_token&username=alice",
                headers=_form_type(),
            ),
        ),
        (
            "password grant without username",
            await client.post("/token", data={"grant_type": "password", "password": "x"}),
        ),
        (
            "refresh grant without token",
            await client.post("/token", data={"grant_type": "refresh_token"}),
        ),
        (
            "password grant without password",
            await client.post("/token", data={"grant_type": "password", "username": "alice"}),
        ),
    ]
    for name, r in cases:
        assert r.status_code == 400, name
        assert r.json()["error"] == "invalid_request", name


async def test_unsupported_grant_type(server: Running) -> None:
    for grant_type in ("implicit", "PASSWORD", "x" * 500):
        r = await server.client.post("/token", data={**PASSWORD_FORM, "grant_type": grant_type})
        assert_error(r, 400, "unsupported_grant_type")
    # A grant this server has, but the client may not use: RFC 6749 §5.2.
    r = await server.client.post(
        "/token", data={**PASSWORD_FORM, "grant_type": "client_credentials"}
    )
    assert_error(r, 400, "unauthorized_client")


def _form_type() -> dict[str, str]:
    return {"Content-Type": "application/x-www-form-urlencoded"}


async def _client_id_claim(server: Running, **kwargs: Any) -> str:
    r = await server.client.post("/token", **kwargs)
    assert r.status_code == 200, r.text
    claim: str = jwt_parts(r.json()["access_token"])[1]["client_id"]
    return claim


async def test_client_id_from_form_or_basic_with_empty_secret(server: Running) -> None:
    await make_client(server.store, "myclient", public=True)
    assert await _client_id_claim(server, data=PASSWORD_FORM) == "authserver"
    assert (
        await _client_id_claim(server, data={**PASSWORD_FORM, "client_id": "myclient"})
        == "myclient"
    )
    # What the Swagger UI sends: Basic base64(":").
    swagger = {"Authorization": "Basic Og=="}
    assert await _client_id_claim(server, data=PASSWORD_FORM, headers=swagger) == "authserver"
    assert await _client_id_claim(server, data=PASSWORD_FORM, headers=basic("myclient:")) == (
        "myclient"
    )
    both = {**PASSWORD_FORM, "client_id": "myclient"}
    assert await _client_id_claim(server, data=both, headers=basic("myclient:")) == "myclient"


async def test_client_id_survives_refresh(server: Running) -> None:
    await make_client(server.store, "myclient", public=True)
    r = await server.client.post("/token", data=PASSWORD_FORM, headers=basic("myclient:"))
    refresh_token = r.json()["refresh_token"]
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": "myclient"}
    assert await _client_id_claim(server, data=form) == "myclient"


async def test_client_secret_is_invalid_client(server: Running) -> None:
    await make_client(server.store, "myclient", public=True)
    r = await server.client.post("/token", data=PASSWORD_FORM, headers=basic("myclient:s3cret"))
    assert_error(r, 401, "invalid_client")
    assert r.headers["www-authenticate"].startswith("Basic")
    assert "s3cret" not in r.text

    r = await server.client.post("/token", data={**PASSWORD_FORM, "client_secret": "s3cret"})
    assert r.json()["error"] == "invalid_client"
    assert r.status_code in (400, 401)
    assert "s3cret" not in r.text

    r = await server.client.post(
        "/token", data=PASSWORD_FORM, headers={"Authorization": "Basic !!"}
    )
    assert_error(r, 401, "invalid_client")


async def test_conflicting_client_ids_are_refused(server: Running) -> None:
    r = await server.client.post(
        "/token", data={**PASSWORD_FORM, "client_id": "one"}, headers=basic("two:")
    )
    assert_error(r, 400, "invalid_request")


async def test_token_and_login_share_users_and_families(start_app: StartApp) -> None:
    running = await start_app(scopes=("a", "b"))
    await make_user(running.store, "alice")
    r = await running.client.post("/token", data=PASSWORD_FORM)
    assert r.json()["scope"] == "a b"
    # A refresh token from /token works at /refresh and vice versa.
    refreshed = await running.client.post(
        "/refresh", json={"refresh_token": r.json()["refresh_token"]}
    )
    assert refreshed.status_code == 200
    back = await running.client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": refreshed.json()["refresh_token"]},
    )
    assert back.status_code == 200
