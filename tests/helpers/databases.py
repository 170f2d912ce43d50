"""The databases tests run on: a fresh PostgreSQL database per test, and backend markers.

Every store-backed test runs on SQLite and, when AUTHSERVER_TEST_POSTGRES_URL
is set (CI always sets it), on a fresh PostgreSQL database of its own.
"""

from __future__ import annotations

import os
import uuid
from typing import NoReturn

import asyncpg
import pytest

from authserver.config import Settings
from authserver.store.migrate import upgrade_async
from authserver.store.sql import create_engine

POSTGRES_URL = os.environ.get("AUTHSERVER_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite", "postgresql"]

# For tests whose subject is not in the database (keys live on disk): no PostgreSQL run.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
# For what only PostgreSQL does (row locks that deadlock, a server that can drop a database).
POSTGRESQL_ONLY = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL, reason="needs PostgreSQL: AUTHSERVER_TEST_POSTGRES_URL is not set"
)


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


async def drop_pg_database(url: str) -> None:
    name = url.rpartition("/")[2]
    conn = await asyncpg.connect(_admin_dsn())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


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


async def drop_migrated_template() -> None:
    """Drop this worker's template, if `migrated_template` made one."""
    if "name" in _template:
        base, _, _ = POSTGRES_URL.rpartition("/")
        await drop_pg_database(f"{base}/{_template.pop('name')}")


def postgres_unavailable(reason: str) -> NoReturn:
    """Skip the PostgreSQL half of a test, except in CI, which must run it: fail there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"PostgreSQL run skipped: {reason}")
