"""The one store implementation: SQLAlchemy Core over SQLite or asyncpg.

One set of queries serves both backends. What differs is how they run:

- PostgreSQL: asyncpg, a pooled async engine; the token row is locked with
  `SELECT ... FOR UPDATE`.
- SQLite: WAL mode, and every write transaction takes the write lock at BEGIN
  (`BEGIN IMMEDIATE`), so a read-then-write never dies on a lock upgrade. Its
  statements run inline on the event loop through the standard `sqlite3`
  driver: a local SQLite call takes microseconds, while aiosqlite's hop to its
  thread and back costs more than the query, four times per statement. Nothing
  may block the loop for long, so the busy timeout is short and a locked
  database (another process writing) is retried with an async back-off, and
  WAL checkpoints (the one slow, fsyncing step) run in a thread
  (`checkpoint()`). The aiosqlite engine remains for the migrations.

Hot statements are built once, with bind parameters, so SQLAlchemy compiles
and caches each of them a single time. The rotation's statements and rules
(when a token is refused, the spend, the successor's expiry) come from
`rotation.py`, shared with the hottest write of all, the plain refresh, which
runs them on the drivers themselves (`fastpath.py`); its errors are retried
and mapped here like everyone else's.

Clients, and on PostgreSQL live sessions, are remembered per process
(`registry.py`) and forgotten when the database's triggers say they changed; a
write made here forgets what it changed itself, after its commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, CursorResult, Engine, Row
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from authserver import metrics
from authserver.config import Settings
from authserver.store import fastpath, rotation
from authserver.store.batching import Batcher
from authserver.store.fastpath import (
    Exchange,
    PgRotator,
    UsedJti,
    sqlite_rotate,
    sqlite_use_jtis,
)
from authserver.store.protocol import (
    AuditEvent,
    AuthorizationCode,
    BrowserSession,
    Client,
    Conflict,
    NotFound,
    RefreshRecord,
    Rotated,
    Session,
    StoreUnavailable,
    TokenStatus,
    User,
)
from authserver.store.registry import PgListener, Registry, SqliteCheck
from authserver.store.schema import (
    Time,
    audit_events,
    authorization_codes,
    browser_sessions,
    clients,
    consents,
    login_addresses,
    login_failures,
    refresh_families,
    refresh_tokens,
    used_jtis,
    users,
)

T = TypeVar("T")
log = logging.getLogger("authserver.store")

_RETRIES = 8
# SQLSTATEs a PostgreSQL transaction may simply be retried after.
_RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03"}
# The migrations' (threaded) connections may wait long; the inline ones must not
# hold the event loop, so they give up at once and retry asynchronously, for up to
# `_SQLITE_LOCK_PATIENCE` seconds in all.
_SQLITE_BUSY_TIMEOUT_MS = 10_000
_SQLITE_INLINE_BUSY_TIMEOUT_MS = 20
_SQLITE_LOCK_PATIENCE = 10.0
# Rows a purge of single-use ids deletes per write (~5 ms on SQLite).
_PURGE_CHUNK = 500


def async_url(url: str) -> str:
    """Map the contract's URL schemes onto SQLAlchemy's async drivers."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    if scheme in {"sqlite", "sqlite+aiosqlite"}:
        return f"sqlite+aiosqlite://{rest}"
    if scheme in {"postgresql", "postgres", "postgresql+asyncpg"}:
        return f"postgresql+asyncpg://{rest}"
    raise ValueError(f"unsupported database URL scheme {scheme!r}")


def create_engine(settings: Settings) -> AsyncEngine:
    """The async engine: the store's engine on PostgreSQL, the migrations' on SQLite."""
    url = async_url(settings.database_url)
    if url.startswith("sqlite"):
        _create_private_file(sa.make_url(url).database)
        engine = create_async_engine(
            url,
            connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=2,
            max_overflow=0,
        )
        _configure_sqlite(engine.sync_engine, busy_timeout_ms=_SQLITE_BUSY_TIMEOUT_MS)
        return engine
    return create_async_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        pool_timeout=settings.database_pool_timeout,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=_pg_session_args(settings),
    )


def _create_private_file(database: str | None) -> None:
    """Create the SQLite file readable by its owner alone, before SQLite does (SQLite
    then gives its -wal and -shm files the same mode); warn about one that is not."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning(
                "database file %s is accessible by group or others (mode %o): it holds "
                "password hashes; fix it with: chmod 600 %s",
                path,
                mode,
                path,
            )
        return
    except OSError:
        return  # a missing directory: SQLite's own error names the problem
    os.close(fd)


def _pg_session_args(settings: Settings) -> dict[str, Any]:
    """What every asyncpg connection of ours is opened with, besides the URL's own."""
    return {
        "timeout": settings.database_connect_timeout,
        "command_timeout": settings.database_statement_timeout,
        "server_settings": {"application_name": "authserver"},
    }


# Options SQLAlchemy's asyncpg dialect takes from the URL for itself, not for asyncpg.
_SQLALCHEMY_ONLY_ARGS = frozenset(
    {
        "async_fallback",
        "async_creator_fn",
        "prepared_statement_cache_size",
        "prepared_statement_name_func",
    }
)


def _raw_connect_args(engine: AsyncEngine, settings: Settings) -> dict[str, Any]:
    """What asyncpg itself is given to connect exactly as `engine` does."""
    _, from_url = engine.dialect.create_connect_args(engine.url)
    args = {k: v for k, v in from_url.items() if k not in _SQLALCHEMY_ONLY_ARGS}
    args.update(_pg_session_args(settings))
    return args


def _create_rotator(engine: AsyncEngine, settings: Settings) -> PgRotator:
    """The raw asyncpg pool for the plain refresh and the hot reads."""
    return PgRotator(
        _raw_connect_args(engine, settings),
        max_size=settings.database_pool_size,
        wait=settings.database_pool_timeout,
    )


