"""The one store implementation: SQLAlchemy Core over aiosqlite or asyncpg.

One set of queries serves both backends. What differs is connection set-up:
SQLite runs in WAL mode with a busy timeout and takes its write lock at BEGIN
(`BEGIN IMMEDIATE`), so a read-then-write transaction never dies on a lock
upgrade; PostgreSQL locks the token row with `SELECT ... FOR UPDATE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from authserver.config import Settings
from authserver.store.protocol import (
    AuditEvent,
    Conflict,
    NotFound,
    RefreshRecord,
    StoreUnavailable,
    TokenStatus,
    User,
)
from authserver.store.schema import (
    audit_events,
    login_failures,
    refresh_families,
    refresh_tokens,
    users,
)

T = TypeVar("T")
log = logging.getLogger("authserver.store")

_RETRIES = 8
# SQLSTATEs a PostgreSQL transaction may simply be retried after.
_RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03"}
_SQLITE_BUSY_TIMEOUT_MS = 10_000


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
    url = async_url(settings.database_url)
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url,
            connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=max(2, min(settings.database_pool_size, 8)),
            max_overflow=0,
        )
        _configure_sqlite(engine)
        return engine
    return create_async_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        pool_timeout=settings.database_pool_timeout,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={
            "timeout": settings.database_connect_timeout,
            "command_timeout": settings.database_statement_timeout,
            "server_settings": {"application_name": "authserver"},
        },
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over transaction control from the driver so BEGIN can be IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL + NORMAL keeps every commit atomic; only the last commits before a
        # power loss may be lost, never half of one.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("sqlite_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def _retryable(exc: DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return True
    message = str(exc.orig).lower()
    return "database is locked" in message or "database is busy" in message


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (PoolTimeout, OSError, asyncio.TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or isinstance(exc, (InterfaceError, OperationalError)):
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        # Class 08: connection exception; 57P: operator intervention (shutdown);
        # 53: insufficient resources; 3D000 / 28: the database or role is gone
        # (dropped, renamed), which a server sees only when it reconnects;
        # 57014: a query the server cancelled (its own statement_timeout);
        # 25006: a read-only server, as an old primary is after a failover.
        return sqlstate.startswith(("08", "57P", "53", "3D", "28", "57014", "25006"))
    return False


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
        family_created_at=m["family_created_at"],
        family_expires_at=m["family_expires_at"],
        family_revoked_at=m["family_revoked_at"],
        user_id=m["user_id"],
        username=m["username"],
        user_disabled=m["disabled"],
    )


def _user(row: Row[Any]) -> User:
    m = row._mapping
    return User(
        id=m["id"],
        username=m["username"],
        password_hash=m["password_hash"],
        disabled=bool(m["disabled"]),
        created_at=m["created_at"],
    )


_REFRESH_SELECT = (
    sa.select(
        refresh_tokens,
        refresh_families.c.client_id,
        refresh_families.c.created_at.label("family_created_at"),
        refresh_families.c.expires_at.label("family_expires_at"),
        refresh_families.c.revoked_at.label("family_revoked_at"),
        refresh_families.c.user_id,
        users.c.username,
        users.c.disabled,
    )
    .select_from(
        refresh_tokens.join(
            refresh_families, refresh_tokens.c.family_id == refresh_families.c.id
        ).join(users, refresh_families.c.user_id == users.c.id)
    )
    .with_for_update(of=refresh_tokens)
)


class SqlTransaction:
    """`RefreshTransaction` on one open connection."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def get_refresh(self, token_hash: str) -> RefreshRecord | None:
        result = await self._conn.execute(
            _REFRESH_SELECT.where(refresh_tokens.c.token_hash == token_hash)
        )
        row = result.first()
        return _record(row) if row is not None else None

    async def get_user(self, username: str) -> User | None:
        row = (
            await self._conn.execute(sa.select(users).where(users.c.username == username))
        ).first()
        return _user(row) if row is not None else None

    async def create_family(
        self, *, family_id: str, user_id: int, client_id: str, created_at: float, expires_at: float
    ) -> None:
        await self._conn.execute(
            refresh_families.insert().values(
                id=family_id,
                user_id=user_id,
                client_id=client_id,
                created_at=created_at,
                expires_at=expires_at,
            )
        )

    async def add_refresh(
        self,
        *,
        token_hash: str,
        family_id: str,
        parent_hash: str | None,
        scope: str,
        created_at: float,
        expires_at: float,
    ) -> None:
        await self._conn.execute(
            refresh_tokens.insert().values(
                token_hash=token_hash,
                family_id=family_id,
                parent_hash=parent_hash,
                status="active",
                scope=scope,
                created_at=created_at,
                expires_at=expires_at,
            )
        )

    async def spend_refresh(
        self, token_hash: str, *, expected: TokenStatus, successor_hash: str, at: float
    ) -> bool:
        result = await self._conn.execute(
            refresh_tokens.update()
            .where(refresh_tokens.c.token_hash == token_hash, refresh_tokens.c.status == expected)
            .values(status="spent", successor_hash=successor_hash, spent_at=at)
        )
        return result.rowcount == 1

    async def revoke_token(self, token_hash: str) -> None:
        await self._conn.execute(
            refresh_tokens.update()
            .where(refresh_tokens.c.token_hash == token_hash)
            .values(status="revoked")
        )

    async def revoke_family(self, family_id: str, *, at: float, reason: str) -> bool:
        # Tokens before families, the order `_revoke_user_families` locks in too.
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

    async def add_audit_event(self, event: AuditEvent) -> None:
        await self._conn.execute(_audit_insert(event))


