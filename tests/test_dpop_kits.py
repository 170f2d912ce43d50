"""DPoP in the kits: `TokenAuth(dpop=...)` against the real app, and `authserver.resource`
accepting DPoP-bound tokens in another app (CONTRACT §8, RFC 9449)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from jwcrypto.jwk import JWK

from authserver.client import (
    DPoPKey,
    LoginEndpoints,
    PrivateKeyJWT,
    TokenAuth,
    TokenEndpoint,
    TokenEndpointError,
    TokenPair,
)
from authserver.resource import (
    AccessClaims,
    JwksKeySource,
    TokenValidator,
    install_error_handler,
    require_token,
)
from authserver.tokens import AccessTokenVerifier
from tests.helpers.app import Running, StartApp
from tests.helpers.factories import DEFAULT_PASSWORD, make_client, make_user
from tests.helpers.tokens import jwt_parts

BASE = "http://testserver"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: the kits behave alike whatever the server's store."""
    return f"sqlite:///{tmp_path / 'authserver.db'}"


class Clock:
    """The kit's clock, `now` seconds ahead of the server's: it finds tokens stale."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return time.time() + self.now


def resource_app(server: Running) -> FastAPI:
    """Another API, verifying the server's tokens from its JWKS with the resource kit."""
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app), base_url=BASE)
    keys = JwksKeySource(BASE, http=http)
    validator = TokenValidator(AccessTokenVerifier(keys, issuer=BASE, audience="authserver"), keys)
    app = FastAPI()
    install_error_handler(app)

    @app.get("/hello")
    async def hello(claims: AccessClaims = Depends(require_token(validator))) -> dict[str, Any]:
        return {"sub": claims.sub}

    @app.get("/files/{name:path}")
    async def file(
        name: str, claims: AccessClaims = Depends(require_token(validator))
    ) -> dict[str, Any]:
        return {"name": name, "sub": claims.sub}

    @app.get("/refuses")
    async def refuses() -> JSONResponse:
        # A 400 that carries a nonce: only a 401 asks a resource's client to retry.
        body = {"error": "use_dpop_nonce"}
        return JSONResponse(body, status_code=400, headers={"DPoP-Nonce": "resource-nonce"})

    @app.get("/admin")
    async def admin(
        claims: AccessClaims = Depends(require_token(validator, scopes=["admin"])),
    ) -> dict[str, Any]:
        return {"sub": claims.sub}

    return app


def client_for(server: Running, auth: TokenAuth, hits: Counter[str]) -> httpx.AsyncClient:
    async def count(request: httpx.Request) -> None:
        hits[request.url.path] += 1

    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=server.app),
        mounts={"http://resource": httpx.ASGITransport(app=resource_app(server))},
        base_url=BASE,
        auth=auth,
        event_hooks={"request": [count]},
    )


@pytest.mark.parametrize("endpoint", ["token", "login"])
async def test_token_auth_binds_and_proves(server: Running, endpoint: str) -> None:
    clock = Clock()
    auth = TokenAuth(
        TokenEndpoint(BASE + "/token") if endpoint == "token" else LoginEndpoints(BASE),
        username="alice",
        password=DEFAULT_PASSWORD,
        dpop=True,
        clock=clock,
    )
    hits: Counter[str] = Counter()
    async with client_for(server, auth, hits) as client:
        for url in ("/protected", "/protected", "http://resource/hello"):
            r = await client.get(url)
            assert r.status_code == 200, r.text
        assert auth.tokens is not None and auth.dpop_key is not None
        assert auth.tokens.token_type == "DPoP"
        first = auth.tokens
        assert jwt_parts(first.access_token)[1]["cnf"] == {"jkt": auth.dpop_key.thumbprint}
        # Stale: many callers at once, one refresh (single flight), with a proof.
        clock.now += 10_000
        results = await asyncio.gather(*(client.get("/protected") for _ in range(20)))
        assert all(r.status_code == 200 for r in results)
        assert auth.tokens is not first
    refresh_path = "/token" if endpoint == "token" else "/refresh"
    login_path = "/token" if endpoint == "token" else "/login"
    assert hits[login_path] + (hits[refresh_path] if refresh_path != login_path else 0) == 2
    assert hits["/protected"] == 22


