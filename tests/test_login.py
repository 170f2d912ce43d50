"""POST /login: the seed-compatible password grant (CONTRACT §2, §3, §4)."""

from __future__ import annotations

import json
import time

from jwcrypto import jwk, jwt

from tests.helpers.app import Running, StartApp
from tests.helpers.factories import DEFAULT_PASSWORD, make_client, make_user
from tests.helpers.tokens import TOKEN_FIELDS, assert_no_store, jwt_parts


async def test_login_json_returns_token_pair(server: Running) -> None:
    r = await server.client.post("/login", json={"username": "alice", "password": DEFAULT_PASSWORD})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == TOKEN_FIELDS
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 900
    assert body["scope"] == "read write"
    assert body["access_token"].count(".") == 2
    assert body["refresh_token"] and "." not in body["refresh_token"]
    assert_no_store(r)
    protected = await server.client.get(
        "/protected", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert protected.status_code == 200
    assert protected.json()["username"] == "alice"


async def test_login_form_encoded(server: Running) -> None:
    r = await server.client.post(
        "/login", data={"username": "alice", "password": DEFAULT_PASSWORD, "scope": "read"}
    )
    assert r.status_code == 200, r.text
    assert set(r.json()) == TOKEN_FIELDS
    assert r.json()["scope"] == "read"
    assert_no_store(r)
    refreshed = await server.client.post(
        "/refresh", json={"refresh_token": r.json()["refresh_token"]}
    )
    assert refreshed.status_code == 200


async def test_login_scope_is_honoured(server: Running) -> None:
    cases = [
        (None, "read write"),
        ("", "read write"),
        ("read", "read"),
        ("write", "write"),
        ("write read", "write read"),
        ("read read", "read"),
    ]
    for asked, granted in cases:
        extra = {} if asked is None else {"scope": asked}
        body = await server.login(**extra)
        assert body["scope"] == granted, asked
        _header, claims = jwt_parts(body["access_token"])
        assert claims["scope"] == granted, asked


async def test_login_without_scope_gets_every_configured_scope(start_app: StartApp) -> None:
    running = await start_app(scopes=("profile", "email", "admin:read"))
    await make_user(running.store, "alice")
    body = await running.login()
    assert body["scope"] == "profile email admin:read"


async def test_login_unknown_scope_is_invalid_scope(server: Running) -> None:
    for scope in ("admin", "read admin", "READ", 'read "x"'):
        fields = {"username": "alice", "password": DEFAULT_PASSWORD, "scope": scope}
        for r in (
            await server.client.post("/login", json=fields),
            await server.client.post("/login", data=fields),
        ):
            assert r.status_code == 400, scope
            assert r.json()["error"] == "invalid_scope"
            assert set(r.json()) == {"error", "error_description"}
            assert DEFAULT_PASSWORD not in r.text
            assert_no_store(r)


async def test_bad_credentials_are_indistinguishable(server: Running) -> None:
    await make_user(server.store, "mallory", disabled=True)
    attempts = {
        "wrong password": {"username": "alice", "password": "not the password"},
        "unknown user": {"username": "nobody", "password": "not the password"},
        "disabled user": {"username": "mallory", "password": DEFAULT_PASSWORD},
    }
    bodies = {}
    for name, fields in attempts.items():
        r = await server.client.post("/login", json=fields)
        assert r.status_code == 401, name
        assert r.json()["error"] == "invalid_grant", name
        assert_no_store(r)
        # A 401 carries a challenge (RFC 9110 §15.5.2); not Basic, which makes browsers prompt.
        assert r.headers["WWW-Authenticate"].startswith("Bearer "), name
        assert fields["password"] not in r.text
        bodies[name] = r.content
    assert len(set(bodies.values())) == 1, bodies


async def test_bad_credentials_form_encoded(server: Running) -> None:
    r = await server.client.post("/login", data={"username": "alice", "password": "nope"})
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_grant"


async def test_access_token_claims(server: Running) -> None:
    await make_client(server.store, "my-app", public=True)
    before = int(time.time())
    body = await server.login(client_id="my-app")
    after = int(time.time())
    header, claims = jwt_parts(body["access_token"])

    assert header["typ"] == "at+jwt"
    assert header["alg"] == "RS256"
    jwks = (await server.client.get("/.well-known/jwks.json")).json()
    assert header["kid"] in {k["kid"] for k in jwks["keys"]}

    assert set(claims) >= {"iss", "sub", "aud", "exp", "iat", "jti", "scope", "client_id", "sid"}
    assert claims["iss"] == "http://testserver"
    assert claims["sub"] == "alice"
    assert claims["aud"] == "authserver"
    assert before <= claims["iat"] <= after
    assert claims["exp"] == claims["iat"] + 900
    assert claims["scope"] == "read write"
    assert claims["client_id"] == "my-app"
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    # The session: the refresh family this login began (CONTRACT §5).
    assert isinstance(claims["sid"], str) and len(claims["sid"]) == 36

    # Any resource server can verify it with the JWKS alone (CONTRACT §3).
    keyset = jwk.JWKSet.from_json(json.dumps(jwks))
    verified = jwt.JWT(jwt=body["access_token"], key=keyset, algs=["RS256"], expected_type="JWS")
    assert json.loads(verified.claims)["sub"] == "alice"


async def test_every_login_gets_its_own_tokens(server: Running) -> None:
    first, second = await server.login(), await server.login()
    assert first["refresh_token"] != second["refresh_token"]
    assert jwt_parts(first["access_token"])[1]["jti"] != jwt_parts(second["access_token"])[1]["jti"]
    assert jwt_parts(first["access_token"])[1]["client_id"] == "authserver"


async def test_password_over_72_bytes_fails_with_401(start_app: StartApp) -> None:
    server = await start_app(login_max_failures=100)
    await make_user(server.store, "alice")
    exactly_72 = "p" * 72
    await make_user(server.store, "bob", password=exactly_72)
    assert (await server.login("bob", exactly_72))["scope"] == "read write"
    # bcrypt would ignore everything after byte 72; the server must not.
    for password in (exactly_72 + "x", exactly_72 + "é" * 40, DEFAULT_PASSWORD + "x" * 80):
        for username in ("bob", "alice"):
            r = await server.client.post(
                "/login", json={"username": username, "password": password}
            )
            assert r.status_code == 401, (username, len(password))
            assert r.json()["error"] == "invalid_grant"
            assert password not in r.text


async def test_lower_cost_hash_is_upgraded_at_login(start_app: StartApp) -> None:
    running = await start_app(bcrypt_rounds=5)
    await make_user(running.store, "alice", rounds=4)
    await make_user(running.store, "carol", rounds=6)
    user = await running.store.get_user("alice")
    assert user is not None and user.password_hash.startswith("$2b$04$")

    await running.login("alice")
    upgraded = await running.store.get_user("alice")
    assert upgraded is not None and upgraded.password_hash.startswith("$2b$05$")
    await running.login("alice")  # the new hash checks the same password
    r = await running.client.post("/login", json={"username": "alice", "password": "wrong"})
    assert r.status_code == 401

    # A higher cost than configured is left alone.
    carol_before = await running.store.get_user("carol")
    await running.login("carol")
    carol_after = await running.store.get_user("carol")
    assert carol_before is not None and carol_after is not None
    assert carol_after.password_hash == carol_before.password_hash


async def test_failed_login_does_not_upgrade_hash(start_app: StartApp) -> None:
    running = await start_app(bcrypt_rounds=5)
    await make_user(running.store, "alice", rounds=4)
    r = await running.client.post("/login", json={"username": "alice", "password": "wrong"})
    assert r.status_code == 401
    user = await running.store.get_user("alice")
    assert user is not None and user.password_hash.startswith("$2b$04$")
