"""The common refresh (spend, issue, audit) on the raw database driver.

Nearly every refresh is the plain case: an active, unexpired token of a live
family and an enabled user. That one exchange is the server's hottest write,
and SQLAlchemy's execution layer costs more CPU per statement than the
drivers themselves, so it runs here on the drivers directly:

- PostgreSQL: one statement (`UPDATE ... RETURNING` with the two inserts as
  CTEs) on an asyncpg pool, so one round trip, prepared once per connection.
  The pool runs no reset query on release and no ping on checkout: its
  connections never change session state, and asyncpg notices a connection the
  server closed (the socket's EOF) and replaces it at the next checkout.
- SQLite: the same steps in one `BEGIN IMMEDIATE` transaction on the store's
  kept writer connection, through `sqlite3`.

Anything unusual (reuse, expiry, revocation, a disabled user, a narrowed scope)
finds no row, changes nothing, and takes the general path in `refresh.py`. The
rules are the same as that path's `decide`; the tests run every case both ways.
Driver errors propagate as they are, for `sql.py` to retry or map.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

import asyncpg

from authserver.store.protocol import AuditEvent, Rotated


@dataclass(frozen=True, slots=True)
class Exchange:
    """One plain rotation to attempt."""

    token_hash: str
    successor_hash: str
    now: float
    refresh_ttl: int
    event: AuditEvent


_PG_ROTATE = """
WITH spent AS (
    UPDATE refresh_tokens AS t
    SET status = 'spent', successor_hash = $2, spent_at = $3::float8
    FROM refresh_families AS f, users AS u
    WHERE t.token_hash = $1
      AND t.status = 'active' AND t.expires_at > $3::float8
      AND f.id = t.family_id AND f.revoked_at IS NULL AND f.expires_at > $3::float8
      AND u.id = f.user_id AND NOT u.disabled
    RETURNING t.token_hash, t.family_id, t.scope, f.client_id,
              f.expires_at AS family_expires_at, u.username
), issued AS (
    INSERT INTO refresh_tokens
        (token_hash, family_id, parent_hash, status, scope, created_at, expires_at)
    SELECT $2, family_id, token_hash, 'active', scope, $3::float8,
           LEAST($3::float8 + $4::float8, family_expires_at)
    FROM spent
), audited AS (
    INSERT INTO audit_events (at, event, username, client_addr, request_id, details)
    SELECT $5::float8, $6, username, $7, $8, json_build_object('family_id', family_id)::text
    FROM spent
)
SELECT family_id, username, scope, client_id FROM spent
"""


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """The pool's reset: nothing to undo (asyncpg still rolls back a stray transaction)."""


class PgRotator:
    """The plain rotation as one statement on a lazily opened asyncpg pool."""

    def __init__(self, connect_args: dict[str, Any], *, max_size: int, wait: float) -> None:
        self._connect_args = connect_args
        self._max_size = max_size
        self._wait = wait  # seconds to wait for a free connection
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    # min_size 0: opening the pool connects nothing, so a database that is
                    # down fails the request that needed it, not the pool for good.
                    self._pool = await asyncpg.create_pool(
                        min_size=0,
                        max_size=self._max_size,
                        max_inactive_connection_lifetime=300.0,
                        reset=_keep_session,
                        **self._connect_args,
                    )
        return self._pool

    async def rotate(self, exchange: Exchange) -> Rotated | None:
        pool = await self._get_pool()
        event = exchange.event
        async with pool.acquire(timeout=self._wait) as conn:
            row = await conn.fetchrow(
                _PG_ROTATE,
                exchange.token_hash,
                exchange.successor_hash,
                exchange.now,
                float(exchange.refresh_ttl),
                event.at,
                event.event,
                event.client_addr,
                event.request_id,
            )
        if row is None:
            return None
        return Rotated(row["family_id"], row["username"], row["scope"], row["client_id"])

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=5.0)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()  # a frozen database must not hold up shutdown


_SQLITE_FIND = """
SELECT t.family_id, t.scope, f.client_id, f.expires_at, u.username
FROM refresh_tokens AS t
JOIN refresh_families AS f ON f.id = t.family_id
JOIN users AS u ON u.id = f.user_id
WHERE t.token_hash = ?
  AND t.status = 'active' AND t.expires_at > ?
  AND f.revoked_at IS NULL AND f.expires_at > ?
  AND NOT u.disabled
"""
_SQLITE_SPEND = """
UPDATE refresh_tokens SET status = 'spent', successor_hash = ?, spent_at = ?
WHERE token_hash = ? AND status = 'active'
"""
_SQLITE_ISSUE = """
INSERT INTO refresh_tokens
    (token_hash, family_id, parent_hash, status, scope, created_at, expires_at)
VALUES (?, ?, ?, 'active', ?, ?, ?)
"""
_SQLITE_AUDIT = """
INSERT INTO audit_events (at, event, username, client_addr, request_id, details)
VALUES (?, ?, ?, ?, ?, ?)
"""


def sqlite_rotate(conn: sqlite3.Connection, exchange: Exchange) -> Rotated | None:
    """The plain rotation in one write transaction; blocking, but a local call.

    The caller holds the process's SQLite write lock, and `conn` is in autocommit
    mode (its driver-level transaction control is off), so BEGIN IMMEDIATE takes
    the database's write lock before anything is read.
    """
    now = exchange.now
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = conn.execute(_SQLITE_FIND, (exchange.token_hash, now, now)).fetchone()
        if found is None:
            conn.execute("ROLLBACK")
            return None
        family_id, scope, client_id, family_expires_at, username = found
        spent = conn.execute(_SQLITE_SPEND, (exchange.successor_hash, now, exchange.token_hash))
        if spent.rowcount != 1:  # cannot happen under the write lock; stay safe anyway
            conn.execute("ROLLBACK")
            return None
        conn.execute(
            _SQLITE_ISSUE,
            (
                exchange.successor_hash,
                family_id,
                exchange.token_hash,
                scope,
                now,
                min(now + exchange.refresh_ttl, family_expires_at),
            ),
        )
        event = exchange.event
        conn.execute(
            _SQLITE_AUDIT,
            (
                event.at,
                event.event,
                username,
                event.client_addr,
                event.request_id,
                json.dumps({"family_id": family_id}, separators=(",", ":")),
            ),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return Rotated(family_id, username, scope, client_id)
