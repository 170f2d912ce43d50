"""Alembic environment: runs the package's migrations over the async engine."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from authserver.store.schema import metadata

# Any fixed number: serialises concurrent `db upgrade`/`serve` runs on PostgreSQL.
_MIGRATION_LOCK_ID = 0x6175_7468


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_ID})"))
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    _run(context.config.attributes["connection"])


run_migrations_online()
