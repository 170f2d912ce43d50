"""Usernames are case-insensitive (RFC 8265 UsernameCaseMapped) and passwords are NFC
(NIST SP 800-63B §5.1.1.2), at login, at creation, in the CLI and in an upgraded database."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import bcrypt
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from authserver.audit import RequestContext
from authserver.cli import app as cli_app
from authserver.config import Settings
from authserver.store.migrate import upgrade_async
from authserver.store.protocol import UpgradeRefused
from authserver.store.schema import users
from authserver.store.sql import create_engine
from authserver.users import UserExistsError, UserService, normalize_username
from tests.helpers.app import Running, StartApp

CTX = RequestContext(client_addr="test")
COMPOSED = unicodedata.normalize("NFC", "café crème")
DECOMPOSED = unicodedata.normalize("NFD", "café crème")


def user_service(running: Running) -> UserService:
    service: UserService = running.app.state.services.users
    return service


async def login(running: Running, username: str, password: str) -> int:
    r = await running.client.post("/login", json={"username": username, "password": password})
    return r.status_code


@pytest.mark.parametrize(
    ("given", "stored"),
    [("Alice", "alice"), ("ALICE", "alice"), ("José", "josé"), ("Jose\u0301", "josé")],
)
def test_a_username_has_one_spelling(given: str, stored: str) -> None:
    assert normalize_username(given) == stored


@pytest.mark.parametrize("refused", ["a b", "", "x" * 151, "\u01c5", "nul\x00"])
def test_the_profile_refuses_what_it_disallows(refused: str) -> None:
    assert normalize_username(refused) is None


async def test_alice_and_capital_alice_are_one_account(start_app: StartApp) -> None:
    running = await start_app()
    users = user_service(running)
    created = await users.create(CTX, "Alice", "a long password")
    assert created.username == "alice"
    with pytest.raises(UserExistsError):
        await users.create(CTX, "aLiCe", "another password")
    for spelling in ("alice", "Alice", "ALICE"):
        assert await login(running, spelling, "a long password") == 200
    r = await running.client.post(
        "/token",
        data={"grant_type": "password", "username": "ALICE", "password": "a long password"},
    )
    assert r.status_code == 200
    await users.set_disabled(CTX, "ALICE", True)
    assert await login(running, "alice", "a long password") == 401


async def test_a_name_the_profile_refuses_is_an_unknown_user_at_login(start_app: StartApp) -> None:
    running = await start_app()
    for name in ("a b", "\u01c5", "x" * 1000):
        r = await running.client.post("/login", json={"username": name, "password": "pw"})
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "invalid_grant"


async def test_a_password_is_the_same_however_its_accents_are_composed(start_app: StartApp) -> None:
    running = await start_app()
    await user_service(running).create(CTX, "carol", DECOMPOSED)
    stored = await running.store.get_user("carol")
    assert stored is not None
    assert bcrypt.checkpw(COMPOSED.encode(), stored.password_hash.encode())
    assert await login(running, "carol", COMPOSED) == 200
    assert await login(running, "carol", DECOMPOSED) == 200


async def test_a_hash_made_before_normalisation_verifies_and_is_upgraded(
    start_app: StartApp,
) -> None:
    running = await start_app()
    legacy = bcrypt.hashpw(DECOMPOSED.encode(), bcrypt.gensalt(4)).decode()
    await running.store.add_user("dave", legacy, at=0.0)
    assert await login(running, "dave", COMPOSED) == 401  # the old hash knows one spelling
    assert await login(running, "dave", DECOMPOSED) == 200
    upgraded = await running.store.get_user("dave")
    assert upgraded is not None and upgraded.password_hash != legacy
    assert bcrypt.checkpw(COMPOSED.encode(), upgraded.password_hash.encode())
    assert await login(running, "dave", COMPOSED) == 200


def test_the_cli_creates_the_normalised_name(tmp_path: Path, keys_dir: Path) -> None:
    env = {
        "AUTHSERVER_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "AUTHSERVER_KEYS_DIR": str(keys_dir),
        "AUTHSERVER_BCRYPT_ROUNDS": "4",
    }
    runner = CliRunner()
    add = ["users", "add", "Erin", "--password-stdin"]
    result = runner.invoke(cli_app, add, env=env, input="a long password\n")
    assert result.exit_code == 0, result.output
    assert "created user erin" in result.output
    result = runner.invoke(
        cli_app, ["users", "add", "ERIN", "--password-stdin"], env=env, input="a long password\n"
    )
    assert result.exit_code == 1
    assert "already exists" in result.output
    assert runner.invoke(cli_app, ["users", "disable", "ErIn"], env=env).exit_code == 0


async def _names(settings: Settings) -> list[str]:
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(sa.select(users.c.username).order_by(users.c.id))
            return [row[0] for row in rows]
    finally:
        await engine.dispose()


async def _version(settings: Settings) -> str:
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            return str(
                (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar()
            )
    finally:
        await engine.dispose()


@pytest.mark.empty_database
async def test_an_upgrade_that_would_merge_two_users_stops_and_changes_nothing(
    settings: Settings,
) -> None:
    engine = create_engine(settings)
    try:
        await upgrade_async(engine, "0001")
        async with engine.begin() as conn:
            for name in ("Alice", "alice", "Bob", "carol"):
                await conn.execute(
                    users.insert().values(
                        username=name,
                        password_hash="x",
                        disabled=False,
                        created_at=0.0,
                        updated_at=0.0,
                    )
                )
        with pytest.raises(UpgradeRefused) as refused:
            await upgrade_async(engine)
        message = str(refused.value)
        assert "'Alice' and 'alice'" in message and "\n" not in message
        assert await _version(settings) == "0001"
        assert await _names(settings) == ["Alice", "alice", "Bob", "carol"]
        async with engine.begin() as conn:
            await conn.execute(users.delete().where(users.c.username == "alice"))
        await upgrade_async(engine)
    finally:
        await engine.dispose()
    assert await _names(settings) == ["alice", "bob", "carol"]
