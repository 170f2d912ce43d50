"""Shared fixtures: real SQLite files, a real PostgreSQL database, the real app.

Every store-backed test runs on SQLite and, when AUTHSERVER_TEST_POSTGRES_URL
is set (CI always sets it), on a fresh PostgreSQL database of its own.
"""

from __future__ import annotations

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
from authserver.store.protocol import Store
from tests.factories import DEFAULT_PASSWORD, make_user

POSTGRES_URL = os.environ.get("AUTHSERVER_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite", "postgresql"]


def _admin_dsn() -> str:
    # asyncpg takes postgresql:// URLs as they are.
    return POSTGRES_URL


async def create_pg_database() -> str:
    name = f"authserver_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_admin_dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, _ = POSTGRES_URL.rpartition("/")
    return f"{base}/{name}"


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
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'authserver.db'}"
        return
    if not POSTGRES_URL:
        postgres_unavailable("AUTHSERVER_TEST_POSTGRES_URL is not set")
    try:
        url = await create_pg_database()
    except (OSError, asyncpg.PostgresError) as exc:
        postgres_unavailable(f"cannot reach {POSTGRES_URL}: {exc}")
    try:
        yield url
    finally:
        await drop_pg_database(url)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    generate_key(path, "RS256")
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
