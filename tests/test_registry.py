"""What a process remembers (`authserver/store/registry.py`): clients on both databases,
live sessions on PostgreSQL; forgotten whenever another process, the CLI or plain SQL
changes them, and never trusted while the PostgreSQL listener is not connected."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import asyncpg
import httpx
import pytest
import sqlalchemy as sa

from authserver.config import Settings
from authserver.store.protocol import Client
from authserver.store.registry import Registry
from authserver.store.sql import SqlStore, SqlTransaction
from tests.helpers.databases import POSTGRESQL_ONLY
from tests.helpers.factories import DEFAULT_PASSWORD, make_client, make_user
from tests.helpers.procs import ServerPool, base_env, run_cli, server_errors

CC = {"grant_type": "client_credentials"}


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for something asynchronous (a notification, a reconnection) to happen."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def listening(store: SqlStore) -> None:
    """PostgreSQL: start the listener (any hot read does) and wait until it listens."""
    if store.listener is not None:
        await store.get_client("nobody")
        await until(lambda: store.registry.on, "the listener connected")


async def heard(store: SqlStore, client_id: str) -> None:
    """PostgreSQL delivers a change's notification asynchronously: wait until it was
    handled (the client forgotten). SQLite checks its counter at the next read itself."""
    if store.listener is not None:
        await until(lambda: store.registry.client(client_id) is None, "the change was notified")


@pytest.fixture
async def other(database_url: str, store: SqlStore) -> AsyncIterator[SqlStore]:
    """The same database opened separately: another process, as far as the stores go."""
    opened = SqlStore.from_settings(Settings(database_url=database_url))
    try:
        yield opened
    finally:
        await opened.close()


async def remembered(store: SqlStore, client_id: str) -> Client:
    await listening(store)
    client = await store.get_client(client_id)
    assert client is not None
    assert store.registry.client(client_id) == client  # it is now answered from memory
    return client


async def test_a_client_changed_by_another_process_is_read_again(
    store: SqlStore, other: SqlStore
) -> None:
    await make_client(other, "svc")
    client = await remembered(store, "svc")

    await other.atomic(lambda tx: tx.update_client(replace(client, disabled=True)))
    await heard(store, "svc")
    changed = await store.get_client("svc")
    assert changed is not None and changed.disabled

    rotated = replace(changed, disabled=False, secret_digest="0" * 64)
    await other.atomic(lambda tx: tx.update_client(rotated))
    await heard(store, "svc")
    assert await store.get_client("svc") == rotated

    await remembered(store, "svc")
    await other.atomic(lambda tx: tx.delete_client("svc"))
    await heard(store, "svc")
    assert await store.get_client("svc") is None


async def test_a_client_changed_by_plain_sql_is_read_again(
    store: SqlStore, other: SqlStore
) -> None:
    """The triggers do the telling, not our code: an operator's UPDATE counts too."""
    await make_client(other, "svc")
    await remembered(store, "svc")
    async with other.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE clients SET disabled = true WHERE client_id = 'svc'"))
    await heard(store, "svc")
    changed = await store.get_client("svc")
    assert changed is not None and changed.disabled


async def test_an_unknown_client_is_not_remembered(store: SqlStore, other: SqlStore) -> None:
    await listening(store)
    assert await store.get_client("late") is None
    await make_client(other, "late")  # no notification needed: absence is never kept
    assert await store.get_client("late") is not None


async def test_a_process_forgets_its_own_changes_before_answering(store: SqlStore) -> None:
    await make_client(store, "svc")
    client = await remembered(store, "svc")
    await store.atomic(lambda tx: tx.update_client(replace(client, disabled=True)))
    assert store.registry.client("svc") is None  # synchronously, notification or not


def test_a_read_that_raced_a_change_is_not_kept() -> None:
    registry = Registry(on=True)
    client = _client("svc")
    guard = registry.guard()
    registry.forget_clients()  # a notification arrives while the read is in flight
    registry.keep_client(guard, client)
    assert registry.client("svc") is None
    registry.keep_client(registry.guard(), client)
    assert registry.client("svc") == client
    guard = registry.guard()
    registry.switch(False)  # the listener is lost
    registry.switch(True)  # and back: a read from before must still not be kept
    registry.keep_client(guard, client)
    assert registry.client("svc") is None
    registry.switch(False)
    assert registry.guard() is None
    registry.keep_client(registry.guard(), client)
    assert registry.client("svc") is None


def test_the_memory_is_bounded() -> None:
    registry = Registry(on=True, max_clients=3)
    for i in range(5):
        registry.keep_client(registry.guard(), _client(f"c{i}"))
    assert [registry.client(f"c{i}") is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]


def _client(client_id: str) -> Client:
    return Client(
        client_id=client_id,
        name=client_id,
        public=False,
        secret_digest="0" * 64,
        previous_secret_digest=None,
        previous_secret_expires_at=None,
        jwks=None,
        grants=("client_credentials",),
        scopes=None,
        redirect_uris=(),
        post_logout_redirect_uris=(),
        audience=None,
        third_party=False,
        require_dpop=False,
        disabled=False,
        created_at=0.0,
        updated_at=0.0,
    )


# -- PostgreSQL: sessions, and the listener --------------------------------------------


