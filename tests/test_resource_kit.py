"""The resource-server kit (`authserver.resource`) against the real auth server app.

The kit fetches the metadata and JWKS over HTTP; here its `httpx.AsyncClient`
talks to the in-process auth server through `ASGITransport`, and an event hook
counts the requests that reach each endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from jwcrypto.jwk import JWK

from authserver.api import deps
from authserver.client import ClientSecret, DPoPKey
from authserver.keys import generate_key
from authserver.resource import (
    AccessClaims,
    IntrospectingValidator,
    JwksKeySource,
    TokenValidator,
    Validator,
    install_error_handler,
    require_token,
)
from authserver.tokens import AccessTokenVerifier
from tests.helpers.app import Running, StartApp
from tests.helpers.factories import make_client

ISSUER = "http://testserver"
JWKS_PATH = "/.well-known/jwks.json"
METADATA_PATH = "/.well-known/oauth-authorization-server"


class ManualClock:
    """The key source's clock seam: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting_client(app: Any, hits: Counter[str]) -> httpx.AsyncClient:
    """An HTTP client to an in-process app that counts requests per path."""

    async def count(request: httpx.Request) -> None:
        hits[request.url.path] += 1

    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), event_hooks={"request": [count]}
    )


def resource_app(validator: Validator) -> FastAPI:
    app = FastAPI()
    install_error_handler(app)

    @app.get("/hello")
    async def hello(
        claims: AccessClaims = Depends(require_token(validator, scopes=["read"])),
    ) -> dict[str, Any]:
        return {"sub": claims.sub, "scope": list(claims.scope), "client_id": claims.client_id}

    @app.get("/admin")
    async def admin(
        claims: AccessClaims = Depends(require_token(validator, scopes=["read", "admin"])),
    ) -> dict[str, Any]:
        return {"sub": claims.sub}

    return app


