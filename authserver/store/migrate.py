"""Schema migrations: `authserver db upgrade`, and `serve` before it listens."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine

from authserver.config import Settings
from authserver.store.sql import create_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


async def upgrade_async(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to `revision` (the newest by default), from inside a running loop."""
    async with engine.connect() as connection:
        # On SQLite, take the write lock up front so concurrent starters migrate one at a time
        # (PostgreSQL serialises them with an advisory lock in env.py).
        connection = await connection.execution_options(sqlite_write=True)

        def run(sync_connection: object) -> None:
            config = _config()
            config.attributes["connection"] = sync_connection
            command.upgrade(config, revision)

        await connection.run_sync(run)
        await connection.commit()


def upgrade(settings: Settings) -> None:
    """Bring the schema to the newest revision (blocking; runs its own loop)."""
    import asyncio

    async def run() -> None:
        engine = create_engine(settings)
        try:
            await upgrade_async(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
