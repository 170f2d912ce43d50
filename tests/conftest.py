"""Shared fixtures: real SQLite files, a real PostgreSQL database, the real app.

Every store-backed test runs on SQLite and, when AUTHSERVER_TEST_POSTGRES_URL
is set (CI always sets it), on a fresh PostgreSQL database of its own.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from authserver.app import create_app
from authserver.config import Settings
from authserver.keys import generate_key
from authserver.store.migrate import upgrade_async
from authserver.store.protocol import Store
from authserver.store.sql import create_engine
from tests.factories import DEFAULT_PASSWORD, make_user

POSTGRES_URL = os.environ.get("AUTHSERVER_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite", "postgresql"]


def _admin_dsn() -> str:
    # asyncpg takes postgresql:// URLs as they are.
    return POSTGRES_URL


async def create_pg_database(template: str | None = None) -> str:
    """A new database: empty, or a copy of `template` (much faster than migrating anew)."""
    name = f"authserver_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_admin_dsn())
    try:
        copy = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{copy}')
    finally:
        await conn.close()
    base, _, _ = POSTGRES_URL.rpartition("/")
    return f"{base}/{name}"


_template: dict[str, str] = {}


async def migrated_template() -> str:
    """This worker's migrated template database, made once per session."""
    if "name" not in _template:
        url = await create_pg_database()
        engine = create_engine(Settings(database_url=url))
        try:
            await upgrade_async(engine)
        finally:
            await engine.dispose()
        _template["name"] = url.rpartition("/")[2]
    return _template["name"]


@pytest.fixture(scope="session", autouse=True)
def _drop_template() -> Iterator[None]:
    yield
    if "name" in _template:
        base, _, _ = POSTGRES_URL.rpartition("/")
        asyncio.run(drop_pg_database(f"{base}/{_template['name']}"))


async def drop_pg_database(url: str) -> None:
    name = url.rpartition("/")[2]
    conn = await asyncpg.connect(_admin_dsn())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def postgres_unavailable(reason: str) -> NoReturn:
    """Skip the PostgreSQL half of a test, except in CI, which must run it: fail there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"PostgreSQL run skipped: {reason}")


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


@dataclass
class Running:
    """An app started with its lifespan, and an HTTP client that talks to it in-process."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def store(self) -> Store:
        store: Store = self.app.state.services.store
        return store

    async def login(
        self, username: str = "alice", password: str = DEFAULT_PASSWORD, **extra: Any
    ) -> dict[str, Any]:
        response = await self.client.post(
            "/login", json={"username": username, "password": password, **extra}
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Running]:
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Running(app=app, client=client, settings=settings)


StartApp = Callable[..., Awaitable[Running]]


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