class Kit:
    """A resource app verifying the auth server's tokens, with its JWKS traffic counted."""

    def __init__(
        self, server: Running, *, clock: ManualClock | None = None, issuer: str = ISSUER
    ) -> None:
        self.server = server
        self.clock = clock or ManualClock()
        self.hits: Counter[str] = Counter()
        self.http = counting_client(server.app, self.hits)
        self.keys = JwksKeySource(
            issuer,
            http=self.http,
            metadata_url=f"{ISSUER}{METADATA_PATH}",
            min_refetch_interval=5.0,
            clock=self.clock,
        )
        verifier = AccessTokenVerifier(self.keys, issuer=issuer, audience="authserver")
        self.validator = TokenValidator(verifier, self.keys)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=resource_app(self.validator)),
            base_url="http://resource",
        )

    async def get(self, token: str | None, path: str = "/hello") -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return await self.client.get(path, headers=headers)

    async def close(self) -> None:
        await self.client.aclose()
        await self.http.aclose()


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: the kit never touches the store, so a second backend adds nothing."""
    return f"sqlite:///{tmp_path / 'authserver.db'}"


@pytest.fixture
async def kit(server: Running) -> Any:
    kit = Kit(server)
    yield kit
    await kit.close()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_token(kid: str, **claims: Any) -> str:
    header = {"alg": "RS256", "typ": "at+jwt", "kid": kid}
    payload = {"iss": ISSUER, "sub": "mallory", "aud": "authserver", "exp": 2**40, **claims}
    return ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(b"sig")]
    )


def token_kid(token: str) -> str:
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    kid: str = header["kid"]
    return kid


async def test_valid_token_gives_its_claims(kit: Kit) -> None:
    tokens = await kit.server.login(scope="read")
    r = await kit.get(tokens["access_token"])
    assert r.status_code == 200, r.text
    assert r.json() == {"sub": "alice", "scope": ["read"], "client_id": "authserver"}
    assert kit.hits == {METADATA_PATH: 1, JWKS_PATH: 1}


async def test_no_token_is_401_with_bare_challenge(kit: Kit) -> None:
    for headers in ({}, {"Authorization": "Basic YTpi"}, {"Authorization": "Bearer"}):
        r = await kit.client.get("/hello", headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"] == "invalid_request"
    # Nothing to verify, so nothing fetched.
    assert kit.hits == {}


@pytest.mark.parametrize(
    "token",
    ["garbage", "a.b.c", "e30.e30.e30", "x" * 10_000, forged_token("")],
)
async def test_bad_tokens_are_invalid_token(kit: Kit, token: str) -> None:
    r = await kit.get(token)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert r.json()["error"] == "invalid_token"
    assert token not in r.text


async def test_refresh_token_is_not_an_access_token(kit: Kit) -> None:
    tokens = await kit.server.login()
    r = await kit.get(tokens["refresh_token"])
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token"


async def test_missing_scope_is_403_insufficient_scope(kit: Kit) -> None:
    tokens = await kit.server.login(scope="write")
    r = await kit.get(tokens["access_token"])
    assert r.status_code == 403
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer error="insufficient_scope"')
    assert challenge.endswith('scope="read"')
    assert r.json()["error"] == "insufficient_scope"

    tokens = await kit.server.login()  # read and write: still not admin
    r = await kit.get(tokens["access_token"], "/admin")
    assert r.status_code == 403
    assert r.headers["www-authenticate"].endswith('scope="read admin"')
    assert "admin" in r.json()["error_description"]


async def test_token_of_another_issuer_is_rejected(kit: Kit, start_app: StartApp) -> None:
    # Same database and keys, so the signature verifies: only `iss` differs.
    other = await start_app(issuer="http://other-issuer")
    tokens = await other.login()
    r = await kit.get(tokens["access_token"])
    assert r.status_code == 401
    assert "issuer" in r.json()["error_description"]


async def test_token_for_another_audience_is_rejected(kit: Kit, start_app: StartApp) -> None:
    other = await start_app(audience="another-api")
    tokens = await other.login()
    r = await kit.get(tokens["access_token"])
    assert r.status_code == 401
    assert "audience" in r.json()["error_description"]
    # The same server's own token passes: the audience check is what failed.
    assert (await kit.get((await kit.server.login())["access_token"])).status_code == 200


async def test_token_signed_by_another_servers_key_is_rejected(
    kit: Kit, start_app: StartApp, tmp_path: Path
) -> None:
    other_keys = tmp_path / "other-keys"
    generate_key(other_keys)
    other = await start_app(keys_dir=other_keys)
    tokens = await other.login()
    kit.clock.now += 10  # past the refetch interval: the unknown kid is looked up
    r = await kit.get(tokens["access_token"])
    assert r.status_code == 401
    assert "unknown key" in r.json()["error_description"]


async def test_metadata_naming_another_issuer_is_refused(server: Running) -> None:
    # RFC 8414 §3.3: the metadata must be the issuer's own. Until it is, no key is
    # trusted and the resource answers 503, without fetching again at once.
    kit = Kit(server, issuer="http://impostor")
    try:
        tokens = await server.login()
        for _ in range(3):
            r = await kit.get(tokens["access_token"])
            assert r.status_code == 503
            assert r.json()["error"] == "temporarily_unavailable"
            assert "retry-after" in r.headers
        assert kit.hits == {METADATA_PATH: 1}
    finally:
        await kit.close()


async def test_jwks_is_cached_for_its_max_age(kit: Kit) -> None:
    tokens = await kit.server.login()
    for _ in range(10):
        assert (await kit.get(tokens["access_token"])).status_code == 200
    assert kit.hits[JWKS_PATH] == 1
    # The auth server sends Cache-Control: max-age=60.
    kit.clock.now += 59
    assert (await kit.get(tokens["access_token"])).status_code == 200
    assert kit.hits[JWKS_PATH] == 1
    kit.clock.now += 2
    results = await asyncio.gather(*(kit.get(tokens["access_token"]) for _ in range(20)))
    assert {r.status_code for r in results} == {200}
    assert kit.hits[JWKS_PATH] == 2  # one refetch for twenty concurrent requests
    assert kit.hits[METADATA_PATH] == 1


async def test_unknown_kid_refetch_is_rate_limited(kit: Kit) -> None:
    tokens = await kit.server.login()
    assert (await kit.get(tokens["access_token"])).status_code == 200
    assert kit.hits[JWKS_PATH] == 1

    forged = [forged_token(secrets.token_urlsafe(8)) for _ in range(50)]
    results = await asyncio.gather(*(kit.get(t) for t in forged))
    assert {r.status_code for r in results} == {401}
    assert kit.hits[JWKS_PATH] == 1  # within the interval of the first fetch: none

    kit.clock.now += 5
    results = await asyncio.gather(*(kit.get(t) for t in forged))
    assert {r.status_code for r in results} == {401}
    assert kit.hits[JWKS_PATH] == 2  # fifty unknown kids, one refetch

    for t in forged:
        assert (await kit.get(t)).status_code == 401
    assert kit.hits[JWKS_PATH] == 2
    assert kit.hits[METADATA_PATH] == 1


async def test_new_signing_key_is_found_by_unknown_kid_refetch(kit: Kit, keys_dir: Path) -> None:
    old = await kit.server.login()
    assert (await kit.get(old["access_token"])).status_code == 200

    new_key = generate_key(keys_dir)
    assert kit.server.app.state.services.keyring.reload_if_changed()
    new = await kit.server.login()
    assert token_kid(new["access_token"]) == new_key.kid

    # Within the refetch interval the new kid is unknown, as a forged one would be...
    assert (await kit.get(new["access_token"])).status_code == 401
    assert kit.hits[JWKS_PATH] == 1
    # ...after it, one refetch finds it, for every concurrent request at once.
    kit.clock.now += 5
    results = await asyncio.gather(*(kit.get(new["access_token"]) for _ in range(20)))
    assert {r.status_code for r in results} == {200}
    assert kit.hits[JWKS_PATH] == 2
    # The previous key is still published: its tokens still pass.
    assert (await kit.get(old["access_token"])).status_code == 200
    assert set(kit.keys.kids) == {new_key.kid, token_kid(old["access_token"])}


async def test_retired_key_stops_verifying_after_refetch(kit: Kit, keys_dir: Path) -> None:
    old = await kit.server.login()
    assert (await kit.get(old["access_token"])).status_code == 200  # verified and cached
    generation = kit.keys.generation

    old_files = sorted(keys_dir.glob("*.pem"))
    generate_key(keys_dir)
    for path in old_files:
        path.unlink()
    assert kit.server.app.state.services.keyring.reload_if_changed()
    kit.clock.now += 61  # the cached JWKS is past its max-age

    r = await kit.get(old["access_token"])
    assert r.status_code == 401
    assert "unknown key" in r.json()["error_description"]
    assert kit.keys.generation == generation + 1
    assert (await kit.get((await kit.server.login())["access_token"])).status_code == 200


def jwks_app(document: dict[str, Any], cache_control: str) -> FastAPI:
    """A stand-in issuer publishing `document` as its JWKS."""
    app = FastAPI()

    @app.get(METADATA_PATH)
    async def metadata() -> dict[str, str]:
        return {"issuer": "http://issuer", "jwks_uri": "http://issuer/jwks"}

    @app.get("/jwks")
    async def jwks() -> JSONResponse:
        return JSONResponse(document, headers={"Cache-Control": cache_control})

    return app


def rsa_jwk(bits: int = 2048, **members: Any) -> dict[str, Any]:
    key = JWK.from_pyca(rsa.generate_private_key(public_exponent=65537, key_size=bits))
    return {**key.export_public(as_dict=True), "use": "sig", "alg": "RS256", **members}


async def test_only_rs256_and_es256_signature_keys_are_taken() -> None:
    ec = JWK.generate(kty="EC", crv="P-256")
    ec_p384 = JWK.generate(kty="EC", crv="P-384")
    private = JWK.from_pyca(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    document = {
        "keys": [
            rsa_jwk(kid="good-rsa"),
            {**ec.export_public(as_dict=True), "kid": "good-ec", "use": "sig", "alg": "ES256"},
            {
                **private.export_private(as_dict=True),
                "kid": "with-private",
                "use": "sig",
                "alg": "RS256",
            },  # fmt: skip
            {"kty": "oct", "k": b64(b"secret" * 8), "kid": "hmac", "use": "sig", "alg": "HS256"},
            rsa_jwk(kid="no-use", use=None),
            rsa_jwk(kid="encryption", use="enc"),
            rsa_jwk(kid="no-alg", alg=None),
            rsa_jwk(kid="rsa-as-ec", alg="ES256"),
            rsa_jwk(kid="weak", bits=1024),
            rsa_jwk(kid="wrong-ops", key_ops=["sign"]),
            {**ec_p384.export_public(as_dict=True), "kid": "p384", "use": "sig", "alg": "ES256"},
            rsa_jwk(kid="good-rsa"),  # a duplicate kid does not replace the first
            "not an object",
        ]
    }
    hits: Counter[str] = Counter()
    async with counting_client(jwks_app(document, "max-age=600"), hits) as http:
        keys = JwksKeySource("http://issuer", http=http)
        await keys.refresh()
        assert set(keys.kids) == {"good-rsa", "good-ec", "with-private"}
        assert keys.generation == 1
        assert keys.verification_key("good-ec").alg == "ES256"  # type: ignore[union-attr]
        # The private members were dropped: the key only verifies.
        prepared = keys.verification_key("with-private")
        assert prepared is not None
        assert "d" not in prepared.key.to_dict()
        assert not keys.needs_refresh()


@pytest.mark.parametrize(
    ("cache_control", "fresh_for"),
    [("public, max-age=600", 600), ("max-age=1", 5), ("no-store", 5), ("", 300)],
)
async def test_cache_lifetime_follows_cache_control(cache_control: str, fresh_for: float) -> None:
    clock = ManualClock()
    hits: Counter[str] = Counter()
    document = {"keys": [rsa_jwk(kid="k1")]}
    async with counting_client(jwks_app(document, cache_control), hits) as http:
        keys = JwksKeySource("http://issuer", http=http, clock=clock)
        await keys.refresh()
        clock.now += fresh_for - 0.5
        assert not keys.needs_refresh()
        clock.now += 1
        assert keys.needs_refresh()
        await keys.refresh()
        assert hits["/jwks"] == 2
        assert keys.generation == 1  # same keys: nothing for the verifier to forget


async def test_server_protected_route_uses_the_kit(server: Running) -> None:
    # /protected is the kit's check over the server's own keys: the same answers.
    assert deps.get_claims.__qualname__.startswith("require_token")
    assert deps.claims_of.__qualname__.startswith("token_claims")
    tokens = await server.login()
    ok = await server.client.get(
        "/protected", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert ok.status_code == 200
    forged = await server.client.get(
        "/protected", headers={"Authorization": f"Bearer {forged_token('nope')}"}
    )
    assert forged.status_code == 401
    assert forged.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert "unknown key" in forged.json()["error_description"]


class IntrospectingKit:
    """A resource app that asks the auth server about every token (cache as given)."""

    def __init__(self, server: Running, secret: str, *, cache_ttl: float) -> None:
        self.hits: Counter[str] = Counter()
        self.http = counting_client(server.app, self.hits)
        self.clock = ManualClock()
        self.clock.now = time.time()
        self.validator = IntrospectingValidator(
            f"{ISSUER}/introspect",
            ClientSecret("orders-api", secret),
            audience="authserver",
            http=self.http,
            cache_ttl=cache_ttl,
            clock=self.clock,
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=resource_app(self.validator)),
            base_url="http://resource",
        )

    async def get(self, token: str) -> httpx.Response:
        return await self.client.get("/hello", headers={"Authorization": f"Bearer {token}"})

    async def close(self) -> None:
        await self.client.aclose()
        await self.http.aclose()


async def test_introspection_sees_a_logout_at_once(server: Running) -> None:
    _, secret = await make_client(server.store, "orders-api")
    assert secret is not None
    kit = IntrospectingKit(server, secret, cache_ttl=0)
    try:
        tokens = await server.login()
        r = await kit.get(tokens["access_token"])
        assert r.status_code == 200, r.text
        assert r.json()["sub"] == "alice"
        await server.client.post("/logout", json={"refresh_token": tokens["refresh_token"]})
        r = await kit.get(tokens["access_token"])
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        assert kit.hits["/introspect"] == 2
    finally:
        await kit.close()


async def test_introspection_answers_are_cached_briefly(server: Running) -> None:
    _, secret = await make_client(server.store, "orders-api")
    assert secret is not None
    kit = IntrospectingKit(server, secret, cache_ttl=5)
    try:
        token = (await server.login())["access_token"]
        for _ in range(5):
            assert (await kit.get(token)).status_code == 200
        assert kit.hits["/introspect"] == 1
        kit.clock.now += 6
        assert (await kit.get(token)).status_code == 200
        assert kit.hits["/introspect"] == 2
        assert (await kit.get("not a token")).status_code == 401
    finally:
        await kit.close()


async def test_introspection_with_wrong_client_credentials_is_an_outage_not_a_pass(
    server: Running,
) -> None:
    await make_client(server.store, "orders-api")
    kit = IntrospectingKit(server, "wrong secret", cache_ttl=0)
    try:
        token = (await server.login())["access_token"]
        r = await kit.get(token)
        assert r.status_code == 503
        assert r.json()["error"] == "temporarily_unavailable"
    finally:
        await kit.close()


@pytest.mark.parametrize(("token_type", "accepted"), [("DPoP", True), ("refresh_token", False)])
async def test_introspection_of_another_issuer_that_names_the_scheme(
    token_type: str, accepted: bool
) -> None:
    """RFC 9449 §6.2: an issuer may answer `token_type: DPoP` for a bound access token."""
    key = DPoPKey()
    issuer = FastAPI()

    @issuer.post("/introspect")
    async def introspect() -> dict[str, Any]:
        now = int(time.time())
        return {
            "active": True,
            "token_type": token_type,
            "sub": "bob",
            "scope": "read",
            "client_id": "app",
            "aud": "authserver",
            "iss": "https://other-issuer.example",
            "exp": now + 60,
            "iat": now,
            "cnf": {"jkt": key.thumbprint},
        }

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=issuer), base_url="https://other-issuer.example"
    ) as http:
        validator = IntrospectingValidator(
            "https://other-issuer.example/introspect",
            ClientSecret("orders-api", "secret"),
            audience="authserver",
            http=http,
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=resource_app(validator)),
            base_url="http://resource",
        ) as resource:
            proof = key.proof("GET", "http://resource/hello", access_token="opaque")
            r = await resource.get(
                "/hello", headers={"Authorization": "DPoP opaque", "DPoP": proof}
            )
    if accepted:
        assert r.status_code == 200, r.text
        assert r.json()["sub"] == "bob"
    else:
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith('DPoP error="invalid_token"')