@POSTGRESQL_ONLY
async def test_a_session_revoked_by_another_process_is_read_again(
    store: SqlStore, other: SqlStore
) -> None:
    await make_client(other, "api")
    user = await make_user(other, "alice")
    families = [f"00000000-0000-0000-0000-00000000000{i}" for i in range(2)]

    async def create(tx: SqlTransaction) -> None:
        for family in families:
            await tx.create_family(
                family_id=family, user_id=user.id, client_id="api", created_at=0.0, expires_at=1e12
            )

    await other.atomic(create)
    await listening(store)
    for family in families:
        assert await store.get_client_and_session("api", family) == (
            await store.get_client("api"),
            True,
        )
        assert store.registry.session_live(family)

    await other.atomic(lambda tx: tx.revoke_family(families[0], at=1.0, reason="logout"))
    await until(lambda: not store.registry.session_live(families[0]), "the revocation notified")
    assert (await store.get_client_and_session("api", families[0]))[1] is False
    assert await store.session_live(families[0]) is False
    assert store.registry.session_live(families[1])  # only the revoked one was forgotten

    # Deleting the user cascades to its families: row triggers fire for those rows too.
    async with other.engine.begin() as conn:
        await conn.execute(sa.text("DELETE FROM users WHERE id = :id"), {"id": user.id})
    await until(lambda: not store.registry.session_live(families[1]), "the cascade notified")
    assert await store.session_live(families[1]) is False


@POSTGRESQL_ONLY
async def test_losing_the_listener_turns_the_memory_off_until_it_is_back(
    store: SqlStore, other: SqlStore, database_url: str
) -> None:
    await make_client(other, "svc")
    await remembered(store, "svc")
    assert store.listener is not None
    pid = store.listener.backend_pid
    assert pid is not None
    admin = await asyncpg.connect(database_url)
    try:
        # A change nobody is told of (its trigger off) stays unseen while memory holds...
        await admin.execute("ALTER TABLE clients DISABLE TRIGGER clients_registry_changed")
        await admin.execute("UPDATE clients SET disabled = true WHERE client_id = 'svc'")
        await admin.execute("ALTER TABLE clients ENABLE TRIGGER clients_registry_changed")
        stale = await store.get_client("svc")
        assert stale is not None and not stale.disabled
        # ...and the listener's loss forgets everything: the next read is the database's.
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid) is True
        await until(
            lambda: store.listener is not None and store.listener.backend_pid != pid, "lost"
        )
    finally:
        await admin.close()
    fresh = await store.get_client("svc")
    assert fresh is not None and fresh.disabled
    # It reconnects by itself, and remembers again.
    await until(lambda: store.registry.on, "the listener reconnected")
    assert store.listener.connections == 2
    assert await remembered(store, "svc") == fresh


@pytest.mark.slow
@POSTGRESQL_ONLY
def test_a_session_ended_on_one_server_is_inactive_at_another_at_once(
    database_url: str, keys_dir: Path, tmp_path: Path
) -> None:
    env = base_env(AUTHSERVER_DATABASE_URL=database_url, AUTHSERVER_KEYS_DIR=str(keys_dir))
    added = run_cli(["clients", "add", "api"], env, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    api = "Basic " + base64.b64encode(f"api:{added.stdout.strip()}".encode()).decode()
    user = run_cli(
        ["users", "add", "alice", "--password-stdin"], env, cwd=tmp_path, stdin=DEFAULT_PASSWORD
    )
    assert user.returncode == 0, user.stderr

    with ServerPool(tmp_path) as pool:
        a, b = (pool.spawn(env, name=name) for name in ("a", "b"))
        a.wait_healthy()
        b.wait_healthy()

        def login() -> dict[str, str]:
            form = {"username": "alice", "password": DEFAULT_PASSWORD}
            r = httpx.post(f"{a.url}/login", json=form, timeout=10)
            assert r.status_code == 200, r.text
            tokens: dict[str, str] = r.json()
            return tokens

        def active(token: str) -> bool:
            r = httpx.post(
                f"{b.url}/introspect",
                data={"token": token},
                headers={"Authorization": api},
                timeout=10,
            )
            assert r.status_code == 200, r.text
            return bool(r.json()["active"])

        first = login()
        assert [active(first["access_token"]) for _ in range(2)] == [True, True]
        r = httpx.post(f"{a.url}/logout", json={"refresh_token": first["refresh_token"]})
        assert r.status_code < 300, r.text
        assert active(first["access_token"]) is False

        # Reuse detection on A: the family dies, B's memory of it too.
        second = login()
        assert [active(second["access_token"]) for _ in range(2)] == [True, True]
        spent = second["refresh_token"]
        assert httpx.post(f"{a.url}/refresh", json={"refresh_token": spent}).status_code == 200
        assert httpx.post(f"{a.url}/refresh", json={"refresh_token": spent}).status_code != 200
        assert active(second["access_token"]) is False

        # The operator's CLI: another process again.
        third = login()
        assert [active(third["access_token"]) for _ in range(2)] == [True, True]
        revoked = run_cli(["sessions", "revoke", "--user", "alice"], env, cwd=tmp_path)
        assert revoked.returncode == 0, revoked.stderr
        assert active(third["access_token"]) is False
        for server in (a, b):
            assert server_errors(server.log()) == []