async def test_a_kept_key_resumes_the_session_and_another_key_cannot(server: Running) -> None:
    key = DPoPKey()
    auth = TokenAuth(BASE + "/token", username="alice", password=DEFAULT_PASSWORD, dpop=key)
    async with client_for(server, auth, Counter()) as client:
        assert (await client.get("/protected")).status_code == 200
    assert auth.tokens is not None and auth.tokens.refresh_token is not None
    saved = auth.tokens.refresh_token
    # Another process, another key: the stolen refresh token is refused, and not spent.
    thief = TokenAuth(BASE + "/token", tokens=auth.tokens.from_refresh_token(saved), dpop=True)
    async with client_for(server, thief, Counter()) as client:
        with pytest.raises(TokenEndpointError) as refused:
            await client.get("/protected")
    assert refused.value.error == "invalid_dpop_proof"
    # The application restarts with the key it kept (its PEM) and carries on.
    again = TokenAuth(
        BASE + "/token",
        tokens=auth.tokens.from_refresh_token(saved),
        dpop=DPoPKey(key.private_pem()),
    )
    async with client_for(server, again, Counter()) as client:
        assert (await client.get("/protected")).status_code == 200


async def test_token_auth_answers_nonce_challenges(start_app: StartApp) -> None:
    server = await start_app(dpop_nonce=True)
    await make_user(server.store, "alice")
    auth = TokenAuth(BASE + "/token", username="alice", password=DEFAULT_PASSWORD, dpop=True)
    hits: Counter[str] = Counter()
    async with client_for(server, auth, hits) as client:
        for _ in range(3):
            r = await client.get("/protected")
            assert r.status_code == 200, r.text
    # One challenge at the token endpoint; the nonce it gave works at /protected too.
    assert hits == {"/token": 2, "/protected": 3}


async def test_the_resource_kit_refuses_replays_and_downgrades(server: Running) -> None:
    auth = TokenAuth(BASE + "/token", username="alice", password=DEFAULT_PASSWORD, dpop=True)
    async with client_for(server, auth, Counter()) as client:
        assert (await client.get("http://resource/hello")).status_code == 200
    assert auth.tokens is not None and auth.dpop_key is not None
    token = auth.tokens.access_token
    url = "http://resource/hello"
    resource = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=resource_app(server)), base_url="http://resource"
    )
    async with resource:
        proof = auth.dpop_key.proof("GET", url, access_token=token)
        headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
        assert (await resource.get("/hello", headers=headers)).status_code == 200
        replay = await resource.get("/hello", headers=headers)
        assert replay.status_code == 401
        assert replay.headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
        downgraded = await resource.get("/hello", headers={"Authorization": f"Bearer {token}"})
        assert downgraded.status_code == 401
        assert downgraded.json()["error"] == "invalid_token"
        # Bearer tokens keep working unchanged.
        plain = (await server.login())["access_token"]
        bearer = await resource.get("/hello", headers={"Authorization": f"Bearer {plain}"})
        assert bearer.status_code == 200, bearer.text


async def test_a_private_key_jwt_client_answers_nonce_challenges(start_app: StartApp) -> None:
    server = await start_app(dpop_nonce=True)
    signer = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(JWK.from_pyca(signer.public_key()).export_public())
    await make_client(server.store, "robot", jwks=json.dumps({"keys": [public]}))
    # The server checks the proof before the client: the challenge spends no assertion,
    # so the same one goes again with the nonce.
    form: dict[str, str] = {"grant_type": "client_credentials"}
    PrivateKeyJWT("robot", signer).apply(form, {}, audience=BASE + "/token")
    key = DPoPKey()
    r = await server.client.post(
        "/token", data=form, headers={"DPoP": key.proof("POST", BASE + "/token")}
    )
    assert r.status_code == 400 and r.json()["error"] == "use_dpop_nonce", r.text
    proof = key.proof("POST", BASE + "/token", nonce=r.headers["dpop-nonce"])
    r = await server.client.post("/token", data=form, headers={"DPoP": proof})
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "DPoP"
    # The kit answers the challenge with a request built anew: a fresh assertion.
    assertions: list[str] = []

    async def keep(request: httpx.Request) -> None:
        if request.url.path == "/token":
            assertions.extend(parse_qs(request.content.decode())["client_assertion"])

    auth = TokenAuth(
        TokenEndpoint(BASE + "/token", client_auth=PrivateKeyJWT("robot", signer)),
        client_credentials=True,
        dpop=True,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=server.app),
        base_url=BASE,
        auth=auth,
        event_hooks={"request": [keep]},
    ) as client:
        r = await client.get("/protected")
    assert r.status_code == 200, r.text
    assert len(assertions) == 2 and assertions[0] != assertions[1]


