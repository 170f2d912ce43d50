"""What the DPoP check remembers between requests (the checked header of a client's
proofs, the URL of a request) must never let a proof through that the full check
would refuse: another key, a tampered `jwk`, another `typ`, another URL."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jws
from starlette.requests import Request

from authserver.client import DPoPKey
from authserver.dpop import MemoryReplayCache
from authserver.errors import InvalidDPoPProofError
from authserver.keys import public_key_of
from authserver.resource import request_url
from authserver.store.sql import SqlStore
from authserver.tokens import _proof_headers, verify_self_signed

TYP = "dpop+jwt"
URL = "https://api.example/items"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def claims() -> dict[str, Any]:
    return {"jti": b64(time.time_ns().to_bytes(8)), "htm": "GET", "htu": URL, "iat": time.time()}


def signed(header: dict[str, Any], signer: Any) -> str:
    """A proof with exactly this header (jose adds `alg`), signed by `signer`."""
    token: str = jws.sign(claims(), signer, headers=header, algorithm="ES256")
    return token


def header_segment(proof: str) -> bytes:
    return proof.encode("ascii").split(b".")[0]


def test_a_known_header_signed_by_another_key_is_refused() -> None:
    key = DPoPKey()
    good = key.proof("GET", URL)
    _, thumbprint = verify_self_signed(good, typ=TYP)
    assert thumbprint == key.thumbprint
    assert (header_segment(good), TYP) in _proof_headers  # the next one is a hit
    other = ec.generate_private_key(ec.SECP256R1())
    forged = signed({"typ": TYP, "jwk": key.jwk}, other)
    assert header_segment(forged) == header_segment(good)
    with pytest.raises(InvalidDPoPProofError, match="signature is invalid"):
        verify_self_signed(forged, typ=TYP)
    # The genuine key's next proof still passes, with its own thumbprint.
    assert verify_self_signed(key.proof("GET", URL), typ=TYP)[1] == key.thumbprint


def test_a_known_header_is_checked_again_for_another_typ() -> None:
    key = DPoPKey()
    proof = key.proof("GET", URL)
    verify_self_signed(proof, typ=TYP)
    with pytest.raises(InvalidDPoPProofError, match="typ must be JWT"):
        verify_self_signed(key.proof("GET", URL), typ="JWT")


def test_a_tampered_jwk_after_a_good_proof_is_refused() -> None:
    key, other = DPoPKey(), DPoPKey()
    verify_self_signed(key.proof("GET", URL), typ=TYP)
    # The other key's public members, signed by the first key: the signature is checked
    # against the key the header names, never against one remembered.
    swapped = signed({"typ": TYP, "jwk": other.jwk}, key._private)
    with pytest.raises(InvalidDPoPProofError, match="signature is invalid"):
        verify_self_signed(swapped, typ=TYP)
    # One member changed: not a key at all.
    bent = {**key.jwk, "x": other.jwk["x"]}
    with pytest.raises(InvalidDPoPProofError, match="not a usable public key"):
        verify_self_signed(signed({"typ": TYP, "jwk": bent}, key._private), typ=TYP)
    # A private member added to the cached key's jwk: another header, refused.
    private = key._private
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    leaked = {**key.jwk, "d": b64(private.private_numbers().private_value.to_bytes(32))}
    with pytest.raises(InvalidDPoPProofError, match="private key"):
        verify_self_signed(signed({"typ": TYP, "jwk": leaked}, key._private), typ=TYP)


def test_a_refused_header_is_not_remembered() -> None:
    key = DPoPKey()
    header = {"typ": "JWT", "jwk": key.jwk}
    proof = signed(header, key._private)
    for _ in range(2):
        with pytest.raises(InvalidDPoPProofError, match="typ must be"):
            verify_self_signed(proof, typ=TYP)
    assert (header_segment(proof), TYP) not in _proof_headers


def test_a_header_spelled_differently_is_checked_in_full() -> None:
    key = DPoPKey()
    verify_self_signed(key.proof("GET", URL), typ=TYP)
    # The same header with a private member, in another member order: a miss.
    header = {"jwk": {**key.jwk, "d": "AAAA"}, "typ": TYP, "alg": "ES256"}
    segment = b64(orjson.dumps(header)).encode()
    body = b64(orjson.dumps(claims())).encode()
    with pytest.raises(InvalidDPoPProofError, match="private key"):
        verify_self_signed(f"{segment.decode()}.{body.decode()}.c2ln", typ=TYP)


def request(scope: dict[str, Any]) -> Request:
    base: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "root_path": "",
        "path": "/protected",
        "query_string": b"",
        "headers": [],
    }
    return Request({**base, **scope})


@pytest.mark.parametrize(
    "scope",
    [
        {"headers": [(b"host", b"api.example")]},
        {"headers": [(b"host", b"api.example:8443")], "scheme": "https"},
        {"headers": [(b"host", b"API.example")], "query_string": b"x=1"},
        {"headers": []},
        {"headers": [], "server": ("::1", 80)},
        {"headers": [], "server": ["10.0.0.1", 443], "scheme": "https"},
        {"headers": [(b"host", b"evil example")]},
        {"headers": [(b"host", b"a.example")], "path": "/p?q#f\\g"},
        {"headers": [(b"host", b"a.example")], "root_path": "/api", "path": "/api/items"},
        {"headers": [(b"x", b"y"), (b"host", b"a.example"), (b"host", b"b.example")]},
    ],
)
def test_the_request_url_is_starlettes(scope: dict[str, Any]) -> None:
    # Twice: built once, then remembered; both the URL Starlette builds, without the query.
    for _ in range(2):
        expected = str(request(scope).url.replace(query=""))
        assert request_url(request(scope)) == expected.rstrip("?")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite: the jti's shortcut is SQLite's (PostgreSQL's is one statement on the pool)."""
    return f"sqlite:///{tmp_path / 'authserver.db'}"


