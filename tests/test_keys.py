"""Signing keys: what is accepted, what is refused and how, kids, JWKS, and live reloading."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authserver.keys import KeyFileError, KeyRing, generate_key, key_files, load_key
from tests.helpers.app import StartApp
from tests.helpers.cli import invoke
from tests.helpers.factories import DEFAULT_PASSWORD, make_user
from tests.helpers.tokens import jwks, jwt_header, wait_for_kids

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Keys live on disk, not in the database: SQLite is enough here."""
    return f"sqlite:///{tmp_path / 'authserver.db'}"


def write_key(
    path: Path, key: PrivateKey, *, mode: int = 0o600, password: bytes | None = None
) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pem)
    path.chmod(mode)
    return path


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(value: int, length: int | None = None) -> str:
    return b64url(value.to_bytes(length or (value.bit_length() + 7) // 8, "big"))


def rfc7638_thumbprint(members: dict[str, str]) -> str:
    """RFC 7638 §3: SHA-256 over the required members, sorted, no whitespace."""
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}[members["kty"]]
    canonical = json.dumps({k: members[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def public_members(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> dict[str, str]:
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        return {"kty": "RSA", "n": uint(numbers.n), "e": uint(numbers.e)}
    point = key.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "x": uint(point.x, 32), "y": uint(point.y, 32)}


def test_independent_thumbprint_matches_rfc7638_example() -> None:
    # RFC 7638 §3.1.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI"
        "4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    members = {"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert rfc7638_thumbprint(members) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


# -- loading -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "alg"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072), "RS256"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ],
)
def test_accepted_keys_load_with_rfc7638_kid(
    tmp_path: Path, make: Callable[[], rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey], alg: str
) -> None:
    private = make()
    loaded = load_key(write_key(tmp_path / "k.pem", private))
    assert loaded.alg == alg
    assert loaded.kid == rfc7638_thumbprint(public_members(private))
    assert loaded.public_jwk["kid"] == loaded.kid
    assert loaded.public_jwk["alg"] == alg
    assert loaded.public_jwk["use"] == "sig"
    assert not PRIVATE_MEMBERS & set(loaded.public_jwk)
    for name, value in public_members(private).items():
        assert loaded.public_jwk[name] == value


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), ("1024", "2048")),
        (lambda: ec.generate_private_key(ec.SECP384R1()), ("P-256",)),
        (lambda: ec.generate_private_key(ec.SECP256K1()), ("P-256",)),
        (ed25519.Ed25519PrivateKey.generate, ("unsupported",)),
    ],
)
def test_weak_or_unsupported_keys_are_refused_naming_the_file(
    tmp_path: Path, make: Callable[[], PrivateKey], words: tuple[str, ...]
) -> None:
    path = write_key(tmp_path / "weak.pem", make())
    with pytest.raises(KeyFileError) as info:
        load_key(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for word in words:
        assert word in message


def _unreadable(path: Path) -> None:
    if os.geteuid() != 0:
        path.write_text("secret\n")
        path.chmod(0)
    else:
        # root reads any mode: point the key file at something whose read fails (EIO).
        path.symlink_to("/proc/self/mem")


@pytest.mark.parametrize(
    "problem", ["garbage", "empty", "public key", "encrypted", "unreadable", "truncated"]
)
def test_unusable_pem_is_key_file_error_naming_the_file(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "bad.pem"
    private = ec.generate_private_key(ec.SECP256R1())
    if problem == "garbage":
        path.write_bytes(os.urandom(300))
    elif problem == "empty":
        path.write_bytes(b"")
    elif problem == "public key":
        path.write_bytes(
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    elif problem == "encrypted":
        write_key(path, private, password=b"hunter2")
    elif problem == "truncated":
        write_key(path, private)
        path.write_bytes(path.read_bytes()[:100])
    else:
        _unreadable(path)
    if not path.is_symlink():
        path.chmod(0o600)
    with pytest.raises(KeyFileError) as info:
        load_key(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    assert "PRIVATE KEY-----" not in message


# -- file permissions (issue 4, point 5) -------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o700])
def test_key_file_readable_by_others_is_refused_with_chmod_hint(tmp_path: Path, mode: int) -> None:
    path = write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1()), mode=mode)
    if mode == 0o700:
        # Owner-only, even with x: as ssh, only group/other bits matter.
        assert load_key(path).alg == "ES256"
        return
    with pytest.raises(KeyFileError) as info:
        load_key(path)
    message = str(info.value)
    assert str(path) in message
    assert f"chmod 600 {path}" in message


def test_insecure_key_file_allowed_with_override_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1()), mode=0o644)
    with caplog.at_level(logging.WARNING):
        key = load_key(path, allow_insecure=True)
    assert key.alg == "ES256"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(path) in r.getMessage() for r in warnings), caplog.text


