"""DPoP (CONTRACT §8, RFC 9449): bound tokens, the attacks on them, on both databases.

Proofs are made with the client kit's `DPoPKey`; the forged ones (a private key in
`jwk`, `alg: none`, HS256, another `typ`) are signed here with python-jose itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jws
from jwcrypto.jwk import JWK

from authserver.client import DPoPKey
from authserver.dpop import access_token_hash, normalise_url
from tests.helpers.app import Running, StartApp, family_of
from tests.helpers.cli import cli_env, invoke
from tests.helpers.factories import DEFAULT_PASSWORD, make_client, make_user
from tests.helpers.tokens import jwt_parts

BASE = "http://testserver"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite: the binding's SQL runs on both databases in test_rotation_paths.py, and
    the replay store on PostgreSQL across processes in test_processes.py."""
    return f"sqlite:///{tmp_path / 'authserver.db'}"


CREDENTIALS = {"username": "alice", "password": DEFAULT_PASSWORD}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forged(
    key: DPoPKey,
    method: str,
    url: str,
    *,
    access_token: str | None = None,
    header: dict[str, Any] | None = None,
    alg: str = "ES256",
    signing_key: Any = None,
    **claims: Any,
) -> str:
    """A proof as `key.proof` makes it, with any header or claim changed."""
    body: dict[str, Any] = {"jti": b64(time.time_ns().to_bytes(8)), "htm": method, "htu": url}
    body["iat"] = int(time.time())
    if access_token is not None:
        body["ath"] = access_token_hash(access_token)
    body.update(claims)
    headers = {"typ": "dpop+jwt", "jwk": key.jwk, **(header or {})}
    signer = signing_key if signing_key is not None else key._private
    token: str = jws.sign(body, signer, headers=headers, algorithm=alg)
    return token


def unsigned(key: DPoPKey, method: str, url: str) -> str:
    header = {"typ": "dpop+jwt", "alg": "none", "jwk": key.jwk}
    claims = {"jti": "none-1", "htm": method, "htu": url, "iat": int(time.time())}
    # With a signature segment, so that it is the algorithm that gets it refused.
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.c2ln"


def private_jwk(key: DPoPKey) -> dict[str, Any]:
    exported: dict[str, Any] = JWK.from_pyca(key._private).export_private(as_dict=True)
    return exported


# Each a bad proof for a request `method url`, made with the request's key.
BadProof = Callable[[DPoPKey, str, str, str | None], str]
BAD_PROOFS: dict[str, BadProof] = {
    "another method": lambda k, m, u, t: k.proof("PUT", u, access_token=t),
    "another URL": lambda k, m, u, t: k.proof(m, BASE + "/elsewhere", access_token=t),
    "another host": lambda k, m, u, t: k.proof(m, u.replace("testserver", "evil"), access_token=t),
    "a private key in jwk": lambda k, m, u, t: forged(
        k, m, u, access_token=t, header={"jwk": private_jwk(k)}
    ),
    "alg none": lambda k, m, u, t: unsigned(k, m, u),
    "HS256": lambda k, m, u, t: forged(
        k, m, u, access_token=t, alg="HS256", signing_key="a-shared-secret-of-32-bytes-len!"
    ),
    "typ JWT": lambda k, m, u, t: forged(k, m, u, access_token=t, header={"typ": "JWT"}),
    "iat too old": lambda k, m, u, t: forged(k, m, u, access_token=t, iat=int(time.time()) - 300),
    "iat in the future": lambda k, m, u, t: forged(
        k, m, u, access_token=t, iat=int(time.time()) + 300
    ),
    "no jti": lambda k, m, u, t: forged(k, m, u, access_token=t, jti=None),
    "signed by another key than its jwk": lambda k, m, u, t: forged(
        k, m, u, access_token=t, signing_key=ec.generate_private_key(ec.SECP256R1())
    ),
    "garbage": lambda k, m, u, t: "not.a.proof",
}
# What each is refused for: the check that caught it, not an earlier accident.
REASONS = {
    "another method": "another HTTP method",
    "another URL": "another URL",
    "another host": "another URL",
    "a private key in jwk": "private key",
    "alg none": "algorithm is not allowed",
    "HS256": "algorithm is not allowed",
    "typ JWT": "typ must be dpop+jwt",
    "iat too old": "too old",
    "iat in the future": "in the future",
    "no jti": "'jti'",
    "signed by another key than its jwk": "signature is invalid",
    "garbage": "malformed",
    "no ath": "another access token",
    "ath of another token": "another access token",
    "a non-ASCII ath": "another access token",
    "signed by another key than cnf.jkt": "another key than the token's",
}
# Only where an access token is presented (RFC 9449 §4.3 step 11 and §7.1).
RESOURCE_ONLY: dict[str, BadProof] = {
    "no ath": lambda k, m, u, t: k.proof(m, u),
    "ath of another token": lambda k, m, u, t: k.proof(m, u, access_token=f"{t}x"),
    "a non-ASCII ath": lambda k, m, u, t: forged(k, m, u, ath="é" * 43),
    "signed by another key than cnf.jkt": lambda k, m, u, t: DPoPKey().proof(m, u, access_token=t),
}


