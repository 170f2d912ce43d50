"""Shared fixtures: real SQLite files, a real PostgreSQL database, the real app.

Every store-backed test runs on SQLite and, when AUTHSERVER_TEST_POSTGRES_URL
is set (CI always sets it), on a fresh PostgreSQL database of its own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from authserver.config import Settings
from authserver.keys import generate_key
from authserver.store.migrate import upgrade_async
from authserver.store.sql import SqlStore
from tests.helpers.app import Running, StartApp, running_app
from tests.helpers.databases import (
    BACKENDS,
    POSTGRES_URL,
    create_pg_database,
    drop_migrated_template,
    drop_pg_database,
    migrated_template,
    postgres_unavailable,
)
from tests.helpers.factories import make_user


@pytest.fixture(scope="session", autouse=True)
def _drop_template() -> Iterator[None]:
    yield
    asyncio.run(drop_migrated_template())


@pytest.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database of this test's own: a SQLite file, or a PostgreSQL database.

    The PostgreSQL one is a copy of a migrated template (empty with
    `@pytest.mark.empty_database`); the SQLite file starts empty. Either way the
    app's own migration step runs, a no-op on an already migrated database.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'authserver.db'}"
        return
    if not POSTGRES_URL:
        postgres_unavailable("AUTHSERVER_TEST_POSTGRES_URL is not set")
    try:
        empty = request.node.get_closest_marker("empty_database") is not None
        url = await create_pg_database(template=None if empty else await migrated_template())
    except (OSError, asyncpg.PostgresError) as exc:
        postgres_unavailable(f"cannot reach {POSTGRES_URL}: {exc}")
    try:
        yield url
    finally:
        await drop_pg_database(url)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlStore]:
    """A real store over this test's database, with no app around it, migrated."""
    store = SqlStore.from_settings(Settings(database_url=database_url))
    try:
        await upgrade_async(store.engine)
        yield store
    finally:
        await store.close()


@pytest.fixture(scope="session")
def rsa_key_pem(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """One RSA key for the whole session: generating one per test costs more than the test."""
    return generate_key(tmp_path_factory.mktemp("session-key"), "RS256").path.read_bytes()


@pytest.fixture
def keys_dir(tmp_path: Path, rsa_key_pem: bytes) -> Path:
    """A keys directory holding the session's RSA key, mode 0600, named as `keys generate` names."""
    path = tmp_path / "keys"
    path.mkdir(mode=0o700)
    key_file = path / "20200101T000000000000Z-rs256.pem"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(rsa_key_pem)
    return path


@pytest.fixture
def make_settings(database_url: str, keys_dir: Path) -> Callable[..., Settings]:
    """Settings for this test's database and keys; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "keys_dir": keys_dir,
            "bcrypt_rounds": 4,
            "issuer": "http://testserver",
            "log_format": "text",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def start_app(make_settings: Callable[..., Settings]) -> AsyncIterator[StartApp]:
    """Start the app with settings overrides; stopped at the end of the test."""
    stack: list[Any] = []

    async def start(**overrides: Any) -> Running:
        cm = running_app(make_settings(**overrides))
        running = await cm.__aenter__()
        stack.append(cm)
        return running

    yield start
    for cm in reversed(stack):
        await cm.__aexit__(None, None, None)


@pytest.fixture
async def server(start_app: StartApp) -> Running:
    """The app with default test settings and the user alice."""
    running = await start_app()
    await make_user(running.store, "alice")
    return running


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def repo_root() -> Iterator[Path]:
    yield Path(__file__).resolve().parent.parent