async def test_server_refuses_to_start_on_insecure_key_file(
    keys_dir: Path, start_app: StartApp
) -> None:
    (path,) = key_files(keys_dir)
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        await start_app()


async def test_server_starts_on_insecure_key_file_when_allowed(
    keys_dir: Path, start_app: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    (path,) = key_files(keys_dir)
    path.chmod(0o640)
    with caplog.at_level(logging.WARNING):
        running = await start_app(allow_insecure_key_files=True)
    assert (await running.client.get("/health")).status_code == 200
    assert any(r.levelno >= logging.WARNING and str(path) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("args", [("keys", "list"), ("serve", "--port", "1")])
def test_cli_refuses_insecure_key_file_unless_overridden(
    tmp_path: Path, keys_dir: Path, args: tuple[str, ...]
) -> None:
    (path,) = key_files(keys_dir)
    path.chmod(0o644)
    env = {
        "AUTHSERVER_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "AUTHSERVER_KEYS_DIR": str(keys_dir),
    }
    result = invoke(env, *args)
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1, result.stderr
    assert str(path) in errors[0] and f"chmod 600 {path}" in errors[0]
    assert "Traceback" not in result.output

    if args[0] == "keys":
        env["AUTHSERVER_ALLOW_INSECURE_KEY_FILES"] = "1"
        result = invoke(env, *args)
        assert result.exit_code == 0, result.output
        assert load_key(path, allow_insecure=True).kid in result.stdout


# -- generating ----------------------------------------------------------------------------


def test_generated_keys_are_0600_and_the_newest_signs(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    generated = [generate_key(keys_dir, alg) for alg in ("RS256", "ES256", "RS256")]
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    for key in generated:
        assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
        assert key.kid == rfc7638_thumbprint(public_members(key.private_key))
    assert key_files(keys_dir) == [k.path for k in generated]
    assert [k.path.name for k in generated] == sorted(k.path.name for k in generated)
    ring = KeyRing(keys_dir)
    ring.load()
    assert ring.signing_key.kid == generated[-1].kid
    assert [k.kid for k in ring.keys] == [k.kid for k in generated]
    assert not [p for p in keys_dir.iterdir() if p.name.endswith(".tmp")]


def test_generated_key_sorts_last_even_after_a_future_named_file(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    future = write_key(
        keys_dir / "29991231T235959999999Z-rs256.pem", ec.generate_private_key(ec.SECP256R1())
    )
    key = generate_key(keys_dir, "ES256")
    assert key_files(keys_dir) == [future, key.path]
    ring = KeyRing(keys_dir)
    ring.load()
    assert ring.signing_key.kid == key.kid


def test_reload_parses_only_new_files(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    first = generate_key(keys_dir, "ES256")
    ring = KeyRing(keys_dir)
    ring.load()
    loaded = ring.get(first.kid)
    assert ring.reload_if_changed() is False
    second = generate_key(keys_dir, "ES256")
    assert ring.reload_if_changed() is True
    assert ring.get(first.kid) is loaded  # the same object: the PEM was not parsed again
    assert ring.signing_key.kid == second.kid
    second.path.unlink()
    assert ring.reload_if_changed() is True
    assert ring.get(second.kid) is None
    assert ring.signing_key.kid == first.kid


def test_reload_skips_a_bad_new_file_and_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys_dir = tmp_path / "keys"
    good = generate_key(keys_dir, "ES256")
    ring = KeyRing(keys_dir)
    ring.load()
    bad = keys_dir / "zzzz.pem"
    bad.write_text("not a key")
    bad.chmod(0o600)
    with caplog.at_level(logging.ERROR):
        ring.reload_if_changed()
    assert [k.kid for k in ring.keys] == [good.kid]
    assert ring.signing_key.kid == good.kid
    assert any(str(bad) in r.getMessage() for r in caplog.records)


def test_a_skipped_key_file_is_loaded_once_its_mode_is_fixed(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    old = generate_key(keys_dir, "ES256")
    ring = KeyRing(keys_dir)
    ring.load()
    new = generate_key(keys_dir, "ES256")
    new.path.chmod(0o644)  # copied in with the wrong mode: skipped
    ring.reload_if_changed()
    assert ring.signing_key.kid == old.kid
    new.path.chmod(0o600)  # the operator's fix changes neither mtime nor size
    assert ring.reload_if_changed() is True
    assert ring.signing_key.kid == new.kid


# -- a running server ------------------------------------------------------------------------


def bearer(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def test_jwks_kids_are_rfc7638_thumbprints_with_no_private_members(
    keys_dir: Path, start_app: StartApp
) -> None:
    ec_key = generate_key(keys_dir, "ES256")
    (rsa_path,) = [p for p in key_files(keys_dir) if p != ec_key.path]
    running = await start_app()
    published = await jwks(running.client)
    assert len(published) == 2
    for jwk in published:
        assert not PRIVATE_MEMBERS & set(jwk)
        assert jwk["use"] == "sig"
        assert jwk["kid"] == rfc7638_thumbprint(jwk)
    by_kid = {k["kid"]: k for k in published}
    assert by_kid[ec_key.kid]["alg"] == "ES256" and by_kid[ec_key.kid]["crv"] == "P-256"
    assert by_kid[load_key(rsa_path).kid]["alg"] == "RS256"


async def test_key_added_and_removed_on_disk_is_picked_up_without_restart(
    keys_dir: Path, start_app: StartApp
) -> None:
    running = await start_app(keys_reload_interval=0.2)
    await make_user(running.store, "alice")
    (old_path,) = key_files(keys_dir)
    old_kid = load_key(old_path).kid
    assert jwt_header((await running.login())["access_token"])["kid"] == old_kid

    new = generate_key(keys_dir, "ES256")
    await wait_for_kids(running.client, lambda kids: kids == {old_kid, new.kid})
    tokens = await running.login()
    assert jwt_header(tokens["access_token"]) | {"kid": new.kid, "alg": "ES256"} == jwt_header(
        tokens["access_token"]
    )
    assert (await running.client.get("/protected", headers=bearer(tokens))).status_code == 200

    new.path.unlink()
    await wait_for_kids(running.client, lambda kids: kids == {old_kid})
    assert jwt_header((await running.login())["access_token"])["kid"] == old_kid
    r = await running.client.get("/protected", headers=bearer(tokens))
    assert r.status_code == 401


async def test_retired_key_empties_the_verified_token_cache(
    keys_dir: Path, start_app: StartApp
) -> None:
    running = await start_app(keys_reload_interval=0.2)
    await make_user(running.store, "alice")
    (old_path,) = key_files(keys_dir)
    tokens = await running.login("alice", DEFAULT_PASSWORD)
    # Accepted once, so it sits in the verifier's cache.
    for _ in range(2):
        assert (await running.client.get("/protected", headers=bearer(tokens))).status_code == 200

    new = generate_key(keys_dir, "RS256")
    await wait_for_kids(running.client, lambda kids: new.kid in kids)
    assert (await running.client.get("/protected", headers=bearer(tokens))).status_code == 200

    old_kid = load_key(old_path).kid
    old_path.unlink()
    await wait_for_kids(running.client, lambda kids: old_kid not in kids)
    r = await running.client.get("/protected", headers=bearer(tokens))
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert r.json()["error"] == "invalid_token"
    fresh = await running.login("alice", DEFAULT_PASSWORD)
    assert (await running.client.get("/protected", headers=bearer(fresh))).status_code == 200


async def test_bad_key_file_added_at_runtime_is_skipped(
    keys_dir: Path, start_app: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_app(keys_reload_interval=0.2)
    await make_user(running.store, "alice")
    before = {k["kid"] for k in await jwks(running.client)}
    insecure = write_key(
        keys_dir / "zzzz-insecure.pem", ec.generate_private_key(ec.SECP256R1()), mode=0o644
    )
    deadline = time.monotonic() + 15
    while str(insecure) not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        await asyncio.sleep(0.05)
    assert {k["kid"] for k in await jwks(running.client)} == before
    tokens = await running.login()
    assert jwt_header(tokens["access_token"])["kid"] in before
    assert (await running.client.get("/health")).status_code == 200
