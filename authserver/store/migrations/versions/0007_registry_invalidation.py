"""The database tells every process when a client or a session changes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10

Each process keeps the clients it has read (and, on PostgreSQL, the sessions it has
seen live) in memory; see `authserver/store/registry.py`. These triggers make every
writer invalidate them, whatever it is: this server, the CLI, another process, or a
statement typed by hand.

- `registry_version`: one row, a counter that every change to `clients` bumps
  (SQLite's processes compare it; on PostgreSQL it is informative only).
- PostgreSQL: the same change sends `pg_notify('authserver_registry', client_id)`;
  a session revoked (`revoked_at` set) or deleted while unrevoked (a user deleted,
  a purge) sends `pg_notify('authserver_sessions', family_id)`. Row triggers fire
  for the rows a foreign key's ON DELETE CASCADE removes too.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_SQLITE_TRIGGERS = {
    f"clients_registry_{when.lower()}": when for when in ("INSERT", "UPDATE", "DELETE")
}

_PG_UP = [
    """
    CREATE FUNCTION authserver_client_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE registry_version SET version = version + 1;
        IF TG_OP = 'TRUNCATE' THEN
            PERFORM pg_notify('authserver_registry', '*');
        ELSIF TG_OP = 'INSERT' THEN
            PERFORM pg_notify('authserver_registry', NEW.client_id);
        ELSE
            PERFORM pg_notify('authserver_registry', OLD.client_id);
        END IF;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER clients_registry_changed
    AFTER INSERT OR UPDATE OR DELETE ON clients
    FOR EACH ROW EXECUTE FUNCTION authserver_client_changed()
    """,
    """
    CREATE TRIGGER clients_registry_truncated
    AFTER TRUNCATE ON clients
    FOR EACH STATEMENT EXECUTE FUNCTION authserver_client_changed()
    """,
    """
    CREATE FUNCTION authserver_session_ended() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'TRUNCATE' THEN
            PERFORM pg_notify('authserver_sessions', '*');
        ELSE
            PERFORM pg_notify('authserver_sessions', OLD.id);
        END IF;
        RETURN NULL;
    END
    $$
    """,
    # Only the changes that can end a live session: rotations and sign-ins, the
    # frequent writes, touch `refresh_tokens` or insert, and fire nothing.
    """
    CREATE TRIGGER refresh_families_revoked
    AFTER UPDATE ON refresh_families
    FOR EACH ROW WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL)
    EXECUTE FUNCTION authserver_session_ended()
    """,
    """
    CREATE TRIGGER refresh_families_deleted
    AFTER DELETE ON refresh_families
    FOR EACH ROW WHEN (OLD.revoked_at IS NULL)
    EXECUTE FUNCTION authserver_session_ended()
    """,
    """
    CREATE TRIGGER refresh_families_truncated
    AFTER TRUNCATE ON refresh_families
    FOR EACH STATEMENT EXECUTE FUNCTION authserver_session_ended()
    """,
]

_PG_DOWN = [
    "DROP TRIGGER refresh_families_truncated ON refresh_families",
    "DROP TRIGGER refresh_families_deleted ON refresh_families",
    "DROP TRIGGER refresh_families_revoked ON refresh_families",
    "DROP FUNCTION authserver_session_ended()",
    "DROP TRIGGER clients_registry_truncated ON clients",
    "DROP TRIGGER clients_registry_changed ON clients",
    "DROP FUNCTION authserver_client_changed()",
]


def upgrade() -> None:
    table = op.create_table(
        "registry_version",
        sa.Column("id", sa.Integer, autoincrement=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_registry_version"),
    )
    op.bulk_insert(table, [{"id": 1, "version": 0}])
    if op.get_bind().dialect.name == "postgresql":
        for statement in _PG_UP:
            op.execute(statement)
        return
    for name, when in _SQLITE_TRIGGERS.items():
        op.execute(
            f"CREATE TRIGGER {name} AFTER {when} ON clients "
            "BEGIN UPDATE registry_version SET version = version + 1; END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in _PG_DOWN:
            op.execute(statement)
    else:
        for name in _SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER {name}")
    op.drop_table("registry_version")
