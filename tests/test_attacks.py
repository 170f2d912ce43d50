"""The attack battery: forged tokens built from real ones, and refresh-token abuse.

Every forged access token must get 401 `invalid_token` at /protected, with the
RFC 6750 §3 challenge: never a 200, never a 5xx, never an echo of the token.
The forgeries follow RFC 8725 §2 (the known JWT attacks) and the python-jose
pitfalls listed in issue 2. Tokens meant to fail only on a claim are signed
legitimately with the server's own private key, so the claim is all that is wrong.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID
from jwcrypto.jwk import JWK

from authserver.keys import generate_key, key_files, load_key
from tests.helpers.app import Running, StartApp
from tests.helpers.factories import DEFAULT_PASSWORD, make_user

# Forging and verifying tokens does not involve the store: one backend is enough.
# The refresh cases below run on every backend.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

# The order of the P-256 group: r = s = n is the other "psychic signature".
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_json(value: Any) -> str:
    return b64u(json.dumps(value, separators=(",", ":")).encode())


def unb64u(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    return json.loads(unb64u(header)), json.loads(unb64u(payload)), signature


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def sign(header: dict[str, Any], claims: dict[str, Any], key: PrivateKey) -> str:
    """A JWS made by hand (RFC 7515 §5.1), so tests need no JOSE library's opinions."""
    signing_input = f"{b64u_json(header)}.{b64u_json(claims)}".encode()
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input.decode()}.{b64u(signature)}"


def hmac_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    digests = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    signing_input = f"{b64u_json(header)}.{b64u_json(claims)}".encode()
    mac = hmac.new(secret, signing_input, digests[header["alg"]]).digest()
    return f"{signing_input.decode()}.{b64u(mac)}"


def server_key(running: Running) -> PrivateKey:
    """The private key the server signs with, read from its keys directory."""
    return load_key(key_files(running.settings.keys_dir)[-1]).private_key


async def bearer(running: Running, token: str) -> httpx.Response:
    return await running.client.get("/protected", headers={"Authorization": f"Bearer {token}"})


async def assert_all_rejected(running: Running, forged: dict[str, str]) -> None:
    """Each forged token: 401 invalid_token with the RFC 6750 challenge, nothing echoed."""
    problems = []
    for name, token in forged.items():
        r = await bearer(running, token)
        body = r.json()
        challenge = r.headers.get("www-authenticate", "")
        if (
            r.status_code != 401
            or body.get("error") != "invalid_token"
            or not challenge.startswith('Bearer error="invalid_token"')
            or set(body) != {"error", "error_description"}
        ):
            problems.append(f"{name}: {r.status_code} {r.text[:200]} {challenge[:100]}")
        elif token[-40:] in r.text or token[-40:] in challenge:
            problems.append(f"{name}: the response echoes the token")
    assert not problems, "\n".join(problems)


@pytest.fixture
async def token(server: Running) -> str:
    """A real access token of alice, which every forgery starts from."""
    tokens = await server.login()
    assert (await bearer(server, tokens["access_token"])).status_code == 200
    value: str = tokens["access_token"]
    return value


# -- alg, signature and structure ------------------------------------------------


@sqlite_only
async def test_alg_none_in_every_casing(server: Running, token: str) -> None:
    header, claims, signature = parts(token)
    forged = {}
    for alg in ("none", "None", "NONE", "nOnE", "NoNe", "none "):
        h = b64u_json({**header, "alg": alg})
        p = b64u_json(claims)
        forged[f"alg={alg!r}, empty signature"] = f"{h}.{p}."
        forged[f"alg={alg!r}, original signature"] = f"{h}.{p}.{signature}"
    forged["alg missing"] = f"{b64u_json({k: v for k, v in header.items() if k != 'alg'})}." + (
        f"{b64u_json(claims)}.{signature}"
    )
    for value in (None, 256, ["RS256"], {"alg": "RS256"}, ""):
        forged[f"alg={value!r}"] = f"{b64u_json({**header, 'alg': value})}.{token.split('.', 1)[1]}"
    await assert_all_rejected(server, forged)


