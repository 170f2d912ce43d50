"""The client registry (CONTRACT §5): `authserver clients ...` on both databases."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto.jwk import JWK

from authserver.audit import RequestContext
from authserver.clients import check_secret
from authserver.config import Settings
from authserver.refresh import start_family
from authserver.store.schema import clients, refresh_families
from authserver.store.sql import SqlStore
from tests.helpers.app import running_app
from tests.helpers.cli import ainvoke, assert_ok, assert_operator_error, cli_env, invoke
from tests.helpers.factories import make_user


@pytest.fixture
def env(database_url: str, keys_dir: Path) -> dict[str, str]:
    return cli_env(database_url, keys_dir)


async def listed(env: dict[str, str]) -> dict[str, dict[str, object]]:
    result = await ainvoke(env, "clients", "list", "--json")
    assert_ok(result)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return {row["client_id"]: row for row in rows}


async def stored_rows(settings: Settings) -> list[dict[str, object]]:
    store = SqlStore.from_settings(settings)
    try:
        async with store.engine.connect() as conn:
            rows = (await conn.execute(sa.select(clients))).all()
        return [dict(row._mapping) for row in rows]
    finally:
        await store.close()


async def test_a_confidential_client_gets_a_secret_printed_once_and_stored_as_a_digest(
    env: dict[str, str], settings: Settings
) -> None:
    result = await ainvoke(env, "clients", "add", "billing")
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # the secret, and nothing else on stdout
    secret = lines[0]
    assert len(secret) >= 43  # 256 bits, base64url
    rows = await stored_rows(settings)
    (row,) = rows
    assert row["secret_digest"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in json.dumps(rows, default=str)
    described = await listed(env)
    assert described["billing"]["type"] == "confidential"
    assert described["billing"]["grants"] == ["client_credentials"]
    assert secret not in json.dumps(described)
    assert described["authserver"]["grants"] == ["password", "refresh_token"]


async def test_grants_default_by_kind_and_can_be_given(env: dict[str, str]) -> None:
    assert_ok(
        await ainvoke(
            env, "clients", "add", "spa", "--public", "--redirect-uri", "https://a.example/cb"
        )
    )
    assert_ok(
        await ainvoke(
            env,
            "clients",
            "add",
            "cli-app",
            "--public",
            "--grant",
            "password",
            "--grant",
            "refresh_token",
            "--scope",
            "read",
        )
    )
    rows = await listed(env)
    assert rows["spa"]["grants"] == ["authorization_code", "refresh_token"]
    assert rows["spa"]["redirect_uris"] == ["https://a.example/cb"]
    assert rows["cli-app"]["grants"] == ["password", "refresh_token"]
    assert rows["cli-app"]["scopes"] == ["read"]
    assert rows["spa"]["type"] == "public"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["x", "--public", "--grant", "client_credentials"], "public client"),
        (["x", "--grant", "implicit"], "unknown grant"),
        (["x", "--scope", "admin"], "unknown scope"),
        (["x", "--public", "--redirect-uri", "https://a.example/cb#frag"], "fragment"),
        (["x", "--public", "--redirect-uri", "/relative"], "absolute"),
        (["x", "--grant", "authorization_code"], "redirect-uri"),
        (["authserver"], "built-in"),
        (["bad\tid"], "invalid client id"),
    ],
)
async def test_a_bad_registration_is_one_line_and_stores_nothing(
    env: dict[str, str], settings: Settings, args: list[str], fragment: str
) -> None:
    assert_operator_error(await ainvoke(env, "clients", "add", *args), fragment)
    assert await stored_rows(settings) == []


async def test_a_client_id_is_registered_once(env: dict[str, str]) -> None:
    assert_ok(await ainvoke(env, "clients", "add", "svc"))
    assert_operator_error(await ainvoke(env, "clients", "add", "svc"), "already exists")


def test_a_jwks_file_must_hold_public_keys_only(tmp_path: Path, keys_dir: Path) -> None:
    env = cli_env(f"sqlite:///{tmp_path / 'db.sqlite'}", keys_dir)
    key = JWK.from_pyca(ec.generate_private_key(ec.SECP256R1()))
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"keys": [json.loads(key.export_private())]}))
    assert_operator_error(
        invoke(env, "clients", "add", "signer", "--jwks-file", str(private)), "private key"
    )
    small = JWK.from_pyca(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    weak = tmp_path / "weak.json"
    weak.write_text(json.dumps({"keys": [json.loads(small.export_public())]}))
    assert_operator_error(invoke(env, "clients", "add", "signer", "--jwks-file", str(weak)), "2048")
    public = tmp_path / "public.json"
    public.write_text(json.dumps({"keys": [json.loads(key.export_public())]}))
    result = invoke(env, "clients", "add", "signer", "--jwks-file", str(public))
    assert_ok(result)
    assert result.stdout == ""  # no secret: it signs its assertions
    result = invoke(env, "clients", "list", "--json")
    rows = {json.loads(line)["client_id"]: json.loads(line) for line in result.stdout.splitlines()}
    assert rows["signer"]["auth"] == "private_key_jwt"


async def test_rotate_secret_keeps_the_old_one_for_the_grace_period(
    env: dict[str, str], settings: Settings
) -> None:
    old = (await ainvoke(env, "clients", "add", "svc")).stdout.strip()
    result = await ainvoke(env, "clients", "rotate-secret", "svc", "--grace", "60")
    assert_ok(result)
    new = result.stdout.strip()
    assert new and new != old
    async with running_app(settings) as running:
        client = await running.app.state.services.clients.get("svc")
        now = time.time()
        assert check_secret(client, new, now=now)
        assert check_secret(client, old, now=now)
        assert not check_secret(client, old, now=now + 61)
        assert not check_secret(client, "not it", now=now)
    without_grace = (await ainvoke(env, "clients", "rotate-secret", "svc")).stdout.strip()
    async with running_app(settings) as running:
        client = await running.app.state.services.clients.get("svc")
        assert check_secret(client, without_grace, now=time.time())
        assert not check_secret(client, new, now=time.time())
    assert_operator_error(
        await ainvoke(env, "clients", "rotate-secret", "nobody"), "unknown client"
    )


async def test_disable_enable_and_remove_are_audited_and_remove_revokes_sessions(
    env: dict[str, str], settings: Settings
) -> None:
    assert_ok(await ainvoke(env, "clients", "add", "app", "--public", "--grant", "password"))
    async with running_app(settings) as running:
        user = await make_user(running.store, "alice")
        auth = running.app.state.services.auth
        issued = await start_family(
            running.store,
            auth.auditor,
            RequestContext(),
            user=user,
            scope="read",
            client_id="app",
            lifetimes=auth.policy.lifetimes,
            now=time.time(),
        )
        assert issued is not None
    assert_ok(await ainvoke(env, "clients", "disable", "app"))
    assert (await listed(env))["app"]["disabled"] is True
    assert_ok(await ainvoke(env, "clients", "enable", "app"))
    assert (await listed(env))["app"]["disabled"] is False
    result = await ainvoke(env, "clients", "remove", "app")
    assert_ok(result)
    assert "revoked 1" in result.stdout
    assert "app" not in await listed(env)
    store = SqlStore.from_settings(settings)
    try:
        async with store.engine.connect() as conn:
            family = (await conn.execute(sa.select(refresh_families))).one()
        assert family.revoked_at is not None and family.revoked_reason == "client_removed"
        events = [e.event for e in await store.list_audit_events()]
    finally:
        await store.close()
    for name in ("client_added", "client_disabled", "client_enabled", "client_removed"):
        assert name in events
    assert_operator_error(await ainvoke(env, "clients", "remove", "app"), "unknown client")
    assert_operator_error(await ainvoke(env, "clients", "disable", "authserver"), "built-in")