async def dpop_login(running: Running, key: DPoPKey, **extra: Any) -> dict[str, Any]:
    r = await running.client.post(
        "/login",
        json={**CREDENTIALS, **extra},
        headers={"DPoP": key.proof("POST", BASE + "/login")},
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def protected(running: Running, token: str, proof: str | None) -> httpx.Response:
    headers = {"Authorization": f"DPoP {token}"}
    if proof is not None:
        headers["DPoP"] = proof
    return await running.client.get("/protected", headers=headers)


def assert_token_endpoint_refusal(r: httpx.Response, error: str = "invalid_dpop_proof") -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"] == error
    assert r.headers["cache-control"] == "no-store"


def assert_resource_refusal(r: httpx.Response, error: str = "invalid_dpop_proof") -> None:
    assert r.status_code == 401, r.text
    assert r.json()["error"] == error
    assert r.headers["www-authenticate"].startswith(f'DPoP error="{error}"')


async def test_a_proof_binds_the_tokens_to_its_key(server: Running) -> None:
    key = DPoPKey()
    password_form = {"grant_type": "password", **CREDENTIALS}
    for path in ("/login", "/token"):
        headers = {"DPoP": key.proof("POST", BASE + path)}
        if path == "/login":
            r = await server.client.post(path, json=CREDENTIALS, headers=headers)
        else:
            r = await server.client.post(path, data=password_form, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["token_type"] == "DPoP"
        _, claims = jwt_parts(body["access_token"])
        assert claims["cnf"] == {"jkt": key.thumbprint}
        ok = await protected(
            server,
            body["access_token"],
            key.proof("GET", BASE + "/protected", access_token=body["access_token"]),
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["username"] == "alice"
    # Without a proof nothing changes: a Bearer token, with no cnf, that works as before.
    plain = await server.login()
    assert plain["token_type"] == "bearer"
    assert "cnf" not in jwt_parts(plain["access_token"])[1]
    r = await server.client.get(
        "/protected", headers={"Authorization": f"Bearer {plain['access_token']}"}
    )
    assert r.status_code == 200


async def test_a_bound_refresh_needs_the_same_key_and_is_not_spent_without_it(
    server: Running,
) -> None:
    key = DPoPKey()
    tokens = await dpop_login(server, key)
    refresh_token = tokens["refresh_token"]
    # Stolen, presented without a proof, or with a proof by the thief's own key:
    for headers in ({}, {"DPoP": DPoPKey().proof("POST", BASE + "/refresh")}):
        r = await server.client.post(
            "/refresh", json={"refresh_token": refresh_token}, headers=headers
        )
        assert_token_endpoint_refusal(r)
        r = await server.client.post(
            "/token",
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            headers={k: v.replace("/refresh", "/token") for k, v in headers.items()},
        )
        assert_token_endpoint_refusal(r)
    # ... which spent nothing: the owner refreshes with it, and gets a bound pair again.
    r = await server.client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        headers={"DPoP": key.proof("POST", BASE + "/token")},
    )
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "DPoP"
    assert jwt_parts(r.json()["access_token"])[1]["cnf"] == {"jkt": key.thumbprint}
    successor = r.json()["refresh_token"]
    # The spent token replayed by a thief without the key: refused, and no reuse
    # revocation either (a copy without the key cannot even end the session).
    r = await server.client.post("/refresh", json={"refresh_token": refresh_token})
    assert_token_endpoint_refusal(r)
    family = await family_of(server, successor)
    assert family["revoked_reason"] is None
    r = await server.client.post(
        "/refresh",
        json={"refresh_token": successor},
        headers={"DPoP": key.proof("POST", BASE + "/refresh")},
    )
    assert r.status_code == 200, r.text


async def test_a_proof_at_refresh_binds_a_public_family_started_without_one(
    server: Running,
) -> None:
    """CONTRACT §8: a proof at /refresh binds the family as one at login does; from then
    on a refresh without the key is refused and spends nothing."""
    await make_client(server.store, "spa", public=True)
    for path, extra in (("/refresh", {}), ("/token", {"client_id": "spa"})):
        tokens = await server.login(**extra)
        assert tokens["token_type"] == "bearer"
        key = DPoPKey()

        async def refresh(token: str, proof: str | None, path: str = path) -> httpx.Response:
            headers = {} if proof is None else {"DPoP": proof}
            if path == "/refresh":
                return await server.client.post(
                    path, json={"refresh_token": token}, headers=headers
                )
            form = {"grant_type": "refresh_token", "refresh_token": token, "client_id": "spa"}
            return await server.client.post(path, data=form, headers=headers)

        r = await refresh(tokens["refresh_token"], key.proof("POST", BASE + path))
        assert r.status_code == 200, r.text
        assert r.json()["token_type"] == "DPoP"
        assert jwt_parts(r.json()["access_token"])[1]["cnf"] == {"jkt": key.thumbprint}
        bound = r.json()["refresh_token"]
        family = await family_of(server, bound)
        assert family["dpop_jkt"] == key.thumbprint
        # A copy of the new refresh token without the key, or with another key:
        assert_token_endpoint_refusal(await refresh(bound, None))
        assert_token_endpoint_refusal(await refresh(bound, DPoPKey().proof("POST", BASE + path)))
        assert (await family_of(server, bound))["statuses"]["active"] == 1
        r = await refresh(bound, key.proof("POST", BASE + path))
        assert r.status_code == 200, r.text
        assert r.json()["token_type"] == "DPoP"


async def test_a_thief_who_binds_a_stolen_refresh_token_first_is_caught_by_reuse_detection(
    server: Running,
) -> None:
    """A refresh token stolen before its family was bound, used first by the thief with a
    proof of their own key: the owner's next refresh with it (spent now) is reuse, and
    revokes the family the thief bound, as it would have had nobody sent a proof."""
    tokens = await server.login()
    stolen = tokens["refresh_token"]
    thief = DPoPKey()
    r = await server.client.post(
        "/refresh",
        json={"refresh_token": stolen},
        headers={"DPoP": thief.proof("POST", BASE + "/refresh")},
    )
    assert r.status_code == 200, r.text
    thiefs = r.json()["refresh_token"]
    assert (await family_of(server, thiefs))["dpop_jkt"] == thief.thumbprint
    r = await server.client.post("/refresh", json={"refresh_token": stolen})
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "invalid_grant"
    assert (await family_of(server, thiefs))["revoked_reason"] == "reuse"
    r = await server.client.post(
        "/refresh",
        json={"refresh_token": thiefs},
        headers={"DPoP": thief.proof("POST", BASE + "/refresh")},
    )
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_grant"


async def test_attacks_on_the_token_endpoint(server: Running) -> None:
    """Every bad proof: 400 invalid_dpop_proof, and no token issued."""
    key = DPoPKey()
    url = BASE + "/token"
    form = {"grant_type": "password", **CREDENTIALS}
    for name, make in BAD_PROOFS.items():
        r = await server.client.post(
            "/token", data=form, headers={"DPoP": make(key, "POST", url, None)}
        )
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"] == "invalid_dpop_proof", name
        assert REASONS[name] in r.json()["error_description"], (name, r.text)
        assert "access_token" not in r.text
    # Two DPoP headers.
    two = [("DPoP", key.proof("POST", url)), ("DPoP", key.proof("POST", url))]
    r = await server.client.post("/token", data=form, headers=two)
    assert_token_endpoint_refusal(r)
    # A replayed proof (same jti): the first use logs in, the second is refused.
    proof = key.proof("POST", url)
    assert (
        await server.client.post("/token", data=form, headers={"DPoP": proof})
    ).status_code == 200
    r = await server.client.post("/token", data=form, headers={"DPoP": proof})
    assert_token_endpoint_refusal(r)
    assert "already used" in r.json()["error_description"]


async def test_attacks_on_the_resource(server: Running) -> None:
    key = DPoPKey()
    token = (await dpop_login(server, key))["access_token"]
    url = BASE + "/protected"
    for name, make in {**BAD_PROOFS, **RESOURCE_ONLY}.items():
        r = await protected(server, token, make(key, "GET", url, token))
        assert r.status_code == 401, (name, r.text)
        assert r.json()["error"] == "invalid_dpop_proof", name
        assert REASONS[name] in r.json()["error_description"], (name, r.text)
        assert r.headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"'), name
    assert_resource_refusal(await protected(server, token, None))
    # Replay of a good proof.
    proof = key.proof("GET", url, access_token=token)
    assert (await protected(server, token, proof)).status_code == 200
    r = await protected(server, token, proof)
    assert_resource_refusal(r)
    # The bound token downgraded to Bearer (RFC 9449 §7.2), with or without its proof.
    for headers in ({}, {"DPoP": key.proof("GET", url, access_token=token)}):
        r = await server.client.get(
            "/protected", headers={"Authorization": f"Bearer {token}", **headers}
        )
        assert r.status_code == 401
        assert r.json()["error"] == "invalid_token"
        assert "DPoP-bound" in r.json()["error_description"]
    # A Bearer token sent with the DPoP scheme has no key to prove.
    plain = (await server.login())["access_token"]
    r = await protected(server, plain, key.proof("GET", url, access_token=plain))
    assert_resource_refusal(r, "invalid_token")
    # A bad token with the DPoP scheme gets a DPoP challenge too.
    assert_resource_refusal(
        await protected(server, "garbage", key.proof("GET", url)), "invalid_token"
    )


async def test_the_query_is_ignored_and_urls_are_normalised(server: Running) -> None:
    key = DPoPKey()
    token = (await dpop_login(server, key))["access_token"]
    r = await server.client.get(
        "/protected?x=1",
        headers={
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof("GET", "HTTP://TestServer:80/%70rotected", access_token=token),
        },
    )
    assert r.status_code == 200, r.text
    assert normalise_url("https://a.example:443/p%2fq?x#f") == "https://a.example/p%2Fq"
    assert normalise_url("https://a.example") == "https://a.example/"
    assert normalise_url("ftp://a.example/") is None


async def test_a_head_request_is_proved_with_its_own_method(server: Running) -> None:
    """HEAD is answered as GET (RFC 9110 §9.3.2), but the proof names what was sent."""
    key = DPoPKey()
    token = (await dpop_login(server, key))["access_token"]
    url = BASE + "/protected"

    async def head(method_proved: str) -> httpx.Response:
        proof = key.proof(method_proved, url, access_token=token)
        return await server.client.head(
            "/protected", headers={"Authorization": f"DPoP {token}", "DPoP": proof}
        )

    ok = await head("HEAD")
    assert ok.status_code == 200
    assert ok.content == b""
    refused = await head("GET")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')


async def test_a_client_registered_to_require_dpop(server: Running) -> None:
    await make_client(server.store, "spa", public=True, require_dpop=True)
    form = {"grant_type": "password", "client_id": "spa", **CREDENTIALS}
    r = await server.client.post("/token", data=form)
    assert_token_endpoint_refusal(r)
    key = DPoPKey()
    r = await server.client.post(
        "/token", data=form, headers={"DPoP": key.proof("POST", BASE + "/token")}
    )
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "DPoP"
    refresh = {
        "grant_type": "refresh_token",
        "client_id": "spa",
        "refresh_token": r.json()["refresh_token"],
    }
    assert_token_endpoint_refusal(await server.client.post("/token", data=refresh))
    r = await server.client.post(
        "/token", data=refresh, headers={"DPoP": key.proof("POST", BASE + "/token")}
    )
    assert r.status_code == 200, r.text


async def test_a_confidential_clients_refresh_token_stays_unbound(server: Running) -> None:
    """RFC 9449 §5: the client's authentication binds it; the access token is still bound."""
    _, secret = await make_client(server.store, "backend", grants=("password", "refresh_token"))
    assert secret is not None
    auth = ("backend", secret)
    key = DPoPKey()
    r = await server.client.post(
        "/token",
        data={"grant_type": "password", **CREDENTIALS},
        auth=auth,
        headers={"DPoP": key.proof("POST", BASE + "/token")},
    )
    assert r.status_code == 200, r.text
    assert jwt_parts(r.json()["access_token"])[1]["cnf"] == {"jkt": key.thumbprint}
    refresh = {"grant_type": "refresh_token", "refresh_token": r.json()["refresh_token"]}
    r = await server.client.post("/token", data=refresh, auth=auth)
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "bearer"
    # A proof at a refresh does not bind its family either, only its access token.
    refresh["refresh_token"] = r.json()["refresh_token"]
    r = await server.client.post(
        "/token",
        data=refresh,
        auth=auth,
        headers={"DPoP": DPoPKey().proof("POST", BASE + "/token")},
    )
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "DPoP"
    assert (await family_of(server, r.json()["refresh_token"]))["dpop_jkt"] is None
    refresh["refresh_token"] = r.json()["refresh_token"]
    r = await server.client.post("/token", data=refresh, auth=auth)
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "bearer"


async def test_introspection_and_metadata_report_the_binding(server: Running) -> None:
    _, secret = await make_client(server.store, "api")
    assert secret is not None
    key = DPoPKey()
    tokens = await dpop_login(server, key)
    for token in (tokens["access_token"], tokens["refresh_token"]):
        r = await server.client.post("/introspect", data={"token": token}, auth=("api", secret))
        assert r.json()["active"] is True
        assert r.json()["cnf"] == {"jkt": key.thumbprint}
    meta = (await server.client.get("/.well-known/oauth-authorization-server")).json()
    assert meta["dpop_signing_alg_values_supported"] == ["RS256", "ES256"]


async def test_rsa_proofs_are_accepted(server: Running) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = DPoPKey(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    tokens = await dpop_login(server, key)
    token = tokens["access_token"]
    r = await protected(server, token, key.proof("GET", BASE + "/protected", access_token=token))
    assert r.status_code == 200, r.text


async def test_server_nonces(start_app: StartApp) -> None:
    running = await start_app(dpop_nonce=True)
    await make_user(running.store, "alice")
    key = DPoPKey()
    r = await running.client.post(
        "/login", json=CREDENTIALS, headers={"DPoP": key.proof("POST", BASE + "/login")}
    )
    assert_token_endpoint_refusal(r, "use_dpop_nonce")
    nonce = r.headers["dpop-nonce"]
    for wrong in (nonce + "x", "é" * 24):
        r = await running.client.post(
            "/login",
            json=CREDENTIALS,
            headers={"DPoP": key.proof("POST", BASE + "/login", nonce=wrong)},
        )
        assert_token_endpoint_refusal(r, "use_dpop_nonce")
    r = await running.client.post(
        "/login",
        json=CREDENTIALS,
        headers={"DPoP": key.proof("POST", BASE + "/login", nonce=nonce)},
    )
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    url = BASE + "/protected"
    r = await protected(running, token, key.proof("GET", url, access_token=token))
    assert_resource_refusal(r, "use_dpop_nonce")
    assert r.headers["dpop-nonce"]
    r = await protected(running, token, key.proof("GET", url, access_token=token, nonce=nonce))
    assert r.status_code == 200, r.text


async def test_clients_add_require_dpop(server: Running) -> None:
    env = cli_env(server.settings.database_url, server.settings.keys_dir)
    args = ("clients", "add", "app", "--public", "--grant", "password", "--require-dpop")
    result = await asyncio.to_thread(invoke, env, *args)
    assert result.exit_code == 0, result.output
    listed = await asyncio.to_thread(invoke, env, "clients", "list", "--json")
    (app,) = (c for c in map(json.loads, listed.stdout.splitlines()) if c["client_id"] == "app")
    assert app["require_dpop"] is True
    form = {"grant_type": "password", "client_id": "app", **CREDENTIALS}
    assert_token_endpoint_refusal(await server.client.post("/token", data=form))
    proof = DPoPKey().proof("POST", BASE + "/token")
    r = await server.client.post("/token", data=form, headers={"DPoP": proof})
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "DPoP"