def _public_key_secrets(jwk: dict[str, Any]) -> dict[str, bytes]:
    """Every spelling of a published public key a confused verifier might use as an HMAC key."""
    public = JWK(**jwk).get_op_key("verify")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = public.public_bytes(serialization.Encoding.PEM, spki)
    secrets = {
        "PEM": pem,
        "PEM without final newline": pem.rstrip(b"\n"),
        "DER": public.public_bytes(serialization.Encoding.DER, spki),
        "JWK JSON": json.dumps(jwk).encode(),
        "JWK JSON compact": json.dumps(jwk, separators=(",", ":")).encode(),
        "JWK JSON sorted": json.dumps(jwk, sort_keys=True).encode(),
    }
    if isinstance(public, rsa.RSAPublicKey):
        pkcs1 = serialization.PublicFormat.PKCS1
        secrets["PKCS1 PEM"] = public.public_bytes(serialization.Encoding.PEM, pkcs1)
        secrets["PKCS1 DER"] = public.public_bytes(serialization.Encoding.DER, pkcs1)
    else:
        point = serialization.PublicFormat.UncompressedPoint
        secrets["X9.62 point"] = public.public_bytes(serialization.Encoding.X962, point)
    return secrets


async def _hs_forgeries(running: Running, token: str) -> dict[str, str]:
    header, claims, _ = parts(token)
    jwks = (await running.client.get("/.well-known/jwks.json")).json()["keys"]
    assert jwks
    forged = {}
    for jwk in jwks:
        for encoding, secret in _public_key_secrets(jwk).items():
            for alg in ("HS256", "HS384", "HS512"):
                for with_kid in (True, False):
                    h = {**header, "alg": alg, "kid": jwk["kid"]}
                    if not with_kid:
                        del h["kid"]
                    name = f"{alg} with {jwk['kty']} key as {encoding}, kid={with_kid}"
                    forged[name] = hmac_token(h, {**claims, "sub": "mallory"}, secret)
    return forged


@sqlite_only
async def test_hmac_signed_with_published_public_key(server: Running, token: str) -> None:
    forged = await _hs_forgeries(server, token)
    assert len(forged) >= 3 * 2 * 8
    await assert_all_rejected(server, forged)


@sqlite_only
async def test_null_stripped_and_bogus_signatures(server: Running, token: str) -> None:
    h, p, s = token.split(".")
    raw = unb64u(s)
    forged = {
        "empty signature": f"{h}.{p}.",
        "signature stripped": f"{h}.{p}",
        "zero signature": f"{h}.{p}.{b64u(bytes(len(raw)))}",
        "one-byte signature": f"{h}.{p}.AA",
        "flipped bit": f"{h}.{p}.{b64u(bytes([raw[0] ^ 1]) + raw[1:])}",
        "truncated signature": f"{h}.{p}.{b64u(raw[:-1])}",
        "extended signature": f"{h}.{p}.{b64u(raw + bytes(1))}",
        "four segments": f"{h}.{p}.{s}.{s}",
        "JWE-shaped": f"{h}.{p}.{s}.{s}.{s}",
        "only dots": "..",
        "empty header": f".{p}.{s}",
        "empty payload": f"{h}..{s}",
    }
    await assert_all_rejected(server, forged)


@sqlite_only
async def test_payload_or_header_changed_under_original_signature(
    server: Running, token: str
) -> None:
    header, claims, s = parts(token)
    h, p, _ = token.split(".")
    forged = {
        "sub changed": f"{h}.{b64u_json({**claims, 'sub': 'admin'})}.{s}",
        "scope widened": f"{h}.{b64u_json({**claims, 'scope': 'read write admin'})}.{s}",
        "exp extended": f"{h}.{b64u_json({**claims, 'exp': claims['exp'] + 10**6})}.{s}",
        "payload re-encoded": f"{h}.{b64u(json.dumps(claims, indent=1).encode())}.{s}",
        "header field added": f"{b64u_json({**header, 'x': 1})}.{p}.{s}",
        "header re-encoded": f"{b64u(json.dumps(header, indent=1).encode())}.{p}.{s}",
        "header and payload swapped": f"{p}.{h}.{s}",
    }
    await assert_all_rejected(server, forged)