async def test_the_resource_kit_checks_the_path_as_the_client_sent_it(server: Running) -> None:
    """`htu` names the path percent-encoded as sent; the router sees it decoded."""
    auth = TokenAuth(BASE + "/token", username="alice", password=DEFAULT_PASSWORD, dpop=True)
    async with client_for(server, auth, Counter()) as client:
        for path in ("/files/a%20b", "/files/caf%C3%A9", "/files/x%2Fy"):
            r = await client.get("http://resource" + path)
            assert r.status_code == 200, (path, r.text)
    assert auth.tokens is not None and auth.dpop_key is not None
    token = auth.tokens.access_token
    # A proof for the decoded spelling names another URL.
    resource = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=resource_app(server)), base_url="http://resource"
    )
    async with resource:
        proof = auth.dpop_key.proof("GET", "http://resource/files/a", access_token=token)
        r = await resource.get(
            "/files/a%20b", headers={"Authorization": f"DPoP {token}", "DPoP": proof}
        )
    assert r.status_code == 401
    assert "another URL" in r.json()["error_description"]


def test_dpop_bound_tokens_need_their_key() -> None:
    bound = TokenPair(access_token="a", refresh_token="r", token_type="DPoP")
    with pytest.raises(ValueError, match="DPoP-bound"):
        TokenAuth(BASE + "/token", tokens=bound)
    auth = TokenAuth(BASE + "/token", tokens=TokenPair(access_token="a", refresh_token="r"))
    with pytest.raises(ValueError, match="DPoP-bound"):
        auth.set_tokens(bound)
    assert TokenAuth(BASE + "/token", tokens=bound, dpop=True).tokens is bound


async def test_a_missing_scope_is_answered_in_the_scheme_the_token_came_with(
    server: Running,
) -> None:
    """RFC 9449 §7.1: a DPoP request's 403 carries a DPoP challenge; a Bearer one's, Bearer."""
    auth = TokenAuth(BASE + "/token", username="alice", password=DEFAULT_PASSWORD, dpop=True)
    async with client_for(server, auth, Counter()) as client:
        r = await client.get("http://resource/admin")
    assert r.status_code == 403, r.text
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('DPoP error="insufficient_scope"'), challenge
    assert 'algs="ES256 RS256"' in challenge and 'scope="admin"' in challenge
    plain = (await server.login())["access_token"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=resource_app(server)), base_url="http://resource"
    ) as resource:
        r = await resource.get("/admin", headers={"Authorization": f"Bearer {plain}"})
    assert r.status_code == 403
    assert r.headers["www-authenticate"].startswith('Bearer error="insufficient_scope"')


async def test_a_resources_400_is_returned_as_it_is_and_its_nonce_kept(server: Running) -> None:
    auth = TokenAuth(BASE + "/token", username="alice", password=DEFAULT_PASSWORD, dpop=True)
    proofs: list[str] = []

    async def keep(request: httpx.Request) -> None:
        if request.url.host == "resource":
            proofs.append(request.headers["dpop"])

    async with client_for(server, auth, Counter()) as client:
        client.event_hooks["request"].append(keep)
        r = await client.get("http://resource/refuses")
        assert r.status_code == 400
        assert r.json() == {"error": "use_dpop_nonce"}
        r = await client.get("http://resource/hello")
        assert r.status_code == 200, r.text
    assert len(proofs) == 2  # no retry of the 400
    assert "nonce" not in jwt_parts(proofs[0])[1]
    assert jwt_parts(proofs[1])[1]["nonce"] == "resource-nonce"
