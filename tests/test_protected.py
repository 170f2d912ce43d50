"""GET /protected: bearer tokens and RFC 6750 §3 challenges."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from jwcrypto import jwk, jwt

from authserver.keys import key_files
from tests.helpers.app import Running, StartApp, set_clock
from tests.helpers.factories import make_user

CHALLENGE = re.compile(r'Bearer error="invalid_token", error_description="[^"\\]+"')


async def get_protected(running: Running, token: str) -> httpx.Response:
    return await running.client.get("/protected", headers={"Authorization": f"Bearer {token}"})


def assert_invalid_token(r: httpx.Response, token: str = "") -> None:
    assert r.status_code == 401, r.text
    assert CHALLENGE.fullmatch(r.headers["www-authenticate"]), r.headers["www-authenticate"]
    assert r.json()["error"] == "invalid_token"
    assert set(r.json()) == {"error", "error_description"}
    if len(token) > 3:
        assert token not in r.text
        assert token not in r.headers["www-authenticate"]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def server_key(keys_dir: Path) -> jwk.JWK:
    return jwk.JWK.from_pem(key_files(keys_dir)[-1].read_bytes())


def forge(key: jwk.JWK, *, header: dict[str, Any] | None = None, **claims: Any) -> str:
    """Sign a token outside the server, with the given header and claim changes."""
    now = int(time.time())
    full_header = {"alg": "RS256", "typ": "at+jwt", "kid": key.thumbprint(), **(header or {})}
    full_claims = {
        "iss": "http://testserver",
        "sub": "alice",
        "aud": "authserver",
        "exp": now + 300,
        "iat": now,
        "jti": "forged-token-id",
        "scope": "read",
        "client_id": "authserver",
        **claims,
    }
    # None removes a member.
    token = jwt.JWT(
        header={k: v for k, v in full_header.items() if v is not None},
        claims={k: v for k, v in full_claims.items() if v is not None},
    )
    token.make_signed_token(key)
    serialized: str = token.serialize()
    return serialized


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature))
    )


async def test_a_valid_token_is_accepted(server: Running) -> None:
    tokens = await server.login()
    r = await get_protected(server, tokens["access_token"])
    assert r.status_code == 200
    assert r.json() == {"message": "Access granted for protected route.", "username": "alice"}
    # The scheme name is case-insensitive (RFC 7235 §2.1).
    r = await server.client.get(
        "/protected", headers={"Authorization": f"bearer {tokens['access_token']}"}
    )
    assert r.status_code == 200


async def test_two_authorization_headers_are_refused(server: Running) -> None:
    # Whichever one a proxy in front reads, this server must not read the other.
    token = (await server.login())["access_token"]
    for pair in ((f"Bearer {token}", "Bearer junk"), ("Bearer junk", f"Bearer {token}")):
        r = await server.client.get(
            "/protected", headers=[("Authorization", pair[0]), ("Authorization", pair[1])]
        )
        assert r.status_code == 400, pair
        assert r.json()["error"] == "invalid_request"
        assert r.headers["www-authenticate"].startswith('Bearer error="invalid_request"')
        assert token not in r.text


async def test_no_credentials_get_the_bare_challenge(server: Running) -> None:
    for headers in ({}, {"Authorization": "Basic Og=="}, {"Authorization": "Bearer"}):
        r = await server.client.get("/protected", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"
        assert set(r.json()) == {"error", "error_description"}


async def test_garbage_tokens(server: Running) -> None:
    real = (await server.login())["access_token"]
    header, payload, signature = real.split(".")
    garbage = [
        "garbage",
        "a.b.c",
        "...",
        "a.b",
        "a.b.c.d",
        real + "x",
        real + ".",
        f"{header}.{payload}",
        f"{header}.{payload}.",
        f"{header}.{payload}.{signature[:-4]}",
        f"{header}={payload}.{signature}",
        f"{header}.{payload}.{signature}==",
        f"{header}.{payload[:-2]}.{signature}",
        real.replace("-", "+").replace("_", "/"),
        "x" * 9000,
        b64(b"{" * 5000) + ".e30.",
        b64(json.dumps({"typ": "at+jwt", "alg": "RS256", "kid": {"a": [1] * 1000}}).encode())
        + ".e30.AA",
        b64(b"[1,2,3]") + ".e30.AA",
        b64(b"\xff\xfe") + ".e30.AA",
    ]
    for token in garbage:
        assert_invalid_token(await get_protected(server, token), token)
    # The real token was not harmed by any of that.
    assert (await get_protected(server, real)).status_code == 200


async def test_expired_token(start_app: StartApp) -> None:
    running = await start_app(access_token_ttl=1)
    await make_user(running.store, "alice")
    set_clock(running, time.time() - 5)  # minted five seconds ago, with one to live
    token = (await running.login())["access_token"]
    r = await get_protected(running, token)
    assert_invalid_token(r, token)
    assert "expired" in r.json()["error_description"]


async def test_wrong_issuer_or_audience(start_app: StartApp) -> None:
    ours = await start_app()
    await make_user(ours.store, "alice")
    # Same database and same keys: only the issuer or audience differs.
    same = await start_app()
    other_issuer = await start_app(issuer="http://elsewhere")
    other_audience = await start_app(audience="another-api")

    control = (await same.login())["access_token"]
    assert (await get_protected(ours, control)).status_code == 200

    token = (await other_issuer.login())["access_token"]
    r = await get_protected(ours, token)
    assert_invalid_token(r, token)
    assert "issuer" in r.json()["error_description"]

    token = (await other_audience.login())["access_token"]
    r = await get_protected(ours, token)
    assert_invalid_token(r, token)
    assert "audience" in r.json()["error_description"]
    assert (await get_protected(other_audience, token)).status_code == 200


async def test_refresh_token_as_bearer(server: Running) -> None:
    refresh_token = (await server.login())["refresh_token"]
    assert_invalid_token(await get_protected(server, refresh_token), refresh_token)


async def test_forged_tokens(server: Running) -> None:
    key = server_key(server.settings.keys_dir)
    # A token forged correctly with the server's own key passes: the harness is sound.
    assert (await get_protected(server, forge(key))).status_code == 200

    stranger = jwk.JWK.from_pyca(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    public_pem = key.export_to_pem()
    hmac_key = jwk.JWK(kty="oct", k=b64(public_pem))
    now = int(time.time())
    base_claims = {"iss": "http://testserver", "sub": "alice", "aud": "authserver"}
    good_claims = {**base_claims, "exp": now + 300, "iat": now, "jti": "j"}
    kid = key.thumbprint()
    forged = {
        "typ JWT": forge(key, header={"typ": "JWT"}),
        "no typ": forge(key, header={"typ": None}),
        "no kid": forge(key, header={"kid": None}),
        "unknown kid": forge(stranger),
        "our kid, another key": forge(stranger, header={"kid": kid}),
        "alg none": unsigned({"alg": "none", "typ": "at+jwt", "kid": kid}, good_claims),
        "HS256 keyed with our public key": forge(hmac_key, header={"alg": "HS256", "kid": kid}),
        "RS384 with our key": forge(key, header={"alg": "RS384"}),
        "expired": forge(key, exp=now - 10, iat=now - 100),
        "no exp": forge(key, exp=None),
        "no aud": forge(key, aud=None),
        "wrong aud": forge(key, aud="someone-else"),
        "aud list without us": forge(key, aud=["a", "b"]),
        "wrong iss": forge(key, iss="http://evil"),
        "no sub": forge(key, sub=None),
        "exp as a string": forge(key, exp=str(now + 300)),
        "not yet valid": forge(key, nbf=now + 600),
        "issued in the future": forge(key, iat=now + 3600, exp=now + 7200),
        "critical header": forge(key, header={"crit": ["b64"], "b64": True}),
    }
    for name, token in forged.items():
        r = await get_protected(server, token)
        assert r.status_code == 401, name
        assert_invalid_token(r, token)