@sqlite_only
async def test_kid_attacks(server: Running, token: str) -> None:
    header, claims, s = parts(token)
    p = token.split(".")[1]
    kids: dict[str, Any] = {
        "unknown": "no-such-key",
        "path traversal": "../../../../../../etc/passwd",
        "path traversal to a key file": f"../keys/{key_files(server.settings.keys_dir)[-1].name}",
        "null device": "/dev/null",
        "SQL": "' OR '1'='1' --",
        "SQL union": "x' UNION SELECT password_hash FROM users --",
        "int": 1,
        "float": 1.5,
        "bool": True,
        "list": [header["kid"]],
        "object": {"kid": header["kid"]},
        "null": None,
        "empty": "",
        "huge (5000)": "A" * 5000,
        "huge (100000)": "A" * 100_000,
        "NUL byte": header["kid"] + "\x00",
        "real kid with suffix": header["kid"] + "x",
        "real kid upper-cased": header["kid"].upper(),
    }
    forged = {
        f"kid {name}": f"{b64u_json({**header, 'kid': kid})}.{p}.{s}" for name, kid in kids.items()
    }
    forged["kid missing"] = f"{b64u_json({k: v for k, v in header.items() if k != 'kid'})}.{p}.{s}"
    # Re-signed by the server's own key too: only the kid is wrong.
    key = server_key(server)
    for name, kid in kids.items():
        forged[f"kid {name}, validly signed"] = sign({**header, "kid": kid}, claims, key)
    await assert_all_rejected(server, forged)