async def test_a_jti_waits_for_another_process_holding_the_write_lock(
    store: SqlStore, database_url: str
) -> None:
    """Another process's write transaction makes the uncontended shortcut fail with
    'database is locked': the jti is then recorded by the retrying path once the lock
    is free, and a replay is still refused."""
    now = time.time()
    assert await store.use_jti("dpop:first", expires_at=now + 60, now=now)
    other = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.2, other.execute, "COMMIT")
        began = time.monotonic()
        assert await store.use_jti("dpop:second", expires_at=now + 60, now=now)
        assert time.monotonic() - began >= 0.15  # it did wait for the other writer
    finally:
        other.close()
    assert not await store.use_jti("dpop:second", expires_at=now + 60, now=now)
    assert not await store.use_jti("dpop:first", expires_at=now + 60, now=now)
    # An expired entry of the same key is taken over, as before.
    assert await store.use_jti("dpop:first", expires_at=now + 200, now=now + 100)


async def test_the_memory_replay_cache_forgets_only_what_expired() -> None:
    cache = MemoryReplayCache(max_entries=3)
    assert await cache.use_once("a", expires_at=10, now=0)
    assert not await cache.use_once("a", expires_at=10, now=5)  # a replay
    assert await cache.use_once("b", expires_at=20, now=5)
    assert await cache.use_once("c", expires_at=30, now=5)
    # Full of live ids: a new one is refused rather than one of them forgotten, which
    # would let its proof be replayed.
    assert not await cache.use_once("d", expires_at=30, now=6)
    assert not await cache.use_once("a", expires_at=10, now=6)
    # Once "a" expired it makes room, and may come again.
    assert await cache.use_once("d", expires_at=30, now=11)
    assert not await cache.use_once("b", expires_at=20, now=11)
    assert await cache.use_once("a", expires_at=40, now=21)  # "b" expired too
    # Out of order: "e" expires before the ids in front of it, and only a sweep finds
    # it. A full cache sweeps at most once a second.
    full = MemoryReplayCache(max_entries=2)
    assert await full.use_once("long", expires_at=100, now=0)
    assert await full.use_once("short", expires_at=5, now=0)
    assert await full.use_once("x", expires_at=100, now=6)  # swept: "short" went
    assert not await full.use_once("y", expires_at=100, now=6.5)  # full, swept 0.5 s ago
    assert not await full.use_once("x", expires_at=100, now=7)


def rsa_jwk(n: int, e: int) -> dict[str, str]:
    def member(value: int) -> str:
        return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))

    return {"kty": "RSA", "n": member(n), "e": member(e)}


@pytest.mark.parametrize(
    ("bits", "e", "refused"),
    [(2048, 65537, False), (8192, 65537, False), (8200, 65537, True), (2048, 2**40 + 1, True)],
)
def test_client_keys_of_unbounded_cost_are_refused(bits: int, e: int, refused: bool) -> None:
    """Anyone may put a key in a proof; verifying grows with its modulus and exponent.
    The modulus need not be a real key's for `public_key_of` to size it up."""
    n = (1 << (bits - 1)) | 1 | (int.from_bytes(b"authserver" * 40) % (1 << (bits - 2)))
    jwk = rsa_jwk(n, e)
    if refused:
        with pytest.raises(ValueError, match="refused"):
            public_key_of(jwk)
        with pytest.raises(InvalidDPoPProofError, match="not a usable public key"):
            verify_self_signed(unsigned_rs256({"typ": TYP, "jwk": jwk}), typ=TYP)
    else:
        assert public_key_of(jwk).key_size == bits


def unsigned_rs256(header: dict[str, Any]) -> str:
    head = b64(orjson.dumps({**header, "alg": "RS256"}))
    return f"{head}.{b64(orjson.dumps(claims()))}.c2ln"