def _create_inline_engine(url: AsyncEngine) -> Engine:
    """A `sqlite3` engine on the same file, for statements run on the event loop."""
    engine = sa.create_engine(
        url.url.set(drivername="sqlite+pysqlite"),
        # Only the event-loop thread uses these connections; the pool may be
        # created and disposed of from elsewhere.
        connect_args={"timeout": _SQLITE_INLINE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        pool_size=4,
        max_overflow=4,
    )
    _configure_sqlite(engine, busy_timeout_ms=_SQLITE_INLINE_BUSY_TIMEOUT_MS, checkpoint=False)
    return engine


_SQLITE_WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes


def _configure_sqlite(engine: Engine, *, busy_timeout_ms: int, checkpoint: bool = True) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over transaction control from the driver so BEGIN can be IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL + NORMAL keeps every commit atomic; only the last commits before a
        # power loss may be lost, never half of one.
        cursor.execute("PRAGMA synchronous=NORMAL")
        # Under steady writes the WAL file can grow past 100 MB before a checkpoint
        # catches up; once the log restarts, the file is cut back to this size.
        cursor.execute(f"PRAGMA journal_size_limit={_SQLITE_WAL_SIZE_LIMIT}")
        if not checkpoint:
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("sqlite_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


class Executor(Protocol):
    """What the queries need of a connection, async or inline alike."""

    async def execute(
        self, statement: sa.Executable, parameters: Any = None
    ) -> CursorResult[Any]: ...


class _AsyncExecutor:
    def __init__(self, conn: Executor) -> None:
        self._conn = conn

    async def execute(self, statement: sa.Executable, parameters: Any = None) -> CursorResult[Any]:
        return await self._conn.execute(statement, parameters)


class _InlineExecutor:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def execute(self, statement: sa.Executable, parameters: Any = None) -> CursorResult[Any]:
        return self._conn.execute(statement, parameters)


async def _let_others_in() -> None:
    """Hand the event loop to whatever is ready, before an inline SQLite transaction
    and after its commit.

    Inline transactions never wait for I/O, so a request that makes several of them
    (a login makes about ten, then logs and signs) would otherwise hold the loop from
    its first to its last, and every request arriving meanwhile would wait behind
    them all; asyncpg waits at each statement anyway. /protected's p99 under a stream
    of logins (`python -m bench --only login`): 1.3 to 1.9 ms with the loop handed
    over at a few of the login's own steps only, 0.5 to 0.7 ms with it handed over
    here (0.5 to 0.9 ms idle). Never inside a transaction: the write lock would be
    held while other requests run.
    """
    await asyncio.sleep(0)


# What the drivers raise beneath SQLAlchemy, and directly on the fast path.
_DRIVER_ERRORS = (sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError)


def _driver_error(exc: BaseException) -> BaseException:
    return exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc


def _retryable(exc: BaseException) -> bool:
    orig = _driver_error(exc)
    if getattr(orig, "sqlstate", None) in _RETRYABLE_SQLSTATES:
        return True
    message = str(orig).lower()
    return "database is locked" in message or "database is busy" in message


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (PoolTimeout, OSError, asyncio.TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, (InterfaceError, OperationalError))
    ):
        return True
    if isinstance(exc, (sqlite3.OperationalError, sqlite3.InterfaceError, asyncpg.InterfaceError)):
        return True  # the fast path's drivers, unwrapped
    sqlstate = getattr(_driver_error(exc), "sqlstate", None) or ""
    # Class 08: connection exception; 57P: operator intervention (shutdown);
    # 53: insufficient resources; 3D000 / 28: the database or role is gone
    # (dropped, renamed), which a server sees only when it reconnects;
    # 57014: a query the server cancelled (its own statement_timeout);
    # 25006: a read-only server, as an old primary is after a failover.
    return sqlstate.startswith(("08", "57P", "53", "3D", "28", "57014", "25006"))


def _shared_failure(exc: Exception) -> bool:
    """Whether every request of a failed batch would have failed alone (`batching.py`)."""
    return isinstance(exc, StoreUnavailable)


def _unavailable_error(exc: BaseException) -> StoreUnavailable:
    """The one way a driver's failure leaves the store as unavailable, and is counted."""
    metrics.DATABASE_ERRORS.inc()
    return StoreUnavailable(type(exc).__name__)


def _record(row: Row[Any]) -> RefreshRecord:
    m = row._mapping
    return RefreshRecord(
        token_hash=m["token_hash"],
        family_id=m["family_id"],
        parent_hash=m["parent_hash"],
        successor_hash=m["successor_hash"],
        status=m["status"],
        scope=m["scope"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        spent_at=m["spent_at"],
        client_id=m["client_id"],
        user_id=m["user_id"],
        username=m["username"],
        refusal=m["refusal"],
        dpop_jkt=m["dpop_jkt"],
    )


def _user(row: Row[Any]) -> User:
    m = row._mapping
    return User(
        id=m["id"],
        username=m["username"],
        password_hash=m["password_hash"],
        disabled=bool(m["disabled"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
    )


_GET_REFRESH = (
    sa.select(
        refresh_tokens,
        refresh_families.c.client_id,
        refresh_families.c.dpop_jkt,
        refresh_families.c.user_id,
        users.c.username,
        rotation.refusal(
            sa.bindparam("b_now", type_=Time), rotation.CLIENT, rotation.DPOP_KEY
        ).label("refusal"),
    )
    .select_from(rotation.TOKEN_FAMILY_USER)
    .where(refresh_tokens.c.token_hash == sa.bindparam("b_hash"))
    .with_for_update(of=refresh_tokens)
)
# The same row as `_GET_REFRESH`, unlocked, and refused (or not) as for its own client.
_FIND_REFRESH = (
    sa.select(
        refresh_tokens,
        refresh_families.c.client_id,
        refresh_families.c.dpop_jkt,
        refresh_families.c.user_id,
        users.c.username,
        rotation.refusal(
            sa.bindparam("b_now", type_=Time),
            refresh_families.c.client_id,
            refresh_families.c.dpop_jkt,
        ).label("refusal"),
    )
    .select_from(rotation.TOKEN_FAMILY_USER)
    .where(refresh_tokens.c.token_hash == sa.bindparam("b_hash"))
)
_PING = sa.select(users.c.id).limit(1)
_GET_USER = sa.select(users).where(users.c.username == sa.bindparam("b_username"))
# FOR SHARE: a password change or disable (which update the row) waits for the login's
# transaction, and then revokes the family it created; or the login waits, and sees it.
_LOCK_USER = sa.select(users).where(users.c.id == sa.bindparam("b_id")).with_for_update(read=True)
_INSERT_FAMILY = refresh_families.insert()
_INSERT_AUDIT = audit_events.insert()
_COUNT_FAILURES = sa.select(sa.func.count(), sa.func.min(login_failures.c.failed_at)).where(
    login_failures.c.key == sa.bindparam("b_key"),
    login_failures.c.failed_at > sa.bindparam("b_since"),
)


_CLIENT_FIELDS = tuple(c.name for c in clients.columns)
_CLIENT_LISTS = ("grants", "scopes", "redirect_uris", "post_logout_redirect_uris")
_GET_CLIENT = fastpath.GET_CLIENT.statement
_SESSION_LIVE = fastpath.SESSION_LIVE.statement


def _live_sessions(where: sa.ColumnElement[bool]) -> sa.Select[Any]:
    """Sessions that can still be refreshed: each family's one active token that the
    rotation's own rule (`rotation.refusal`, as for the family's client) does not refuse.
    That token was issued by the login or the last rotation: its `created_at` is when the
    session was last used, its `expires_at` when it ends unless used again."""
    t, f = refresh_tokens.c, refresh_families.c
    now = sa.bindparam("b_now", type_=Time)
    return (
        sa.select(
            f.id,
            users.c.username,
            f.client_id,
            f.created_at,
            t.created_at.label("last_used_at"),
            t.expires_at,
            f.ip,
            f.user_agent,
        )
        .select_from(rotation.TOKEN_FAMILY_USER)
        .where(
            where, t.status == "active", rotation.refusal(now, f.client_id, f.dpop_jkt).is_(None)
        )
        .order_by(f.created_at, f.id)
    )


_SESSIONS_OF_USER = _live_sessions(users.c.username == sa.bindparam("b_username"))
_SESSION_BY_ID = _live_sessions(refresh_families.c.id == sa.bindparam("b_id"))


async def _sessions(
    conn: Executor, *, now: float, username: str | None, session_id: str | None
) -> list[Session]:
    if (username is None) == (session_id is None):
        raise ValueError("name either a user or a session")
    if username is not None:
        result = await conn.execute(_SESSIONS_OF_USER, {"b_username": username, "b_now": now})
    else:
        result = await conn.execute(_SESSION_BY_ID, {"b_id": session_id, "b_now": now})
    return [Session(**row._mapping) for row in result]


_KNOWN_ADDRESS = sa.select(login_addresses.c.user_id).where(
    login_addresses.c.user_id == sa.bindparam("b_user"),
    login_addresses.c.network_key == sa.bindparam("b_key"),
    login_addresses.c.last_success_at > sa.bindparam("b_since"),
)


def _remember_address(insert: Any) -> sa.Executable:
    """Every successful login's upsert, built once: building it (`excluded` above all)
    cost more than running it."""
    statement = insert(login_addresses)
    upsert: sa.Executable = statement.on_conflict_do_update(
        index_elements=[login_addresses.c.user_id, login_addresses.c.network_key],
        set_={"last_success_at": statement.excluded.last_success_at},
    )
    return upsert


_REMEMBER_ADDRESS_SQLITE = _remember_address(sqlite_insert)
_REMEMBER_ADDRESS_PG = _remember_address(pg_insert)


@dataclass(slots=True)
class _Changed:
    """What a write changed that the process's registry may remember: forgotten after
    the commit, before the request that wrote answers (other processes hear of it from
    the database's triggers). A failed or retried write forgets too: harmless."""

    clients: bool = False
    sessions: set[str] = field(default_factory=set)
    all_sessions: bool = False

    def forget(self, registry: Registry) -> None:
        if self.clients:
            registry.forget_clients()
        if self.all_sessions:
            registry.forget_sessions()
        for family_id in self.sessions:
            registry.forget_session(family_id)


class SqlTransaction:
    """`RefreshTransaction` on one open connection."""

    def __init__(self, conn: Executor, changed: _Changed | None = None) -> None:
        self._conn = conn
        self._changed = changed if changed is not None else _Changed()

    async def get_refresh(
        self, token_hash: str, *, now: float, client_id: str | None, dpop_jkt: str | None = None
    ) -> RefreshRecord | None:
        params = {"b_hash": token_hash, "b_now": now, "b_client": client_id, "b_jkt": dpop_jkt}
        row = (await self._conn.execute(_GET_REFRESH, params)).first()
        return _record(row) if row is not None else None

    async def get_user(self, username: str) -> User | None:
        return await _get_user(self._conn, username)

    async def lock_user(self, user_id: int) -> User | None:
        row = (await self._conn.execute(_LOCK_USER, {"b_id": user_id})).first()
        return _user(row) if row is not None else None

    async def create_family(
        self,
        *,
        family_id: str,
        user_id: int,
        client_id: str,
        created_at: float,
        expires_at: float,
        ip: str | None = None,
        user_agent: str | None = None,
        dpop_jkt: str | None = None,
    ) -> None:
        await self._conn.execute(
            _INSERT_FAMILY,
            {
                "id": family_id,
                "user_id": user_id,
                "client_id": client_id,
                "created_at": created_at,
                "expires_at": expires_at,
                "ip": ip,
                "user_agent": user_agent,
                "dpop_jkt": dpop_jkt,
                "dpop_bound_at": None if dpop_jkt is None else created_at,
            },
        )

    async def add_refresh(
        self,
        *,
        token_hash: str,
        family_id: str,
        parent_hash: str | None,
        scope: str,
        created_at: float,
        refresh_ttl: int,
    ) -> None:
        await self._conn.execute(
            rotation.ISSUE,
            {
                "b_token": token_hash,
                "b_family": family_id,
                "b_parent": parent_hash,
                "b_scope": scope,
                "b_now": created_at,
                "b_ttl": refresh_ttl,
            },
        )

    async def spend_refresh(
        self, token_hash: str, *, expected: TokenStatus, successor_hash: str, at: float
    ) -> bool:
        result = await self._conn.execute(
            rotation.SPEND,
            {
                "b_hash": token_hash,
                "b_expected": expected,
                "b_successor": successor_hash,
                "b_at": at,
            },
        )
        return result.rowcount == 1

    async def revoke_token(self, token_hash: str) -> None:
        await self._conn.execute(
            refresh_tokens.update()
            .where(refresh_tokens.c.token_hash == token_hash)
            .values(status="revoked")
        )

    async def bind_family(self, family_id: str, dpop_jkt: str, *, at: float) -> None:
        f = refresh_families.c
        await self._conn.execute(
            refresh_families.update()
            .where(f.id == family_id, f.dpop_jkt.is_(None))
            .values(dpop_jkt=dpop_jkt, dpop_bound_at=at)
        )

    async def revoke_family(self, family_id: str, *, at: float, reason: str) -> bool:
        self._changed.sessions.add(family_id)
        # Tokens before families, the order `revoke_user_families` locks in too.
        await self._conn.execute(
            refresh_tokens.update()
            .where(refresh_tokens.c.family_id == family_id, refresh_tokens.c.status == "active")
            .values(status="revoked")
        )
        result = await self._conn.execute(
            refresh_families.update()
            .where(refresh_families.c.id == family_id, refresh_families.c.revoked_at.is_(None))
            .values(revoked_at=at, revoked_reason=reason)
        )
        return result.rowcount == 1

    async def live_sessions(
        self, *, now: float, username: str | None = None, session_id: str | None = None
    ) -> Sequence[Session]:
        return await _sessions(self._conn, now=now, username=username, session_id=session_id)

    async def add_audit_event(self, event: AuditEvent) -> None:
        await _add_audit_event(self._conn, event)

    async def add_user(self, username: str, password_hash: str, *, at: float) -> User:
        result = await self._conn.execute(
            users.insert().values(
                username=username,
                password_hash=password_hash,
                disabled=False,
                created_at=at,
                updated_at=at,
            )
        )
        (user_id,) = result.inserted_primary_key or (0,)
        return User(user_id, username, password_hash, False, at, at)

    async def update_user(
        self,
        user_id: int,
        *,
        at: float,
        password_hash: str | None = None,
        disabled: bool | None = None,
    ) -> None:
        values: dict[str, Any] = {"updated_at": at}
        if password_hash is not None:
            values["password_hash"] = password_hash
        if disabled is not None:
            values["disabled"] = disabled
        await self._conn.execute(users.update().where(users.c.id == user_id).values(**values))

    async def revoke_user_families(self, user_id: int, *, at: float, reason: str) -> int:
        self._changed.all_sessions = True
        ids = sa.select(refresh_families.c.id).where(
            refresh_families.c.user_id == user_id, refresh_families.c.revoked_at.is_(None)
        )
        # Tokens before families, the order `revoke_family` locks in too.
        await self._conn.execute(
            refresh_tokens.update()
            .where(refresh_tokens.c.family_id.in_(ids), refresh_tokens.c.status == "active")
            .values(status="revoked")
        )
        result = await self._conn.execute(
            refresh_families.update()
            .where(refresh_families.c.user_id == user_id, refresh_families.c.revoked_at.is_(None))
            .values(revoked_at=at, revoked_reason=reason)
        )
        return result.rowcount

    async def get_client(self, client_id: str) -> Client | None:
        return await _get_client(self._conn, client_id)

    async def add_client(self, client: Client) -> None:
        self._changed.clients = True
        await self._conn.execute(clients.insert().values(**_client_row(client)))

    async def update_client(self, client: Client) -> bool:
        self._changed.clients = True
        result = await self._conn.execute(
            clients.update()
            .where(clients.c.client_id == client.client_id)
            .values(**_client_row(client))
        )
        return result.rowcount == 1

    async def delete_client(self, client_id: str) -> bool:
        self._changed.clients = True
        # Its users' consents go with it: a client registered later under the same id
        # must ask again.
        await self._conn.execute(consents.delete().where(consents.c.client_id == client_id))
        result = await self._conn.execute(clients.delete().where(clients.c.client_id == client_id))
        return result.rowcount == 1

    async def revoke_client_families(self, client_id: str, *, at: float, reason: str) -> int:
        self._changed.all_sessions = True
        live = refresh_families.c.client_id == client_id, refresh_families.c.revoked_at.is_(None)
        # Tokens before families, the order `revoke_family` locks in too.
        await self._conn.execute(
            refresh_tokens.update()
            .where(
                refresh_tokens.c.family_id.in_(sa.select(refresh_families.c.id).where(*live)),
                refresh_tokens.c.status == "active",
            )
            .values(status="revoked")
        )
        result = await self._conn.execute(
            refresh_families.update().where(*live).values(revoked_at=at, revoked_reason=reason)
        )
        return result.rowcount

    async def use_code(self, code_hash: str, *, family_id: str, now: float) -> bool:
        result = await self._conn.execute(
            authorization_codes.update()
            .where(
                authorization_codes.c.code_hash == code_hash,
                authorization_codes.c.used_at.is_(None),
                authorization_codes.c.expires_at > now,
            )
            .values(used_at=now, family_id=family_id)
        )
        return result.rowcount == 1


_LIVE_BROWSER_SESSION = (
    sa.select(
        browser_sessions.c.id,
        browser_sessions.c.user_id,
        users.c.username,
        browser_sessions.c.auth_time,
        browser_sessions.c.expires_at,
    )
    .select_from(browser_sessions.join(users, users.c.id == browser_sessions.c.user_id))
    .where(
        browser_sessions.c.token_hash == sa.bindparam("b_hash"),
        browser_sessions.c.ended_at.is_(None),
        browser_sessions.c.expires_at > sa.bindparam("b_now", type_=Time),
        users.c.disabled.is_(False),
        # A password change or a disable since the sign-in ends the session (`users.py`).
        users.c.updated_at <= browser_sessions.c.auth_time,
    )
)


def _client_row(client: Client) -> dict[str, Any]:
    row = {field: getattr(client, field) for field in _CLIENT_FIELDS}
    for name in _CLIENT_LISTS:
        value = row[name]
        row[name] = None if value is None else json.dumps(list(value))
    return row


def _client(row: Row[Any] | dict[str, Any]) -> Client:
    m = dict(row) if isinstance(row, dict) else dict(row._mapping)
    for name in _CLIENT_LISTS:
        m[name] = None if m[name] is None else tuple(json.loads(m[name]))
    for name in ("public", "third_party", "require_dpop", "disabled"):
        m[name] = bool(m[name])
    return Client(**m)


def _fields(code: AuthorizationCode) -> dict[str, Any]:
    return {c.name: getattr(code, c.name) for c in authorization_codes.columns}


async def _get_client(conn: Executor, client_id: str) -> Client | None:
    row = (await conn.execute(_GET_CLIENT, {"b_id": client_id})).first()
    return _client(row) if row is not None else None


async def _add_audit_event(conn: Executor, event: AuditEvent) -> None:
    await conn.execute(
        _INSERT_AUDIT,
        {
            "at": event.at,
            "event": event.event,
            "username": event.username,
            "client_addr": event.client_addr,
            "request_id": event.request_id,
            "details": json.dumps(event.details, separators=(",", ":"), default=str),
        },
    )


async def _get_user(conn: Executor, username: str) -> User | None:
    row = (await conn.execute(_GET_USER, {"b_username": username})).first()
    return _user(row) if row is not None else None


class SqlStore:
    """The `Store` protocol over SQLAlchemy: asyncpg, or SQLite run inline."""

    def __init__(
        self,
        engine: AsyncEngine,
        rotator: PgRotator | None = None,
        listener_args: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self._rotator = rotator
        self._sqlite = engine.dialect.name == "sqlite"
        # Remembered clients (and live sessions): `registry.py`. On PostgreSQL only while
        # the listener is connected; without one (no `listener_args`), never.
        self.registry = Registry(on=self._sqlite)
        self._sqlite_check = SqliteCheck(self.registry) if self._sqlite else None
        self.listener = (
            PgListener(listener_args, self.registry)
            if listener_args is not None and not self._sqlite
            else None
        )
        self._inline = _create_inline_engine(engine) if self._sqlite else None
        self._writer: Connection | None = None
        self._reader: Connection | None = None
        # Within one process, queue SQLite writers on the event loop: only one
        # may hold the write lock, and an inline writer must never wait for it.
        self._write_lock = asyncio.Lock() if self._sqlite else None
        # Group commit of the plain rotations (`batching.py`).
        self._rotations: Batcher[Exchange, Rotated | None] = Batcher(
            self._rotate_batch, shared_failure=_shared_failure
        )
        self._jtis: Batcher[UsedJti, bool] = Batcher(self._use_jtis, shared_failure=_shared_failure)

    @classmethod
    def from_settings(cls, settings: Settings) -> SqlStore:
        if settings.is_sqlite:
            return cls(create_engine(settings))
        engine = create_engine(settings)
        return cls(engine, _create_rotator(engine, settings), _raw_connect_args(engine, settings))

    async def close(self) -> None:
        for kept in (self._writer, self._reader):
            if kept is not None:
                kept.close()
        self._writer = self._reader = None
        if self.listener is not None:
            await self.listener.close()
        if self._inline is not None:
            self._inline.dispose()
        if self._rotator is not None:
            await self._rotator.close()
        await self.engine.dispose()

    async def checkpoint(self) -> None:
        """Fold SQLite's WAL into the database file, in a thread (it fsyncs): first beside
        this process's writes, then once more while they wait (the loop itself never does).

        With no write of its own landing meanwhile, the second pass reaches the end of
        the log, and the next write starts the log over from its beginning. Under a
        steady stream of writes (a DPoP proof's id per request) a checkpoint beside
        them never did: the log only grew (80 MB in a minute of the DPoP benchmark)
        and every write cost more (DPoP /protected: 270 to 294 µs of CPU a request,
        against 235 to 267 µs with the writes waiting). The first pass copies and
        syncs nearly all of it, so the writes wait only for what came meanwhile: DPoP
        /protected's p99 under that load fell from 30-35 ms (one pass, the writes
        waiting throughout) to 9 ms, at the same throughput."""
        if self._write_lock is None:
            return
        await asyncio.to_thread(self._checkpoint)
        async with self._write_lock:
            await asyncio.to_thread(self._checkpoint)

    def _checkpoint(self) -> None:
        if self._inline is None or not self.engine.url.database:
            return
        conn = sqlite3.connect(self.engine.url.database, timeout=_SQLITE_BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    @contextlib.contextmanager
    def _inline_connection(self, *, write: bool) -> Iterator[Executor]:
        """One transaction on a kept-open connection: the writer's, or the reader's.

        Writers queue on `_write_lock`, and inline reads never yield to the loop,
        so each kept connection serves one transaction at a time; should a read
        find the reader busy all the same, it takes a pooled connection.
        """
        assert self._inline is not None
        reader = self._reader
        if not write and reader is not None and not reader.closed and reader.in_transaction():
            with self._inline.connect() as conn, conn.begin():
                yield _InlineExecutor(conn)
            return
        if write:
            kept = self._kept_writer()
        elif reader is None or reader.closed:
            kept = self._reader = self._inline.connect()
        else:
            kept = reader
        with kept.begin():
            yield _InlineExecutor(kept)

    def _raw_reader(self) -> sqlite3.Connection | None:
        """The kept SQLite reader's `sqlite3` connection, if no transaction is open on it:
        a statement outside one reads the latest commit of any process."""
        assert self._inline is not None
        reader = self._reader
        if reader is None or reader.closed:
            reader = self._reader = self._inline.connect()
        if reader.in_transaction():
            return None
        raw = reader.connection.dbapi_connection
        if not isinstance(raw, sqlite3.Connection) or raw.in_transaction:
            return None
        return raw

    def _kept_writer(self) -> Connection:
        """The process's one SQLite writer connection; call with `_write_lock` held."""
        assert self._inline is not None
        kept = self._writer
        if kept is None or kept.closed or kept.in_transaction():
            kept = self._inline.connect().execution_options(sqlite_write=True)
            self._writer = kept
        return kept

    async def _rotate_batch(self, exchanges: Sequence[Exchange]) -> list[Rotated | None]:
        return await self._raw_write(
            lambda rotator: rotator.rotate(exchanges), lambda raw: sqlite_rotate(raw, exchanges)
        )

    async def _raw_write(
        self,
        pg: Callable[[PgRotator], Awaitable[T]],
        sqlite: Callable[[sqlite3.Connection], T],
    ) -> T:
        """A write on the raw driver (`fastpath.py`), retried while merely contended:
        `pg` on asyncpg's pool, or `sqlite` on the kept writer under the write lock."""
        rotator, write_lock = self._rotator, self._write_lock
        if rotator is not None:
            return await self._retrying(lambda: pg(rotator))
        assert write_lock is not None

        async def once() -> T:
            async with write_lock:
                writer = self._kept_writer()
                raw = writer.connection.dbapi_connection
                assert isinstance(raw, sqlite3.Connection)
                try:
                    return sqlite(raw)
                finally:
                    if raw.in_transaction:  # its rollback failed: start the next one afresh
                        writer.invalidate()
                        self._writer = None

        return await self._retrying(once)

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[Executor]:
        try:
            if self._inline is not None:
                await _let_others_in()
                with self._inline_connection(write=False) as inline:
                    yield inline
            else:
                async with self.engine.connect() as conn:
                    yield _AsyncExecutor(conn)
        except (TimeoutError, DBAPIError, PoolTimeout, OSError) as exc:
            if isinstance(exc, IntegrityError) or not _unavailable(exc):
                raise
            raise _unavailable_error(exc) from exc

    @contextlib.asynccontextmanager
    async def _write_once(self) -> AsyncIterator[Executor]:
        if self._write_lock is not None:
            await _let_others_in()
            async with self._write_lock:
                with self._inline_connection(write=True) as inline:
                    yield inline
            return
        async with self.engine.connect() as conn, conn.begin():
            yield _AsyncExecutor(conn)

    async def atomic(self, work: Callable[[SqlTransaction], Awaitable[T]]) -> T:
        changed = _Changed()
        try:
            return await self._run_write(
                lambda conn: work(SqlTransaction(conn, changed)),
                then=lambda: changed.forget(self.registry),
            )
        except IntegrityError as exc:
            raise Conflict(type(exc.orig).__name__ if exc.orig else "IntegrityError") from exc

    async def rotate_active(
        self,
        *,
        token_hash: str,
        successor_hash: str,
        now: float,
        refresh_ttl: int,
        event: AuditEvent,
        client_id: str | None,
        dpop_jkt: str | None = None,
        bind: bool = False,
    ) -> Rotated | None:
        exchange = Exchange(
            token_hash,
            successor_hash,
            now,
            refresh_ttl,
            event,
            client_id,
            dpop_jkt,
            bind_jkt=dpop_jkt if bind else None,
        )
        return await self._rotations.submit(exchange)

    async def _run_write(
        self, work: Callable[[Executor], Awaitable[T]], *, then: Callable[[], object] | None = None
    ) -> T:
        """Run `work` in a write transaction, retried while contended; `then` runs once it
        is over, committed or not, before an inline write hands the loop over."""

        async def once() -> T:
            async with self._write_once() as conn:
                return await work(conn)

        try:
            result = await self._retrying(once)
        finally:
            if then is not None:
                then()
        if self._inline is not None:
            await _let_others_in()
        return result

    async def _retrying(self, once: Callable[[], Awaitable[T]]) -> T:
        """Run one write attempt until it is not merely contended, or give up with a 503."""
        delay = 0.002 if self._sqlite else 0.005
        deadline = time.monotonic() + _SQLITE_LOCK_PATIENCE
        attempt = 0
        while True:
            attempt += 1
            try:
                return await once()
            except (
                IntegrityError,
                sqlite3.IntegrityError,
                asyncpg.IntegrityConstraintViolationError,
            ):
                raise
            except (DBAPIError, *_DRIVER_ERRORS) as exc:
                # SQLite: another process holds the write lock; PostgreSQL: a
                # deadlock or serialization failure. Either way, try again.
                more = time.monotonic() < deadline if self._sqlite else attempt < _RETRIES
                if _retryable(exc) and more:
                    log.debug("store.retry", extra={"attempt": attempt})
                    await asyncio.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 0.1 if self._sqlite else 0.5)
                    continue
                if _retryable(exc) or _unavailable(exc):
                    raise _unavailable_error(exc) from exc
                raise
            except (TimeoutError, PoolTimeout, OSError) as exc:
                raise _unavailable_error(exc) from exc

    async def ping(self) -> None:
        # A table of ours, not `SELECT 1`: a database without the schema is no use either.
        try:
            async with self._read() as conn:
                await conn.execute(_PING)
        except DBAPIError as exc:
            raise _unavailable_error(exc) from exc

    # -- users ---------------------------------------------------------------

    async def get_user(self, username: str) -> User | None:
        async with self._read() as conn:
            return await _get_user(conn, username)

    async def add_user(self, username: str, password_hash: str, *, at: float) -> User:
        return await self.atomic(lambda tx: tx.add_user(username, password_hash, at=at))

    async def upgrade_password_hash(self, user_id: int, old_hash: str, new_hash: str) -> None:
        # Conditional, so a password changed meanwhile is never overwritten.
        async def work(conn: Executor) -> None:
            await conn.execute(
                users.update()
                .where(users.c.id == user_id, users.c.password_hash == old_hash)
                .values(password_hash=new_hash)
            )

        await self._run_write(work)

    async def set_disabled(self, username: str, disabled: bool, *, at: float) -> User:
        async def work(tx: SqlTransaction) -> User | None:
            user = await tx.get_user(username)
            if user is None:
                return None
            await tx.update_user(user.id, at=at, disabled=disabled)
            return replace(user, disabled=disabled, updated_at=at)

        user = await self.atomic(work)
        if user is None:
            raise NotFound(username)
        return user

    async def list_users(self) -> Sequence[User]:
        async with self._read() as conn:
            rows = (await conn.execute(sa.select(users).order_by(users.c.username))).all()
        return [_user(row) for row in rows]

    # -- housekeeping ----------------------------------------------------------

    async def purge_expired(self, *, now: float) -> int:
        """Delete families that can no longer yield a token, and stale failure rows."""

        async def work(conn: Executor) -> int:
            live = sa.select(refresh_tokens.c.family_id).where(
                refresh_tokens.c.status == "active", refresh_tokens.c.expires_at > now
            )
            dead = sa.or_(
                refresh_families.c.expires_at <= now,
                refresh_families.c.revoked_at.is_not(None),
                refresh_families.c.id.not_in(live),
            )
            ids = sa.select(refresh_families.c.id).where(dead)
            await conn.execute(refresh_tokens.delete().where(refresh_tokens.c.family_id.in_(ids)))
            result = await conn.execute(refresh_families.delete().where(dead))
            return result.rowcount

        try:
            return await self._run_write(work)
        finally:
            self.registry.forget_sessions()

    # -- login failures --------------------------------------------------------

    async def add_login_failure(self, keys: Sequence[str], *, at: float) -> None:
        async def work(conn: Executor) -> None:
            await conn.execute(login_failures.insert(), [{"key": k, "failed_at": at} for k in keys])

        await self._run_write(work)

    async def login_failures(self, key: str, *, since: float) -> tuple[int, float | None]:
        async with self._read() as conn:
            result = await conn.execute(_COUNT_FAILURES, {"b_key": key, "b_since": since})
            row: Any = result.one()
            count, oldest = row
        return int(count), oldest

    async def clear_login_failures(self, key: str) -> None:
        async def work(conn: Executor) -> None:
            await conn.execute(login_failures.delete().where(login_failures.c.key == key))

        await self._run_write(work)

    async def purge_login_failures(self, *, before: float) -> int:
        async def work(conn: Executor) -> int:
            return (
                await conn.execute(
                    login_failures.delete().where(login_failures.c.failed_at <= before)
                )
            ).rowcount

        return await self._run_write(work)

    async def remember_login_address(self, user_id: int, network_key: str, *, at: float) -> None:
        upsert = _REMEMBER_ADDRESS_SQLITE if self._sqlite else _REMEMBER_ADDRESS_PG
        row = {"user_id": user_id, "network_key": network_key, "last_success_at": at}

        async def work(conn: Executor) -> None:
            await conn.execute(upsert, row)

        await self._run_write(work)

    async def is_login_address(self, user_id: int, network_key: str, *, since: float) -> bool:
        async with self._read() as conn:
            result = await conn.execute(
                _KNOWN_ADDRESS, {"b_user": user_id, "b_key": network_key, "b_since": since}
            )
            return result.first() is not None

    async def purge_login_addresses(self, *, before: float) -> int:
        async def work(conn: Executor) -> int:
            result = await conn.execute(
                login_addresses.delete().where(login_addresses.c.last_success_at <= before)
            )
            return result.rowcount

        return await self._run_write(work)

    # -- clients ---------------------------------------------------------------

    async def get_client(self, client_id: str) -> Client | None:
        registry, guard = self.registry, self._look()
        if guard is not None and (client := registry.client(client_id)) is not None:
            return client
        row = await self._fast_read(fastpath.GET_CLIENT, b_id=client_id)
        if row is None:
            return None
        client = _client(row)
        registry.keep_client(guard, client)
        return client

    async def list_clients(self) -> Sequence[Client]:
        async with self._read() as conn:
            rows = (await conn.execute(sa.select(clients).order_by(clients.c.client_id))).all()
        return [_client(row) for row in rows]

    async def find_refresh(self, token_hash: str, *, now: float) -> RefreshRecord | None:
        async with self._read() as conn:
            row = (await conn.execute(_FIND_REFRESH, {"b_hash": token_hash, "b_now": now})).first()
        return _record(row) if row is not None else None

    async def session_live(self, family_id: str) -> bool:
        registry, guard = self.registry, self._session_guard(self._look())
        if guard is not None and registry.session_live(family_id):
            return True
        live = await self._fast_read(fastpath.SESSION_LIVE, b_id=family_id) is not None
        if live:
            registry.keep_session(guard, family_id)
        return live

    async def get_client_and_session(
        self, client_id: str, family_id: str
    ) -> tuple[Client | None, bool]:
        registry, guard = self.registry, self._look()
        session_guard = self._session_guard(guard)
        if guard is not None and (client := registry.client(client_id)) is not None:
            if session_guard is not None and registry.session_live(family_id):
                return client, True
            live = await self._fast_read(fastpath.SESSION_LIVE, b_id=family_id) is not None
        else:
            row = await self._fast_read(
                fastpath.CLIENT_AND_SESSION, b_id=client_id, b_sid=family_id
            )
            if row is None:
                return None, False
            live = bool(row.pop("session_live"))
            client = _client(row)
            registry.keep_client(guard, client)
        if live:
            registry.keep_session(session_guard, family_id)
        return client, live

    def _look(self) -> int | None:
        """Make the registry current for a hot read: its guard (`Registry.guard`), or
        None when it may be neither used nor added to."""
        check = self._sqlite_check
        if check is not None:
            raw = self._raw_reader()
            if raw is None:
                return None
            try:
                check.check(raw)
            except sqlite3.Error as exc:
                if _unavailable(exc):
                    raise _unavailable_error(exc) from exc
                raise
        elif self.listener is not None:
            self.listener.check()
        return self.registry.guard()

    def _session_guard(self, guard: int | None) -> int | None:
        # Sessions are remembered on PostgreSQL only: SQLite's read is local and cheap,
        # while its data version moves with every login and refresh anyway.
        return guard if self.listener is not None else None

    async def _fast_read(self, read: fastpath.Read, **values: Any) -> dict[str, Any] | None:
        """A hot read on the driver itself (`fastpath.py`): asyncpg's pool, or the
        SQLite reader connection, inline like every SQLite read here."""
        try:
            if self._rotator is not None:
                return await self._rotator.fetch_one(read, **values)
            raw = self._raw_reader()
            if raw is not None:
                return fastpath.sqlite_fetch_one(raw, read, **values)
            async with self._read() as conn:
                row = (await conn.execute(read.statement, values)).first()
                return None if row is None else dict(row._mapping)
        except (TimeoutError, PoolTimeout, OSError, *_DRIVER_ERRORS) as exc:
            if _unavailable(exc):
                raise _unavailable_error(exc) from exc
            raise

    async def live_sessions(
        self, *, now: float, username: str | None = None, session_id: str | None = None
    ) -> Sequence[Session]:
        async with self._read() as conn:
            return await _sessions(conn, now=now, username=username, session_id=session_id)

    async def use_jti(self, key: str, *, expires_at: float, now: float) -> bool:
        # Every DPoP-protected request records its proof here: on the raw driver
        # (fastpath.py), the ids of one loop turn together (batching.py).
        return await self._jtis.submit(UsedJti(key, expires_at, now))

    async def _use_jtis(self, jtis: Sequence[UsedJti]) -> list[bool]:
        return await self._raw_write(
            lambda rotator: rotator.use_jtis(jtis), lambda raw: sqlite_use_jtis(raw, jtis)
        )

    async def purge_used_jtis(self, *, before: float, chunk: int = _PURGE_CHUNK) -> int:
        # In chunks, each its own short write: on SQLite a write holds the event loop,
        # and a purge may find a whole window of a busy server's proofs expired.
        expired = sa.select(used_jtis.c.key).where(used_jtis.c.expires_at <= before).limit(chunk)
        statement = used_jtis.delete().where(used_jtis.c.key.in_(expired))

        async def work(conn: Executor) -> int:
            return (await conn.execute(statement)).rowcount

        purged = 0
        while True:
            deleted = await self._run_write(work)
            purged += deleted
            if deleted < chunk:
                return purged
            await asyncio.sleep(0)  # the requests waiting go first

    # -- browser sign-in --------------------------------------------------------

    async def add_code(self, code: AuthorizationCode) -> None:
        async def work(conn: Executor) -> None:
            await conn.execute(authorization_codes.insert().values(**_fields(code)))

        await self._run_write(work)

    async def find_code(self, code_hash: str) -> tuple[AuthorizationCode, str] | None:
        query = (
            sa.select(authorization_codes, users.c.username)
            .select_from(
                authorization_codes.join(users, users.c.id == authorization_codes.c.user_id)
            )
            .where(authorization_codes.c.code_hash == code_hash)
        )
        async with self._read() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        fields = dict(row._mapping)
        username = fields.pop("username")
        return AuthorizationCode(**fields), username

    async def start_browser_session(
        self,
        *,
        session_id: str,
        token_hash: str,
        user_id: int,
        auth_time: float,
        expires_at: float,
        event: AuditEvent,
    ) -> None:
        async def work(conn: Executor) -> None:
            await conn.execute(
                browser_sessions.insert().values(
                    id=session_id,
                    token_hash=token_hash,
                    user_id=user_id,
                    auth_time=auth_time,
                    expires_at=expires_at,
                )
            )
            await _add_audit_event(conn, event)

        await self._run_write(work)

    async def get_browser_session(self, token_hash: str, *, now: float) -> BrowserSession | None:
        async with self._read() as conn:
            result = await conn.execute(_LIVE_BROWSER_SESSION, {"b_hash": token_hash, "b_now": now})
            row = result.first()
        return BrowserSession(**row._mapping) if row is not None else None

    async def end_browser_session(self, session_id: str, *, at: float, event: AuditEvent) -> int:
        families = sa.select(authorization_codes.c.family_id).where(
            authorization_codes.c.browser_session_id == session_id,
            authorization_codes.c.family_id.is_not(None),
        )
        live = refresh_families.c.id.in_(families), refresh_families.c.revoked_at.is_(None)

        async def work(conn: Executor) -> int:
            await conn.execute(
                browser_sessions.update()
                .where(browser_sessions.c.id == session_id, browser_sessions.c.ended_at.is_(None))
                .values(ended_at=at)
            )
            # Tokens before families, the order `revoke_family` locks in too.
            await conn.execute(
                refresh_tokens.update()
                .where(
                    refresh_tokens.c.family_id.in_(sa.select(refresh_families.c.id).where(*live)),
                    refresh_tokens.c.status == "active",
                )
                .values(status="revoked")
            )
            result = await conn.execute(
                refresh_families.update()
                .where(*live)
                .values(revoked_at=at, revoked_reason="end_session")
            )
            await _add_audit_event(conn, event)
            return result.rowcount

        try:
            return await self._run_write(work)
        finally:
            self.registry.forget_sessions()

    async def has_consent(self, user_id: int, client_id: str, scope: str) -> bool:
        query = sa.select(consents.c.user_id).where(
            consents.c.user_id == user_id,
            consents.c.client_id == client_id,
            consents.c.scope == scope,
        )
        async with self._read() as conn:
            return (await conn.execute(query)).first() is not None

    async def add_consent(
        self, user_id: int, client_id: str, scope: str, *, at: float, event: AuditEvent
    ) -> None:
        insert = (sqlite_insert if self._sqlite else pg_insert)(consents).values(
            user_id=user_id, client_id=client_id, scope=scope, granted_at=at
        )
        upsert = insert.on_conflict_do_update(
            index_elements=[consents.c.user_id, consents.c.client_id, consents.c.scope],
            set_={"granted_at": insert.excluded.granted_at},
        )

        async def work(conn: Executor) -> None:
            await conn.execute(upsert)
            await _add_audit_event(conn, event)

        await self._run_write(work)

    async def purge_browser_sign_in(self, *, now: float) -> tuple[int, int]:
        """Delete codes and browser sessions that can no longer matter: how many of each."""
        live_sessions = sa.select(browser_sessions.c.id).where(
            browser_sessions.c.ended_at.is_(None), browser_sessions.c.expires_at > now
        )

        async def work(conn: Executor) -> tuple[int, int]:
            # A spent code is kept while its session lives: ending the session revokes
            # the family it was exchanged for.
            codes = await conn.execute(
                authorization_codes.delete().where(
                    authorization_codes.c.expires_at <= now,
                    sa.or_(
                        authorization_codes.c.family_id.is_(None),
                        authorization_codes.c.browser_session_id.not_in(live_sessions),
                    ),
                )
            )
            sessions = await conn.execute(
                browser_sessions.delete().where(
                    sa.or_(
                        browser_sessions.c.ended_at.is_not(None),
                        browser_sessions.c.expires_at <= now,
                    )
                )
            )

            return codes.rowcount, sessions.rowcount

        return await self._run_write(work)

    # -- audit -----------------------------------------------------------------

    async def add_audit_event(self, event: AuditEvent) -> None:
        await self._run_write(lambda conn: _add_audit_event(conn, event))

    async def list_audit_events(
        self,
        *,
        username: str | None = None,
        event: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> Sequence[AuditEvent]:
        query = sa.select(audit_events)
        if username is not None:
            query = query.where(audit_events.c.username == username)
        if event is not None:
            query = query.where(audit_events.c.event == event)
        if since is not None:
            query = query.where(audit_events.c.at >= since)
        # The newest `limit` events, listed oldest first.
        inner = query.order_by(audit_events.c.at.desc(), audit_events.c.id.desc()).limit(limit)
        sub = inner.subquery()
        ordered = sa.select(sub).order_by(sub.c.at, sub.c.id)
        async with self._read() as conn:
            rows = (await conn.execute(ordered)).all()
        return [
            AuditEvent(
                at=r._mapping["at"],
                event=r._mapping["event"],
                username=r._mapping["username"],
                client_addr=r._mapping["client_addr"],
                request_id=r._mapping["request_id"],
                details=json.loads(r._mapping["details"] or "{}"),
            )
            for r in rows
        ]