def _audit_insert(event: AuditEvent) -> sa.Insert:
    return audit_events.insert().values(
        at=event.at,
        event=event.event,
        username=event.username,
        client_addr=event.client_addr,
        request_id=event.request_id,
        details=json.dumps(event.details, separators=(",", ":"), default=str),
    )


class SqlStore:
    """The `Store` protocol over one SQLAlchemy async engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        # Within one process, queue SQLite writers on the event loop instead of
        # letting them spin in SQLite's busy handler.
        self._write_lock = asyncio.Lock() if self._sqlite else None

    @classmethod
    def from_settings(cls, settings: Settings) -> SqlStore:
        return cls(create_engine(settings))

    async def close(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engine.connect() as conn:
                yield conn
        except (TimeoutError, DBAPIError, PoolTimeout, OSError) as exc:
            if isinstance(exc, IntegrityError) or not _unavailable(exc):
                raise
            raise StoreUnavailable(str(type(exc).__name__)) from exc

    @contextlib.asynccontextmanager
    async def _write_once(self) -> AsyncIterator[AsyncConnection]:
        lock = self._write_lock or contextlib.nullcontext()
        async with lock, self.engine.connect() as conn:
            if self._sqlite:
                conn = await conn.execution_options(sqlite_write=True)
            async with conn.begin():
                yield conn

    async def atomic(self, work: Callable[[SqlTransaction], Awaitable[T]]) -> T:
        return await self._run_write(lambda conn: work(SqlTransaction(conn)))

    async def _run_write(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        delay = 0.005
        for attempt in range(_RETRIES):
            try:
                async with self._write_once() as conn:
                    return await work(conn)
            except IntegrityError:
                raise
            except DBAPIError as exc:
                if _retryable(exc) and attempt < _RETRIES - 1:
                    log.info("store.retry", extra={"attempt": attempt + 1})
                    await asyncio.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 0.5)
                    continue
                if _retryable(exc) or _unavailable(exc):
                    raise StoreUnavailable(type(exc).__name__) from exc
                raise
            except (TimeoutError, PoolTimeout, OSError) as exc:
                raise StoreUnavailable(type(exc).__name__) from exc
        raise AssertionError("unreachable")

    async def ping(self) -> None:
        async with self._read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # -- users ---------------------------------------------------------------

    async def get_user(self, username: str) -> User | None:
        async with self._read() as conn:
            row = (await conn.execute(sa.select(users).where(users.c.username == username))).first()
        return _user(row) if row is not None else None

    async def add_user(self, username: str, password_hash: str, *, at: float) -> User:
        async def work(conn: AsyncConnection) -> User:
            result = await conn.execute(
                users.insert().values(
                    username=username,
                    password_hash=password_hash,
                    disabled=False,
                    created_at=at,
                    updated_at=at,
                )
            )
            (user_id,) = result.inserted_primary_key or (0,)
            return User(user_id, username, password_hash, False, at)

        try:
            return await self._run_write(work)
        except IntegrityError as exc:
            raise Conflict(f"user {username!r} already exists") from exc

    async def set_password_hash(self, username: str, password_hash: str, *, at: float) -> None:
        async def work(conn: AsyncConnection) -> int:
            result = await conn.execute(
                users.update()
                .where(users.c.username == username)
                .values(password_hash=password_hash, updated_at=at)
            )
            return result.rowcount

        if await self._run_write(work) != 1:
            raise NotFound(username)

    async def upgrade_password_hash(self, user_id: int, old_hash: str, new_hash: str) -> None:
        # Conditional, so a password changed meanwhile is never overwritten.
        async def work(conn: AsyncConnection) -> None:
            await conn.execute(
                users.update()
                .where(users.c.id == user_id, users.c.password_hash == old_hash)
                .values(password_hash=new_hash)
            )

        await self._run_write(work)

    async def set_disabled(self, username: str, disabled: bool, *, at: float) -> User:
        async def work(conn: AsyncConnection) -> User | None:
            await conn.execute(
                users.update()
                .where(users.c.username == username)
                .values(disabled=disabled, updated_at=at)
            )
            row = (await conn.execute(sa.select(users).where(users.c.username == username))).first()
            if row is None:
                return None
            user = _user(row)
            if disabled:
                await _revoke_user_families(conn, user.id, at=at, reason="user_disabled")
            return user

        user = await self._run_write(work)
        if user is None:
            raise NotFound(username)
        return user

    async def list_users(self) -> Sequence[User]:
        async with self._read() as conn:
            rows = (await conn.execute(sa.select(users).order_by(users.c.username))).all()
        return [_user(row) for row in rows]

    async def revoke_user_families(self, user_id: int, *, at: float, reason: str) -> int:
        async def work(conn: AsyncConnection) -> int:
            return await _revoke_user_families(conn, user_id, at=at, reason=reason)

        return await self._run_write(work)

    # -- housekeeping ----------------------------------------------------------

    async def purge_expired(self, *, now: float) -> int:
        """Delete families that can no longer yield a token, and stale failure rows."""

        async def work(conn: AsyncConnection) -> int:
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

        return await self._run_write(work)

    # -- login failures --------------------------------------------------------

    async def add_login_failure(self, keys: Sequence[str], *, at: float) -> None:
        async def work(conn: AsyncConnection) -> None:
            await conn.execute(login_failures.insert(), [{"key": k, "failed_at": at} for k in keys])

        await self._run_write(work)

    async def login_failures(self, key: str, *, since: float) -> tuple[int, float | None]:
        async with self._read() as conn:
            row = (
                await conn.execute(
                    sa.select(sa.func.count(), sa.func.min(login_failures.c.failed_at)).where(
                        login_failures.c.key == key, login_failures.c.failed_at > since
                    )
                )
            ).one()
        return int(row[0]), row[1]

    async def clear_login_failures(self, key: str) -> None:
        async def work(conn: AsyncConnection) -> None:
            await conn.execute(login_failures.delete().where(login_failures.c.key == key))

        await self._run_write(work)

    async def purge_login_failures(self, *, before: float) -> None:
        async def work(conn: AsyncConnection) -> None:
            await conn.execute(login_failures.delete().where(login_failures.c.failed_at <= before))

        await self._run_write(work)

    # -- audit -----------------------------------------------------------------

    async def add_audit_event(self, event: AuditEvent) -> None:
        async def work(conn: AsyncConnection) -> None:
            await conn.execute(_audit_insert(event))

        await self._run_write(work)

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


async def _revoke_user_families(
    conn: AsyncConnection, user_id: int, *, at: float, reason: str
) -> int:
    ids = sa.select(refresh_families.c.id).where(
        refresh_families.c.user_id == user_id, refresh_families.c.revoked_at.is_(None)
    )
    await conn.execute(
        refresh_tokens.update()
        .where(refresh_tokens.c.family_id.in_(ids), refresh_tokens.c.status == "active")
        .values(status="revoked")
    )
    result = await conn.execute(
        refresh_families.update()
        .where(refresh_families.c.user_id == user_id, refresh_families.c.revoked_at.is_(None))
        .values(revoked_at=at, revoked_reason=reason)
    )
    return result.rowcount