class _Listener:
    """A local HTTP server that records every request: the server must never call it."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        self.requests: list[str] = []
        listener = self
        body = json.dumps(jwks).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                listener.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Listener:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _self_signed(key: rsa.RSAPrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authserver")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


@sqlite_only
async def test_key_location_headers_are_never_followed(server: Running, token: str) -> None:
    header, claims, _ = parts(token)
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacker_jwk = JWK.from_pyca(attacker.public_key())
    attacker_kid = attacker_jwk.thumbprint()
    public = {**attacker_jwk.export_public(as_dict=True), "kid": attacker_kid, "alg": "RS256"}
    with _Listener({"keys": [public]}) as listener:
        embedded: dict[str, Any] = {
            "jku": f"{listener.url}/jwks.json",
            "x5u": f"{listener.url}/cert.pem",
            "jwk": public,
            "x5c": [_self_signed(attacker)],
        }
        forged = {}
        for name, value in embedded.items():
            for kid in (attacker_kid, header["kid"]):
                which = "attacker kid" if kid == attacker_kid else "server kid"
                h = {**header, "kid": kid, name: value}
                forged[f"{name} with {which}"] = sign(h, {**claims, "sub": "mallory"}, attacker)
        everything = {**header, "kid": attacker_kid, **embedded}
        forged["all four"] = sign(everything, claims, attacker)
        forged["all four, no kid"] = sign(
            {k: v for k, v in everything.items() if k != "kid"}, claims, attacker
        )
        await assert_all_rejected(server, forged)
        # Give a background fetch, if any were started, the time to arrive.
        await asyncio.sleep(0.2)
        assert listener.requests == []


# -- claims, signed legitimately -------------------------------------------------


def _claim_forgeries(header: dict[str, Any], claims: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    now = int(time.time())
    without = {name: {k: v for k, v in claims.items() if k != name} for name in claims}
    return {
        "expired": (header, {**claims, "iat": now - 100, "exp": now - 10}),
        "expires now": (header, {**claims, "exp": now}),
        "nbf in the future": (header, {**claims, "nbf": now + 3600}),
        "iat far in the future": (header, {**claims, "iat": now + 3600, "exp": now + 7200}),
        "wrong iss": (header, {**claims, "iss": "http://evil.example"}),
        "iss with trailing slash": (header, {**claims, "iss": claims["iss"] + "/"}),
        "wrong aud": (header, {**claims, "aud": "someone-else"}),
        "aud list without ours": (header, {**claims, "aud": ["a", "b"]}),
        "aud null": (header, {**claims, "aud": None}),
        "exp as string": (header, {**claims, "exp": str(now + 600)}),
        "exp as bool": (header, {**claims, "exp": True}),
        "sub empty": (header, {**claims, "sub": ""}),
        "sub as int": (header, {**claims, "sub": 1}),
        "scope as list": (header, {**claims, "scope": ["read"]}),
        "missing exp": (header, without["exp"]),
        "missing aud": (header, without["aud"]),
        "missing iss": (header, without["iss"]),
        "missing sub": (header, without["sub"]),
        "missing iat": (header, without["iat"]),
        "missing jti": (header, without["jti"]),
        "typ JWT": ({**header, "typ": "JWT"}, claims),
        "typ missing": ({k: v for k, v in header.items() if k != "typ"}, claims),
        "typ refresh": ({**header, "typ": "rt+jwt"}, claims),
        "typ as list": ({**header, "typ": ["at+jwt"]}, claims),
        "crit header": ({**header, "crit": ["exp"]}, claims),
        "payload is a list": (header, [claims]),
    }


@sqlite_only
async def test_claims_signed_by_the_server_key(server: Running, token: str) -> None:
    header, claims, _ = parts(token)
    key = server_key(server)
    # The control: the same helper with untouched claims makes a token that works.
    assert (await bearer(server, sign(header, claims, key))).status_code == 200
    forged = {name: sign(h, c, key) for name, (h, c) in _claim_forgeries(header, claims).items()}
    await assert_all_rejected(server, forged)


# -- ECDSA ------------------------------------------------------------------------


@pytest.fixture
def mixed_keys_dir(tmp_path: Path) -> Path:
    """An RSA key (older, verifies) and an EC P-256 key (newest, signs)."""
    path = tmp_path / "mixed-keys"
    generate_key(path, "RS256")
    generate_key(path, "ES256")
    assert key_files(path)[-1].name.endswith("es256.pem")
    return path


@sqlite_only
async def test_ecdsa_psychic_signatures_and_alg_confusion(
    start_app: StartApp, mixed_keys_dir: Path
) -> None:
    running = await start_app(keys_dir=mixed_keys_dir)
    await make_user(running.store, "alice")
    token = (await running.login())["access_token"]
    assert (await bearer(running, token)).status_code == 200
    header, claims, _ = parts(token)
    assert header["alg"] == "ES256"
    h = b64u_json(header)
    p = b64u_json({**claims, "sub": "mallory"})
    n = P256_ORDER.to_bytes(32, "big")
    zero = bytes(32)
    rsa_key = load_key(key_files(mixed_keys_dir)[0]).private_key
    ec_key = load_key(key_files(mixed_keys_dir)[-1]).private_key
    rsa_kid = load_key(key_files(mixed_keys_dir)[0]).kid
    forged = {
        "r=s=0": f"{h}.{p}.{b64u(zero + zero)}",
        "r=s=n": f"{h}.{p}.{b64u(n + n)}",
        "r=0, s=1": f"{h}.{p}.{b64u(zero + (1).to_bytes(32, 'big'))}",
        "DER r=s=0": f"{h}.{p}.{b64u(encode_dss_signature(0, 0))}",
        "empty": f"{h}.{p}.",
        "ES256 header, signed by the RSA key": sign(header, claims, rsa_key),
        "RS256 header with the EC kid, RSA signature": sign(
            {**header, "alg": "RS256"}, claims, rsa_key
        ),
        "ES256 header with the RSA kid, EC signature": sign(
            {**header, "kid": rsa_kid}, claims, ec_key
        ),
        "ES384 header": sign({**header, "alg": "ES384"}, claims, ec_key),
        "PS256 header with the RSA kid": sign(
            {**header, "alg": "PS256", "kid": rsa_kid}, claims, rsa_key
        ),
    }
    forged.update(await _hs_forgeries(running, token))
    await assert_all_rejected(running, forged)


# -- encoding ---------------------------------------------------------------------


@sqlite_only
async def test_non_canonical_base64_is_rejected(server: Running, token: str) -> None:
    h, p, s = token.split(".")
    # The real token is verified (and cached) first: another spelling must not hit the cache.
    assert (await bearer(server, token)).status_code == 200
    raw_s = unb64u(s)
    std_s = base64.b64encode(raw_s).decode()
    forged = {
        "padded header": f"{h}{'=' * (-len(h) % 4) or '=='}.{p}.{s}",
        "padded signature": f"{h}.{p}.{base64.urlsafe_b64encode(raw_s).decode()}",
        "standard alphabet signature": f"{h}.{p}.{std_s.rstrip('=')}",
        "standard alphabet padded": f"{h}.{p}.{std_s}",
        "whitespace in payload": f"{h}.{p[:10]} {p[10:]}.{s}",
        "newline in signature": f"{h}.{p}.{s[:10]}\n{s[10:]}",
        "trailing dot": f"{token}.",
        "leading dot": f".{token}",
        "impossible length": f"{h}.{p}.{s}A",
    }
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    same_bytes = [s[:-1] + c for c in alphabet if c != s[-1] and unb64u(s[:-1] + c) == raw_s]
    assert same_bytes  # a 256-byte signature leaves 4 unused bits in its last character
    forged["unused bits set in the last character"] = f"{h}.{p}.{same_bytes[0]}"
    if "-" in s or "_" in s:
        forged["'+/' for '-_' in signature"] = f"{h}.{p}.{s.replace('-', '+').replace('_', '/')}"
    forged = {k: v for k, v in forged.items() if v != token}
    problems = []
    for name, value in forged.items():
        try:
            r = await bearer(server, value)
        except httpx.LocalProtocolError:
            continue  # the client itself refuses to send it (a newline in a header)
        if r.status_code != 401 or r.json()["error"] != "invalid_token":
            problems.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not problems, "\n".join(problems)


@sqlite_only
async def test_malformed_json_headers(server: Running, token: str) -> None:
    _, p, s = token.split(".")

    def with_header(raw: bytes) -> str:
        return f"{b64u(raw)}.{p}.{s}"

    header, _, _ = parts(token)
    forged = {
        "nested list 2000 deep": with_header(b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}"),
        "nested objects 1500 deep": with_header(b'{"a":' * 1500 + b"1" + b"}" * 1500),
        "unterminated nesting": with_header(b"[" * 4000),
        "huge header (7000 bytes)": with_header(json.dumps({**header, "pad": "x" * 7000}).encode()),
        "huge header (200 KB)": with_header(json.dumps({**header, "pad": "x" * 200_000}).encode()),
        "non-UTF-8 header": with_header(b'{"alg":"RS256","kid":"\xff\xfe","typ":"at+jwt"}'),
        "UTF-16 header": with_header(json.dumps(header).encode("utf-16")),
        "BOM header": with_header(b"\xef\xbb\xbf" + json.dumps(header).encode()),
        "header is a list": with_header(b"[1,2,3]"),
        "header is a string": with_header(b'"at+jwt"'),
        "header is null": with_header(b"null"),
        "duplicate alg": with_header(
            b'{"alg":"none","kid":"%s","typ":"at+jwt","alg":"RS256"}' % header["kid"].encode()
        ),
        "NaN in header": with_header(b'{"alg":"RS256","x":NaN}'),
        "lone surrogate": with_header(b'{"alg":"RS256","kid":"\\ud800","typ":"at+jwt"}'),
        "payload not UTF-8": f"{token.split('.')[0]}.{b64u(bytes([255]) * 40)}.{s}",
    }
    await assert_all_rejected(server, forged)
    # Header values that are not latin-1 on the wire: the raw bytes reach the app.
    raw_headers = [(b"authorization", b"Bearer " + token.encode()[:20] + b"\xff\xfe" + b"x" * 20)]
    r = await server.client.get("/protected", headers=raw_headers)
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token"


# -- token confusion and transport ---------------------------------------------------


async def test_refresh_token_is_not_an_access_token(server: Running) -> None:
    tokens = await server.login()
    await assert_all_rejected(server, {"refresh token as bearer": tokens["refresh_token"]})


async def test_access_token_is_not_a_refresh_token(server: Running) -> None:
    tokens = await server.login()
    r = await server.client.post("/refresh", json={"refresh_token": tokens["access_token"]})
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_grant"
    assert tokens["access_token"] not in r.text
    r = await server.client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": tokens["access_token"]}
    )
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"
    # The refresh token itself still works: nothing above touched its family.
    r = await server.client.post("/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 200


@sqlite_only
async def test_token_in_query_string_or_body_is_ignored(server: Running, token: str) -> None:
    # RFC 6750 §2.3 / RFC 9700 §4.3.2: no tokens in URLs; we accept the header only.
    r = await server.client.get("/protected", params={"access_token": token})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert token not in r.text
    r = await server.client.request(
        "GET",
        "/protected",
        content=f"access_token={token}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 401


@sqlite_only
async def test_other_authorization_schemes(server: Running, token: str) -> None:
    for value in (
        f"Basic {token}",
        f"Token {token}",
        f"Bearer{token}",
        "Bearer ",
        "Bearer",
        f"Bearer {token} {token}",
        f"Bearer {token},{token}",
    ):
        r = await server.client.get("/protected", headers={"Authorization": value})
        assert r.status_code == 401, value
        assert r.headers["www-authenticate"].startswith("Bearer"), value
        assert token not in r.text


@sqlite_only
async def test_oversized_authorization_header(server: Running) -> None:
    r = await bearer(server, "A" * 100_000)
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token"
    assert len(r.content) < 1000


# -- refresh-token abuse (RFC 9700 §4.14.2) --------------------------------------------


async def _refresh(running: Running, refresh_token: str) -> httpx.Response:
    return await running.client.post("/refresh", json={"refresh_token": refresh_token})


async def test_reuse_deep_in_a_chain_revokes_the_family(server: Running) -> None:
    chain = [(await server.login())["refresh_token"]]
    for _ in range(5):
        r = await _refresh(server, chain[-1])
        assert r.status_code == 200
        chain.append(r.json()["refresh_token"])
    other = (await server.login())["refresh_token"]  # another session of the same user
    r = await _refresh(server, chain[1])
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_grant"
    for spent_or_newest in chain:
        r = await _refresh(server, spent_or_newest)
        assert r.status_code == 401
        assert spent_or_newest not in r.text
    # Only that family: the other session lives on.
    assert (await _refresh(server, other)).status_code == 200
    events = await server.store.list_audit_events(event="refresh_reuse_detected")
    assert len(events) == 1


async def test_reuse_after_revoke(server: Running) -> None:
    first = (await server.login())["refresh_token"]
    second = (await _refresh(server, first)).json()["refresh_token"]
    r = await server.client.post("/revoke", data={"token": second})
    assert r.status_code == 200
    for value in (second, first):
        r = await _refresh(server, value)
        assert r.status_code == 401
        assert r.json()["error"] == "invalid_grant"
    # Revoking again, or revoking garbage, is still a quiet 200 (RFC 7009 §2.2).
    assert (await server.client.post("/revoke", data={"token": second})).status_code == 200
    assert (await server.client.post("/revoke", data={"token": "nonsense"})).status_code == 200
    r = await server.client.post("/logout", json={"refresh_token": first})
    assert r.status_code == 204


async def test_concurrent_refresh_losers_revoke_the_family(server: Running) -> None:
    start = (await server.login())["refresh_token"]
    responses = await asyncio.gather(*(_refresh(server, start) for _ in range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [401] * 11, statuses
    assert all(r.json()["error"] == "invalid_grant" for r in responses if r.status_code == 401)
    winner = next(r for r in responses if r.status_code == 200).json()
    # A loser presented a spent token: the family is gone, the winner's new token too.
    r = await _refresh(server, winner["refresh_token"])
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_grant"


# -- response headers and echo ---------------------------------------------------------


PASSWORD_MARK = "pw-Zq8xK3vN9-secret"


@sqlite_only
async def test_every_response_has_nosniff(server: Running, token: str) -> None:
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/health", {}),
        ("GET", "/protected", {"headers": {"Authorization": f"Bearer {token}"}}),
        ("GET", "/protected", {}),
        ("GET", "/protected", {"headers": {"Authorization": "Bearer garbage"}}),
        ("GET", "/no-such-page", {}),
        ("DELETE", "/login", {}),
        ("GET", "/docs", {}),
        ("GET", "/docs/oauth2-redirect", {}),
        ("GET", "/docs/assets/swagger-ui-bundle.js", {}),
        ("GET", "/docs/assets/swagger-ui.css", {}),
        ("GET", "/docs/assets/no-such-asset.js", {}),
        ("GET", "/openapi.json", {}),
        ("GET", "/.well-known/jwks.json", {}),
        ("GET", "/.well-known/oauth-authorization-server", {}),
        ("POST", "/login", {"content": b"{not json"}),
        ("POST", "/login", {"json": {"username": "alice", "password": "wrong"}}),
        ("POST", "/token", {"data": {"grant_type": "nope"}}),
        ("POST", "/revoke", {"data": {"token": "x"}}),
        ("POST", "/logout", {"json": {"refresh_token": "x"}}),
        ("POST", "/refresh", {"json": {"refresh_token": "x"}}),
    ]
    for method, url, kwargs in requests:
        r = await server.client.request(method, url, **kwargs)
        assert r.status_code < 500, (method, url, r.status_code)
        assert r.headers.get("x-content-type-options") == "nosniff", (method, url)
        assert len(r.headers.get_list("x-content-type-options")) == 1, (method, url)


async def test_token_responses_are_not_cached(server: Running) -> None:
    login = await server.client.post(
        "/login", json={"username": "alice", "password": DEFAULT_PASSWORD}
    )
    refresh = await _refresh(server, login.json()["refresh_token"])
    token = await server.client.post(
        "/token",
        data={"grant_type": "password", "username": "alice", "password": DEFAULT_PASSWORD},
    )
    bad_login = await server.client.post("/login", json={"username": "alice", "password": "x"})
    bad_token = await server.client.post("/token", data={"grant_type": "password"})
    for r in (login, refresh, token, bad_login, bad_token):
        assert r.headers["cache-control"] == "no-store", r.request.url
        assert r.headers["pragma"] == "no-cache", r.request.url


async def test_error_bodies_never_echo_passwords_or_tokens(server: Running, token: str) -> None:
    refresh = (await server.login())["refresh_token"]
    long_password = PASSWORD_MARK * 10  # over 72 bytes
    sent = [PASSWORD_MARK, long_password, refresh, token]
    attempts: list[httpx.Response] = [
        await server.client.post("/login", json={"username": "alice", "password": PASSWORD_MARK}),
        await server.client.post("/login", json={"username": "alice", "password": long_password}),
        await server.client.post("/login", json={"username": PASSWORD_MARK, "password": 1}),
        await server.client.post("/login", json={"username": "alice", "password": [PASSWORD_MARK]}),
        await server.client.post("/login", json={"username": ["alice"], "password": PASSWORD_MARK}),
        await server.client.post("/login", json={"password": PASSWORD_MARK}),
        await server.client.post("/login", content=f'{{"password": "{PASSWORD_MARK}"'),
        await server.client.post("/login", data={"username": "a", "password": PASSWORD_MARK}),
        await server.client.post(
            "/login",
            content=f"username=a&password={PASSWORD_MARK}&password=x",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        await server.client.post(
            "/token",
            data={"grant_type": "password", "username": "alice", "password": PASSWORD_MARK},
        ),
        await server.client.post(
            "/token", data={"grant_type": "password", "password": PASSWORD_MARK}
        ),
        await server.client.post(
            "/token", data={"grant_type": PASSWORD_MARK, "password": PASSWORD_MARK}
        ),
        await server.client.post(
            "/token",
            data={"grant_type": "refresh_token", "refresh_token": refresh, "scope": "admin"},
        ),
        await server.client.post(
            "/token", json={"grant_type": "password", "password": PASSWORD_MARK}
        ),
        await server.client.post("/refresh", json={"refresh_token": [refresh]}),
        await server.client.post("/refresh", json={"refresh_token": refresh + "x"}),
        await server.client.post("/refresh", json={"refresh_token": token}),
        await server.client.post("/refresh", json={"refresh_token": refresh, "scope": 5}),
        await server.client.post("/logout", json={"refresh_token": {"t": refresh}}),
        await server.client.post("/revoke", json={"token": refresh}),
        await server.client.get("/protected", headers={"Authorization": f"Bearer {token}x"}),
        await server.client.get("/protected", headers={"Authorization": f"Bearer {refresh}"}),
    ]
    for r in attempts:
        assert 400 <= r.status_code < 500, (r.request.url, r.status_code, r.text)
        assert set(r.json()) >= {"error", "error_description"}, r.text
        shown = r.text + " ".join(f"{k}: {v}" for k, v in r.headers.items())
        for secret in sent:
            assert secret not in shown, (r.request.url, r.text)
