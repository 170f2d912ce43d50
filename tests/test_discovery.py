"""Discovery and operations: JWKS (RFC 7517/7638), RFC 8414 metadata, /health."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from jwcrypto import jwk

from authserver.config import Settings
from authserver.keys import generate_key, key_files
from authserver.store.sql import SqlStore
from tests.helpers.app import Running, StartApp
from tests.helpers.databases import POSTGRESQL_ONLY, drop_pg_database
from tests.helpers.factories import make_user
from tests.helpers.tokens import jwt_parts

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
# RFC 7638 §3.2: the required members, per key type, in lexicographic order.
THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}


def rfc7638_thumbprint(key: dict[str, Any]) -> str:
    """Computed by hand from the published members, as a resource server would."""
    members = {name: key[name] for name in THUMBPRINT_MEMBERS[key["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def thumbprints_of_files(keys_dir: Path) -> set[str]:
    return {jwk.JWK.from_pem(path.read_bytes()).thumbprint() for path in key_files(keys_dir)}


async def test_jwks_publishes_public_keys_only(server: Running) -> None:
    r = await server.client.get("/.well-known/jwks.json")
    assert r.status_code == 200
    keys = r.json()["keys"]
    assert len(keys) == 1
    for key in keys:
        assert {"kty", "kid", "use", "alg", "n", "e"} <= set(key)
        assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
        assert not PRIVATE_MEMBERS & set(key), key
        assert key["kid"] == rfc7638_thumbprint(key)
    assert {k["kid"] for k in keys} == thumbprints_of_files(server.settings.keys_dir)
    assert "PRIVATE" not in r.text


async def test_jwks_lists_every_key_and_the_newest_signs(
    start_app: StartApp, keys_dir: Path
) -> None:
    newest = generate_key(keys_dir, "ES256")
    running = await start_app()
    await make_user(running.store, "alice")
    keys = (await running.client.get("/.well-known/jwks.json")).json()["keys"]
    assert {k["kid"] for k in keys} == thumbprints_of_files(keys_dir)
    assert len(keys) == 2
    ec = next(k for k in keys if k["kty"] == "EC")
    assert ec["kid"] == newest.kid == rfc7638_thumbprint(ec)
    assert ec["alg"] == "ES256" and ec["crv"] == "P-256"
    for key in keys:
        assert not PRIVATE_MEMBERS & set(key), key
    header, _claims = jwt_parts((await running.login())["access_token"])
    assert header["kid"] == newest.kid
    assert header["alg"] == "ES256"


async def test_authorization_server_metadata(start_app: StartApp) -> None:
    running = await start_app(issuer="http://testserver/", scopes=("read", "write", "admin"))
    r = await running.client.get("/.well-known/oauth-authorization-server")
    assert r.status_code == 200
    meta = r.json()
    issuer = "http://testserver"
    assert meta["issuer"] == issuer
    assert meta["token_endpoint"] == f"{issuer}/token"
    assert meta["jwks_uri"] == f"{issuer}/.well-known/jwks.json"
    assert meta["revocation_endpoint"] == f"{issuer}/revoke"
    assert meta["response_types_supported"] == ["code"]
    assert set(meta["grant_types_supported"]) == {
        "password",
        "refresh_token",
        "client_credentials",
        "authorization_code",
    }
    for endpoint in ("token_endpoint", "revocation_endpoint"):
        assert set(meta[f"{endpoint}_auth_methods_supported"]) == {
            "none",
            "client_secret_basic",
            "client_secret_post",
            "private_key_jwt",
        }
        assert meta[f"{endpoint}_auth_signing_alg_values_supported"] == ["RS256", "ES256"]
    # openid is always supported (OpenID Connect), and granted only when asked for.
    assert meta["scopes_supported"] == ["openid", "read", "write", "admin"]


async def test_every_url_in_the_metadata_answers(server: Running) -> None:
    meta = (await server.client.get("/.well-known/oauth-authorization-server")).json()
    urls = {
        name: value
        for name, value in meta.items()
        if isinstance(value, str) and value.startswith("http")
    }
    assert {"issuer", "token_endpoint", "jwks_uri", "revocation_endpoint"} <= set(urls)
    for name, url in urls.items():
        assert url == meta["issuer"] or url.startswith(meta["issuer"] + "/"), name
        path = url.removeprefix(meta["issuer"]) or "/"
        r = await server.client.get(path)
        assert r.status_code != 404 and r.status_code < 500, (name, r.status_code)
    # The endpoints that take POST answer it with a protocol error, not a 404.
    for name in ("token_endpoint", "revocation_endpoint"):
        r = await server.client.post(meta[name].removeprefix(meta["issuer"]), data={})
        assert r.status_code == 400, name
        assert r.json()["error"] == "invalid_request"
    jwks = (await server.client.get(meta["jwks_uri"].removeprefix(meta["issuer"]))).json()
    assert jwks["keys"]


async def test_the_issuer_url_leads_to_the_metadata(server: Running) -> None:
    index = (await server.client.get("/")).json()
    issuer = server.settings.issuer
    assert index["issuer"] == issuer
    meta = await server.client.get(index["authorization_server_metadata"].removeprefix(issuer))
    assert meta.json()["issuer"] == issuer


async def test_every_get_resource_answers_head(server: Running) -> None:
    # RFC 9110 §9.3.2; load balancers often check health with HEAD.
    for path in (
        "/",
        "/health",
        "/.well-known/jwks.json",
        "/.well-known/oauth-authorization-server",
    ):
        get, head = await server.client.get(path), await server.client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.headers["content-type"] == get.headers["content-type"], path
    assert (await server.client.head("/token")).status_code == 405


async def test_health_ok(server: Running) -> None:
    r = await server.client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_health_503_without_a_signing_key(server: Running) -> None:
    keys_dir = server.settings.keys_dir
    keyring = server.app.state.services.keyring
    for path in key_files(keys_dir):
        path.unlink()
    assert keyring.reload_if_changed()
    r = await server.client.get("/health")
    assert r.status_code == 503
    assert r.json()["error"] == "temporarily_unavailable"
    assert "signing key" in r.json()["error_description"]
    # Logging in cannot sign anything: a clean 503, not a crash.
    login = await server.client.post(
        "/login", json={"username": "alice", "password": "correct horse battery"}
    )
    assert login.status_code == 503, login.text
    assert login.json()["error"] == "temporarily_unavailable"

    generate_key(keys_dir)
    assert keyring.reload_if_changed()
    assert (await server.client.get("/health")).status_code == 200
    assert (await server.login())["access_token"]


async def test_health_503_when_the_schema_is_missing(server: Running) -> None:
    store = server.store
    assert isinstance(store, SqlStore)

    async def rename(old: str, new: str) -> None:
        async with store.engine.begin() as conn:
            await conn.execute(sa.text(f"ALTER TABLE {old} RENAME TO {new}"))

    await rename("users", "users_elsewhere")
    try:
        r = await server.client.get("/health")
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "temporarily_unavailable"
    finally:
        await rename("users_elsewhere", "users")
    assert (await server.client.get("/health")).status_code == 200


async def test_health_503_when_the_database_does_not_answer(
    server: Running, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    services = server.app.state.services
    store = server.store
    if server.settings.is_sqlite:
        url = f"sqlite:///{tmp_path / 'no-such-dir' / 'authserver.db'}"
    else:
        url = "postgresql://postgres@127.0.0.1:1/authserver"
    # A real store over a database that cannot be reached, in place of the good one.
    unreachable = SqlStore.from_settings(make_settings(database_url=url))
    try:
        server.app.state.services = dataclasses.replace(services, store=unreachable)
        r = await server.client.get("/health")
        assert r.status_code == 503
        assert r.json()["error"] == "temporarily_unavailable"
        assert "database" in r.json()["error_description"]
        assert url not in r.text
    finally:
        server.app.state.services = services
        await unreachable.close()
    assert server.store is store
    assert (await server.client.get("/health")).status_code == 200


@POSTGRESQL_ONLY
async def test_health_503_when_postgres_drops_the_database(
    server: Running, database_url: str
) -> None:
    await drop_pg_database(database_url)
    r = await server.client.get("/health")
    assert r.status_code == 503
    assert r.json()["error"] == "temporarily_unavailable"
    r = await server.client.post(
        "/login", json={"username": "alice", "password": "correct horse battery"}
    )
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "temporarily_unavailable"
