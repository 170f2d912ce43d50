"""Client authentication and client_credentials (CONTRACT §5; RFC 6749 §2.3, §4.4;
RFC 7523), against the real app on both databases, and with Authlib's own client."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwk, jwt

from authserver.audit import RequestContext
from authserver.tokens import ASSERTION_TYPE
from tests.helpers.app import Running, StartApp
from tests.helpers.factories import DEFAULT_PASSWORD, make_client, make_user
from tests.helpers.procs import ServerPool, ServerProcess, base_env, run_cli, server_errors
from tests.helpers.tokens import jwt_parts

TOKEN_URL = "http://testserver/token"
CC = {"grant_type": "client_credentials"}


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def signing_key() -> tuple[jwk.JWK, str]:
    private = ec.generate_private_key(ec.SECP256R1())
    key = jwk.JWK.from_pyca(private)
    public = json.loads(key.export_public())
    public.update(kid="k1", alg="ES256", use="sig")
    return key, json.dumps({"keys": [public]})


def assertion(key: jwk.JWK, client_id: str, **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": TOKEN_URL,
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    header = {"alg": "ES256", "kid": "k1"}
    token = jwt.JWT(header=header, claims={k: v for k, v in claims.items() if v is not None})
    token.make_signed_token(key)
    return str(token.serialize())


def assertion_form(signed: str, **extra: str) -> dict[str, str]:
    return {**CC, "client_assertion_type": ASSERTION_TYPE, "client_assertion": signed, **extra}


def assert_invalid_client(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.json() == {
        "error": "invalid_client",
        "error_description": "Client authentication failed.",
    }


@pytest.fixture
async def app(start_app: StartApp) -> Running:
    return await start_app(login_max_failures=1000, login_max_failures_per_user=1000)


async def test_client_credentials_with_a_secret_in_basic_or_in_the_form(app: Running) -> None:
    _, secret = await make_client(app.store, "billing", scopes=("read",), audience="billing-api")
    assert secret is not None
    requests: list[tuple[dict[str, str], dict[str, str]]] = [
        (CC, basic("billing", secret)),
        ({**CC, "client_id": "billing", "client_secret": secret}, {}),
    ]
    for data, headers in requests:
        r = await app.client.post("/token", data=data, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"access_token", "token_type", "expires_in", "scope"}  # no refresh
        assert body["scope"] == "read"
        assert r.headers["cache-control"] == "no-store"
        _, claims = jwt_parts(body["access_token"])
        assert claims["sub"] == claims["client_id"] == "billing"
        assert claims["aud"] == "billing-api"
        assert "sid" not in claims


async def test_a_client_token_works_where_its_audience_is_expected(app: Running) -> None:
    _, secret = await make_client(app.store, "svc")
    assert secret is not None
    r = await app.client.post("/token", data=CC, headers=basic("svc", secret))
    token = r.json()["access_token"]
    _, claims = jwt_parts(token)
    assert claims["aud"] == "authserver"  # the default audience
    r = await app.client.get("/protected", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    assert r.json()["username"] == "svc"


async def test_unknown_client_and_wrong_secret_are_indistinguishable(app: Running) -> None:
    _, secret = await make_client(app.store, "svc")
    assert secret is not None
    wrong = await app.client.post("/token", data=CC, headers=basic("svc", secret + "x"))
    unknown = await app.client.post("/token", data=CC, headers=basic("nobody", secret))
    missing = await app.client.post("/token", data={**CC, "client_id": "svc"})
    for r in (wrong, unknown, missing):
        assert_invalid_client(r)
    assert wrong.headers["www-authenticate"] == unknown.headers["www-authenticate"]
    assert wrong.headers["www-authenticate"].startswith("Basic")
    assert secret not in wrong.text
    events = await app.store.list_audit_events(event="client_auth_failed")
    assert [e.details.get("client_id") for e in events] == ["svc", None, "svc"]


async def test_a_disabled_client_cannot_authenticate(app: Running) -> None:
    _, secret = await make_client(app.store, "svc", disabled=True)
    assert secret is not None
    assert_invalid_client(await app.client.post("/token", data=CC, headers=basic("svc", secret)))


async def test_a_grant_the_client_is_not_registered_for_is_unauthorized_client(
    app: Running,
) -> None:
    await make_user(app.store, "alice")
    _, secret = await make_client(app.store, "svc")
    assert secret is not None
    form = {"grant_type": "password", "username": "alice", "password": DEFAULT_PASSWORD}
    r = await app.client.post("/token", data=form, headers=basic("svc", secret))
    assert r.status_code == 400
    assert r.json()["error"] == "unauthorized_client"
    await make_client(app.store, "app", public=True)
    r = await app.client.post("/token", data={**CC, "client_id": "app"})
    assert r.status_code == 400
    assert r.json()["error"] == "unauthorized_client"


async def test_a_scope_beyond_the_clients_is_invalid_scope(app: Running) -> None:
    await make_user(app.store, "alice")
    _, secret = await make_client(app.store, "svc", scopes=("read",))
    assert secret is not None
    r = await app.client.post("/token", data={**CC, "scope": "write"}, headers=basic("svc", secret))
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_scope"
    await make_client(app.store, "reader", public=True, scopes=("read",))
    r = await app.client.post(
        "/login", json={"username": "alice", "password": DEFAULT_PASSWORD, "client_id": "reader"}
    )
    assert r.status_code == 200
    assert r.json()["scope"] == "read"
    r = await app.client.post(
        "/login",
        json={
            "username": "alice",
            "password": DEFAULT_PASSWORD,
            "client_id": "reader",
            "scope": "read write",
        },
    )
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_scope"


async def test_an_unregistered_client_id_is_invalid_client_everywhere(app: Running) -> None:
    await make_user(app.store, "alice")
    login = {"username": "alice", "password": DEFAULT_PASSWORD, "client_id": "ghost"}
    assert_invalid_client(await app.client.post("/login", json=login))
    form = {"grant_type": "password", "username": "alice", "password": DEFAULT_PASSWORD}
    assert_invalid_client(await app.client.post("/token", data={**form, "client_id": "ghost"}))
    assert_invalid_client(
        await app.client.post("/revoke", data={"token": "x", "client_id": "ghost"})
    )
    # A confidential client cannot use the seed's /login, which carries no secret.
    await make_client(app.store, "svc", grants=("password",))
    login["client_id"] = "svc"
    assert_invalid_client(await app.client.post("/login", json=login))


async def test_one_authentication_method_per_request(app: Running) -> None:
    _, secret = await make_client(app.store, "svc")
    assert secret is not None
    r = await app.client.post(
        "/token",
        data={**CC, "client_id": "svc", "client_secret": secret},
        headers=basic("svc", secret),
    )
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_request"


async def test_a_rotated_secret_works_for_its_grace_period(app: Running) -> None:
    _, old = await make_client(app.store, "svc")
    assert old is not None
    clients = app.app.state.services.clients
    new = await clients.rotate_secret(RequestContext(), "svc", grace=60)
    for secret in (old, new):
        r = await app.client.post("/token", data=CC, headers=basic("svc", secret))
        assert r.status_code == 200, r.text
    newest = await clients.rotate_secret(RequestContext(), "svc", grace=0)
    assert_invalid_client(await app.client.post("/token", data=CC, headers=basic("svc", new)))
    r = await app.client.post("/token", data=CC, headers=basic("svc", newest))
    assert r.status_code == 200


async def test_guessing_a_secret_is_throttled(start_app: StartApp) -> None:
    running = await start_app(login_max_failures=3)
    _, secret = await make_client(running.store, "svc")
    assert secret is not None
    for _ in range(3):
        r = await running.client.post("/token", data=CC, headers=basic("svc", "guess"))
        assert_invalid_client(r)
    r = await running.client.post("/token", data=CC, headers=basic("svc", "guess"))
    assert r.status_code == 429
    assert r.json()["error"] == "slow_down"
    assert int(r.headers["retry-after"]) > 0
    # The client itself, which knows its 256-bit secret, is not locked out by the guesses.
    r = await running.client.post("/token", data=CC, headers=basic("svc", secret))
    assert r.status_code == 200


async def test_private_key_jwt(app: Running) -> None:
    key, jwks = signing_key()
    await make_client(app.store, "signer", jwks=jwks)
    signed = assertion(key, "signer")
    r = await app.client.post("/token", data=assertion_form(signed))
    assert r.status_code == 200, r.text
    _, claims = jwt_parts(r.json()["access_token"])
    assert claims["sub"] == "signer"
    # Single use: the same assertion again is refused.
    assert_invalid_client(await app.client.post("/token", data=assertion_form(signed)))
    # The issuer is an audience too, and client_id may name the client.
    r = await app.client.post(
        "/token",
        data=assertion_form(assertion(key, "signer", aud="http://testserver"), client_id="signer"),
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "overrides",
    [
        {"aud": "https://elsewhere.example/token"},
        {"exp": int(time.time()) + 3600},
        {"exp": int(time.time()) - 120},
        {"iss": "someone-else"},
        {"jti": None},
        {"exp": None},
    ],
    ids=["audience", "too long", "expired", "iss", "no jti", "no exp"],
)
async def test_a_bad_assertion_is_refused(app: Running, overrides: dict[str, Any]) -> None:
    key, jwks = signing_key()
    await make_client(app.store, "signer", jwks=jwks)
    r = await app.client.post("/token", data=assertion_form(assertion(key, "signer", **overrides)))
    assert_invalid_client(r)


async def test_an_assertion_signed_by_another_key_or_unsigned_is_refused(app: Running) -> None:
    _, jwks = signing_key()
    other, _ = signing_key()
    await make_client(app.store, "signer", jwks=jwks)
    assert_invalid_client(
        await app.client.post("/token", data=assertion_form(assertion(other, "signer")))
    )
    header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    body = (
        base64.urlsafe_b64encode(
            json.dumps(
                {
                    "iss": "signer",
                    "sub": "signer",
                    "aud": TOKEN_URL,
                    "exp": time.time() + 60,
                    "jti": "j",
                }
            ).encode()
        )
        .rstrip(b"=")
        .decode()
    )
    assert_invalid_client(await app.client.post("/token", data=assertion_form(f"{header}.{body}.")))
    # A secret for a keys-only client is no way in either.
    assert_invalid_client(
        await app.client.post("/token", data=CC, headers=basic("signer", "anything"))
    )


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post", "private_key_jwt"])
async def test_authlib_does_client_credentials(app: Running, method: str) -> None:
    from authlib.integrations.httpx_client import AsyncOAuth2Client
    from authlib.oauth2.rfc7523 import PrivateKeyJWT

    transport = httpx.ASGITransport(app=app.app)
    if method == "private_key_jwt":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = json.loads(jwk.JWK.from_pyca(private.public_key()).export_public())
        await make_client(app.store, "robot", jwks=json.dumps({"keys": [public]}))
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        client = AsyncOAuth2Client(
            "robot",
            pem,
            # Authlib's assertions live an hour by default; the contract allows five minutes.
            token_endpoint_auth_method=PrivateKeyJWT(
                TOKEN_URL, claims={"exp": int(time.time()) + 120}
            ),
            transport=transport,
        )
    else:
        _, secret = await make_client(app.store, "robot")
        client = AsyncOAuth2Client(
            "robot", secret, token_endpoint_auth_method=method, transport=transport
        )
    async with client:
        token = await client.fetch_token(TOKEN_URL, grant_type="client_credentials")
    assert token["token_type"] == "bearer"
    assert "refresh_token" not in token
    _, claims = jwt_parts(token["access_token"])
    assert claims["sub"] == "robot"


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_a_disabled_or_removed_client_stops_on_every_process_at_once(
    database_url: str, keys_dir: Path, tmp_path: Path
) -> None:
    """Each server remembers the client after its first request (`store/registry.py`):
    the CLI's every change must reach both at their next request."""
    env = base_env(
        AUTHSERVER_DATABASE_URL=database_url,
        AUTHSERVER_KEYS_DIR=str(keys_dir),
        # The refused requests below are not guesses to throttle.
        AUTHSERVER_LOGIN_MAX_FAILURES="1000",
        AUTHSERVER_LOGIN_MAX_FAILURES_PER_USER="1000",
    )
    added = run_cli(["clients", "add", "worker"], env, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    old = basic("worker", added.stdout.strip())

    def statuses(servers: list[ServerProcess], headers: dict[str, str] = old) -> list[int]:
        return [
            httpx.post(f"{s.url}/token", data=CC, headers=headers, timeout=10).status_code
            for s in servers
        ]

    with ServerPool(tmp_path) as pool:
        servers = [pool.spawn(env, name=f"s{i}") for i in range(2)]
        for server in servers:
            server.wait_healthy()
        assert statuses(servers) == [200, 200]
        assert statuses(servers) == [200, 200]  # now answered from memory
        assert run_cli(["clients", "disable", "worker"], env, cwd=tmp_path).returncode == 0
        assert statuses(servers) == [401, 401]
        assert run_cli(["clients", "enable", "worker"], env, cwd=tmp_path).returncode == 0
        assert statuses(servers) == [200, 200]
        rotated = run_cli(["clients", "rotate-secret", "worker"], env, cwd=tmp_path)
        assert rotated.returncode == 0, rotated.stderr
        new = basic("worker", rotated.stdout.strip())
        assert statuses(servers, new) == [200, 200]
        assert statuses(servers, old) == [401, 401]
        assert run_cli(["clients", "remove", "worker"], env, cwd=tmp_path).returncode == 0
        assert statuses(servers, new) == [401, 401]
        # Registered again under the same id: an unknown id is never remembered.
        again = run_cli(["clients", "add", "worker"], env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert statuses(servers, basic("worker", again.stdout.strip())) == [200, 200]
        for server in servers:
            assert server_errors(server.log()) == []


async def _password_login(app: Running, **auth: Any) -> dict[str, Any]:
    form = {"grant_type": "password", "username": "alice", "password": DEFAULT_PASSWORD}
    r = await app.client.post(
        "/token", data={**form, **auth.get("data", {})}, headers=auth.get("headers", {})
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_a_refresh_token_is_bound_to_its_client(app: Running) -> None:
    await make_user(app.store, "alice")
    await make_client(app.store, "app", public=True)
    await make_client(app.store, "other", public=True)
    token = (await _password_login(app, data={"client_id": "app"}))["refresh_token"]
    refresh = {"grant_type": "refresh_token", "refresh_token": token}
    for other in ({"client_id": "other"}, {}):  # another client; no client (the built-in one)
        r = await app.client.post("/token", data={**refresh, **other})
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "invalid_grant"
    # Not spent by those: its own client still exchanges it, once.
    r = await app.client.post("/token", data={**refresh, "client_id": "app"})
    assert r.status_code == 200, r.text
    _, claims = jwt_parts(r.json()["access_token"])
    assert claims["client_id"] == "app"
    # The seed's /refresh names no client: fine for a public client's token.
    r = await app.client.post("/refresh", json={"refresh_token": r.json()["refresh_token"]})
    assert r.status_code == 200, r.text
    assert jwt_parts(r.json()["access_token"])[1]["client_id"] == "app"


async def test_a_confidential_clients_refresh_token_needs_its_credentials(app: Running) -> None:
    await make_user(app.store, "alice")
    _, secret = await make_client(app.store, "portal", grants=("password", "refresh_token"))
    assert secret is not None
    tokens = await _password_login(app, headers=basic("portal", secret))
    refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    r = await app.client.post("/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_grant"
    r = await app.client.post("/token", data=refresh)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"
    r = await app.client.post("/token", data=refresh, headers=basic("portal", secret))
    assert r.status_code == 200, r.text


async def test_a_disabled_clients_refresh_tokens_are_refused(app: Running) -> None:
    await make_user(app.store, "alice")
    await make_client(app.store, "app", public=True)
    token = (await _password_login(app, data={"client_id": "app"}))["refresh_token"]
    clients = app.app.state.services.clients
    await clients.set_disabled(RequestContext(), "app", True)
    r = await app.client.post("/refresh", json={"refresh_token": token})
    assert r.status_code == 401
    r = await app.client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": token, "client_id": "app"}
    )
    assert r.status_code == 401  # the client itself no longer authenticates
    assert r.json()["error"] == "invalid_client"
    await clients.set_disabled(RequestContext(), "app", False)
    r = await app.client.post("/refresh", json={"refresh_token": token})
    assert r.status_code == 200, r.text


async def test_only_its_own_client_revokes_or_logs_out_a_token(app: Running) -> None:
    await make_user(app.store, "alice")
    _, secret = await make_client(app.store, "portal", grants=("password", "refresh_token"))
    _, other = await make_client(app.store, "other", grants=("password",))
    assert secret is not None and other is not None
    token = (await _password_login(app, headers=basic("portal", secret)))["refresh_token"]
    refresh = {"grant_type": "refresh_token", "refresh_token": token}
    # RFC 7009 §2.1: another client, or none, revokes nothing (and is told nothing).
    r = await app.client.post("/revoke", data={"token": token}, headers=basic("other", other))
    assert r.status_code == 200
    assert (await app.client.post("/revoke", data={"token": token})).status_code == 200
    assert (await app.client.post("/logout", json={"refresh_token": token})).status_code == 204
    r = await app.client.post("/token", data=refresh, headers=basic("portal", secret))
    assert r.status_code == 200, "a token revoked by someone else's request"
    token = r.json()["refresh_token"]
    r = await app.client.post("/revoke", data={"token": token}, headers=basic("portal", secret))
    assert r.status_code == 200
    r = await app.client.post(
        "/token", data={**refresh, "refresh_token": token}, headers=basic("portal", secret)
    )
    assert r.status_code == 400


async def test_a_client_named_at_the_seed_endpoints_must_be_registered(app: Running) -> None:
    await make_user(app.store, "alice")
    await make_client(app.store, "app", public=True)
    login = {"username": "alice", "password": DEFAULT_PASSWORD, "client_id": "app"}
    token = (await app.client.post("/login", json=login)).json()["refresh_token"]
    for path in ("/refresh", "/logout"):
        r = await app.client.post(path, json={"refresh_token": token, "client_id": "nobody"})
        assert_invalid_client(r)
    r = await app.client.post("/refresh", json={"refresh_token": token, "client_id": "app"})
    assert r.status_code == 200, r.text
    new = r.json()["refresh_token"]
    r = await app.client.post("/logout", json={"refresh_token": new, "client_id": "app"})
    assert r.status_code == 204
    assert (await app.client.post("/refresh", json={"refresh_token": new})).status_code == 401


@pytest.mark.parametrize(
    "authorization",
    ["Basic \u00e9\u00e9\u00e9\u00e9", "Basic !!", "Basic " + "x" * 5000, "Basic bm9jb2xvbg=="],
)
async def test_malformed_basic_credentials_are_invalid_client(
    app: Running, authorization: str
) -> None:
    r = await app.client.post(
        "/token", data=CC, headers=[(b"authorization", authorization.encode("latin-1"))]
    )
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "invalid_client"


async def test_a_deeply_nested_assertion_is_refused_not_a_crash(app: Running) -> None:
    payload = base64.urlsafe_b64encode(b"[" * 200_000).rstrip(b"=").decode()
    r = await app.client.post("/token", data=assertion_form(f"e30.{payload}.c2ln"))
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "invalid_client"


async def test_an_assertion_is_single_use_for_as_long_as_it_is_accepted(app: Running) -> None:
    key, jwks = signing_key()
    await make_client(app.store, "signer", jwks=jwks)
    # Expired ten seconds ago, yet within the allowed clock skew: accepted once.
    signed = assertion(key, "signer", exp=int(time.time()) - 10)
    r = await app.client.post("/token", data=assertion_form(signed))
    assert r.status_code == 200, r.text
    assert_invalid_client(await app.client.post("/token", data=assertion_form(signed)))


async def test_a_client_without_the_refresh_grant_gets_no_refresh_token(app: Running) -> None:
    await make_user(app.store, "alice")
    _, secret = await make_client(app.store, "kiosk", grants=("password",))
    assert secret is not None
    body = await _password_login(app, headers=basic("kiosk", secret))
    assert "refresh_token" not in body
    _, claims = jwt_parts(body["access_token"])
    assert claims["client_id"] == "kiosk" and isinstance(claims["sid"], str)
