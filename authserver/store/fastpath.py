"""The common refresh (spend, issue, audit) on the raw database driver.

Nearly every refresh is the plain case: an active, unexpired token of a live
family and an enabled user. That one exchange is the server's hottest write,
and SQLAlchemy's execution layer costs more CPU per statement than the
drivers themselves, so it runs here on the drivers directly. Its statements
are still SQLAlchemy Core, built from `schema.py` and from the rules in
`rotation.py` that the general path runs too (when a token is refused, the
compare-and-set spend, the successor and its expiry), compiled once per
dialect at import; only their execution skips SQLAlchemy:

- PostgreSQL: one statement (`UPDATE ... FROM ... RETURNING` with the two
  inserts as CTEs) on an asyncpg pool, so one round trip, prepared once per
  connection. The pool runs no reset query on release and no ping on checkout:
  its connections never change session state, and asyncpg notices a connection
  the server closed (the socket's EOF) and replaces it at the next checkout.
- SQLite: find, spend, issue and audit in one `BEGIN IMMEDIATE` transaction on
  the store's kept writer connection, through `sqlite3`; the rotations that
  arrive in one turn of the event loop share that transaction (`batching.py`).

The two reads of client-authenticated requests run here too: a client by id
(/token, /introspect, /revoke) and whether a session is live (introspection),
the two together in one statement when introspection needs both. Each process
remembers what they found (`registry.py`): a client, and on PostgreSQL a live
session, is read again only after the database's triggers say it changed (a
NOTIFY, or SQLite's counter), so most requests read nothing here at all.

Anything unusual (reuse, expiry, revocation, a disabled user, a narrowed scope)
finds no row, changes nothing, and takes the general path in `refresh.py`;
`tests/test_rotation_paths.py` runs every case both ways and compares the rows.
Driver errors propagate as they are, for `sql.py` to retry or map.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.compiler import SQLCompiler

from authserver.store import rotation
from authserver.store.protocol import AuditEvent, Rotated
from authserver.store.schema import (
    Time,
    audit_events,
    clients,
    refresh_families,
    refresh_tokens,
    used_jtis,
    users,
)


@dataclass(frozen=True, slots=True)
class Exchange:
    """One plain rotation to attempt."""

    token_hash: str
    successor_hash: str
    now: float
    refresh_ttl: int
    event: AuditEvent
    client_id: str | None  # the requesting client; None: any public one (see rotation.py)
    dpop_jkt: str | None = None  # the request's DPoP proof key, if it sent a proof
    # The key to bind an unbound family to (a public client's proof): see rotation.py.
    bind_jkt: str | None = None


@dataclass(frozen=True, slots=True)
class UsedJti:
    """A single-use id (a DPoP proof's, a client assertion's) to record until `expires_at`."""

    key: str
    expires_at: float
    now: float


def first_uses(jtis: Sequence[UsedJti]) -> list[bool]:
    """For a batch: False for an id already met earlier in it (a replay, whatever the
    database says of the first), True for the ones the database must decide."""
    seen: set[str] = set()
    first = []
    for jti in jtis:
        first.append(jti.key not in seen)
        seen.add(jti.key)
    return first


# -- the statements, built from the schema and the shared rules ------------------

_t, _f, _u = refresh_tokens.c, refresh_families.c, users.c


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A statement compiled once for one dialect, to run on that dialect's driver."""

    sql: str
    order: tuple[str, ...]  # the bind parameters' names, in positional order
    fixed: dict[str, Any]  # the values the statement carries itself ('active', ...)

    def args(self, **values: Any) -> list[Any]:
        fixed = self.fixed
        return [values[name] if name in values else fixed[name] for name in self.order]


def _compile(statement: sa.ClauseElement, dialect: sa.Dialect) -> _Compiled:
    # Only strings, floats and integers are bound, which neither driver needs SQLAlchemy
    # to convert: the values go to the driver as they are.
    compiled = statement.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    order = tuple(compiled.positiontup or ())
    fixed = {name: compiled.params[name] for name in order if not compiled.binds[name].required}
    return _Compiled(compiled.string, order, fixed)


def _event_values(exchange: Exchange) -> dict[str, Any]:
    event = exchange.event
    return {
        "b_event_at": event.at,
        "b_event": event.event,
        "b_client_addr": event.client_addr,
        "b_request_id": event.request_id,
    }


_AUDIT_COLUMNS = ["at", "event", "username", "client_addr", "request_id", "details"]
_event_at = sa.bindparam("b_event_at", type_=Time)
_event = sa.bindparam("b_event", type_=sa.String)
_client_addr = sa.bindparam("b_client_addr", type_=sa.String)
_request_id = sa.bindparam("b_request_id", type_=sa.String)


# What each exchange of a batch brings to `_pg_rotate`: one array per column, unnested
# into one row per exchange (`ord` is its place in the batch).
_BATCH_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("ord", sa.Integer),
    ("hash", sa.String),
    ("successor", sa.String),
    ("client", sa.String),
    ("jkt", sa.String),
    ("bind", sa.String),
    ("at", Time),
    ("ttl", sa.Integer),
    ("event_at", Time),
    ("event", sa.String),
    ("client_addr", sa.String),
    ("request_id", sa.String),
)


def _batch_values(exchanges: Sequence[Exchange]) -> dict[str, list[Any]]:
    rows = [
        (
            ord_,
            e.token_hash,
            e.successor_hash,
            e.client_id,
            e.dpop_jkt,
            e.bind_jkt,
            e.now,
            e.refresh_ttl,
            e.event.at,
            e.event.event,
            e.event.client_addr,
            e.event.request_id,
        )
        for ord_, e in enumerate(exchanges)
    ]
    columns = zip(*rows, strict=True)
    return {
        f"b_{name}": list(column) for (name, _), column in zip(_BATCH_COLUMNS, columns, strict=True)
    }


def _pg_rotate() -> sa.Select[Any]:
    """Spend (the compare-and-set, on a token no rule refuses), issue and audit, for a
    batch of exchanges (`batching.py`) in one statement. Two exchanges of one token in a
    batch update its row once: one wins, the other finds nothing, as if serial."""
    batch = (
        sa.func.unnest(
            *(
                sa.bindparam(f"b_{name}", type_=postgresql.ARRAY(kind))
                for name, kind in _BATCH_COLUMNS
            )
        )
        .table_valued(*(sa.column(name, kind) for name, kind in _BATCH_COLUMNS))
        .render_derived(name="batch")
    )
    b = batch.c
    spent = (
        rotation.spend(
            token_hash=b.hash, expected=sa.literal("active"), successor_hash=b.successor, at=b.at
        )
        .where(
            _t.family_id == _f.id,
            _f.user_id == _u.id,
            rotation.refusal(b.at, b.client, b.jkt).is_(None),
            rotation.binds_nothing(b.bind),
        )
        .returning(
            _t.token_hash,
            _t.family_id,
            _t.scope,
            _f.client_id,
            _u.username,
            b.ord,
            b.successor,
            b.at,
            b.ttl,
            b.event_at,
            b.event,
            b.client_addr,
            b.request_id,
        )
        .cte("spent")
    )
    s = spent.c
    issued = rotation.issue(
        token_hash=s.successor,
        family_id=s.family_id,
        parent_hash=s.token_hash,
        scope=s.scope,
        now=s.at,
        refresh_ttl=s.ttl,
    ).cte("issued")
    # The details as `sql.py` stores an event's: compact JSON. A family id is a UUID,
    # so nothing in it needs escaping.
    details = sa.literal('{"family_id":"') + s.family_id + sa.literal('"}')
    audited = (
        audit_events.insert()
        .from_select(
            _AUDIT_COLUMNS,
            sa.select(s.event_at, s.event, s.username, s.client_addr, s.request_id, details),
        )
        .cte("audited")
    )
    # The two inserts are referenced by nothing; `add_cte` has them rendered anyway.
    answer = sa.select(s.ord, s.family_id, s.username, s.scope, s.client_id)
    return answer.add_cte(issued, audited)


def _dialect(url: str) -> sa.Dialect:
    return sa.make_url(url).get_dialect()()


def _use_jti(insert: Any, rows: sa.Select[Any] | None = None) -> Any:
    """Record single-use ids in one statement (one id, or the `rows` of key and expiry):
    inserted, or taking the place of an expired row of the same key; a live row makes
    it change nothing (a replay)."""
    if rows is None:
        statement = insert(used_jtis).values(
            key=sa.bindparam("b_key", type_=sa.String),
            expires_at=sa.bindparam("b_expires", type_=Time),
        )
    else:
        statement = insert(used_jtis).from_select(["key", "expires_at"], rows)
    return statement.on_conflict_do_update(
        index_elements=[used_jtis.c.key],
        set_={"expires_at": statement.excluded.expires_at},
        where=used_jtis.c.expires_at <= sa.bindparam("b_now", type_=Time),
    )


# The dialects of the drivers the statements run on: `$1` for asyncpg, `?` for sqlite3.
_PG_ROTATE = _compile(_pg_rotate(), _dialect("postgresql+asyncpg://"))
# Every DPoP-protected request records its proof's jti; those of one loop turn go in one
# statement (distinct keys only: one INSERT may not touch a row twice).
_PG_USE_JTIS = _compile(
    _use_jti(
        postgresql.insert,
        rows=sa.select(
            sa.func.unnest(
                sa.bindparam("b_keys", type_=postgresql.ARRAY(sa.String)),
                sa.bindparam("b_expires", type_=postgresql.ARRAY(Time)),
            )
            .table_valued(sa.column("key", sa.String), sa.column("expires_at", Time))
            .render_derived(name="jtis")
        ),
    ).returning(used_jtis.c.key),
    _dialect("postgresql+asyncpg://"),
)


def _acquire(pool: asyncpg.Pool, wait: float) -> Any:
    """A pooled connection, waiting at most `wait` seconds for one (then the caller's
    503). asyncpg's timeout costs a task and a timer per acquire; with a connection
    idle, the acquire takes it without waiting (its queue hands out live connections
    first), so the timeout is set only when it can matter."""
    if pool.get_idle_size():
        return pool.acquire()
    return pool.acquire(timeout=wait)


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

    async def rotate(self, exchanges: Sequence[Exchange]) -> list[Rotated | None]:
        """The plain rotations of a batch, in one round trip; None for each exchange
        the plain case does not take."""
        pool = await self._get_pool()
        args = _PG_ROTATE.args(**_batch_values(exchanges))
        async with _acquire(pool, self._wait) as conn:
            rows = await conn.fetch(_PG_ROTATE.sql, *args)
        done: list[Rotated | None] = [None] * len(exchanges)
        for row in rows:
            done[row["ord"]] = Rotated(
                row["family_id"], row["username"], row["scope"], row["client_id"]
            )
        return done

    async def fetch_one(self, read: Read, **values: Any) -> dict[str, Any] | None:
        """One row of a hot read (`GET_CLIENT`, `SESSION_LIVE`, ...), or None."""
        pool = await self._get_pool()
        async with _acquire(pool, self._wait) as conn:
            row = await conn.fetchrow(read.pg.sql, *read.pg.args(**values))
        return None if row is None else dict(row)

    async def use_jtis(self, jtis: Sequence[UsedJti]) -> list[bool]:
        """Record a batch of single-use ids in one round trip; False for each replay."""
        first = first_uses(jtis)
        fresh = [jti for jti, is_first in zip(jtis, first, strict=True) if is_first]
        pool = await self._get_pool()
        args = _PG_USE_JTIS.args(
            b_keys=[j.key for j in fresh],
            b_expires=[j.expires_at for j in fresh],
            # The batch's earliest moment decides what has expired: an id expiring
            # within the batch's milliseconds counts as live, never the other way.
            b_now=min(j.now for j in fresh),
        )
        async with _acquire(pool, self._wait) as conn:
            recorded = {row[0] for row in await conn.fetch(_PG_USE_JTIS.sql, *args)}
        return [is_first and jti.key in recorded for jti, is_first in zip(jtis, first, strict=True)]

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=5.0)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()  # a frozen database must not hold up shutdown


_sqlite = _dialect("sqlite+pysqlite://")


@dataclass(frozen=True, slots=True)
class Read:
    """A hot read: the Core statement (for the general path) and its compiled forms."""

    statement: sa.Select[Any]
    pg: _Compiled
    sqlite: _Compiled


def _read(statement: sa.Select[Any]) -> Read:
    return Read(
        statement,
        _compile(statement, _dialect("postgresql+asyncpg://")),
        _compile(statement, _sqlite),
    )


GET_CLIENT = _read(
    sa.select(clients).where(clients.c.client_id == sa.bindparam("b_id", type_=sa.String))
)
SESSION_LIVE = _read(
    sa.select(refresh_families.c.id).where(
        refresh_families.c.id == sa.bindparam("b_id", type_=sa.String),
        refresh_families.c.revoked_at.is_(None),
    )
)


# Introspection of a user's token: its client and its session in one round trip. The
# session's answer rides on the client's row, so an unknown client finds no row at all.
CLIENT_AND_SESSION = _read(
    sa.select(
        clients,
        sa.exists()
        .where(
            refresh_families.c.id == sa.bindparam("b_sid", type_=sa.String),
            refresh_families.c.revoked_at.is_(None),
        )
        .label("session_live"),
    ).where(clients.c.client_id == sa.bindparam("b_id", type_=sa.String))
)


def sqlite_fetch_one(raw: sqlite3.Connection, read: Read, **values: Any) -> dict[str, Any] | None:
    """One row of a hot read on a `sqlite3` connection (autocommit: the latest commit)."""
    cursor = raw.execute(read.sqlite.sql, read.sqlite.args(**values))
    row = cursor.fetchone()
    if row is None:
        return None
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


# Under BEGIN IMMEDIATE nothing changes between these statements, so the plain case is
# found first, and then spent with the general path's own compare-and-set.
_SQLITE_FIND = _compile(
    sa.select(_t.family_id, _t.scope, _f.client_id, _u.username)
    .select_from(rotation.TOKEN_FAMILY_USER)
    .where(
        _t.token_hash == sa.bindparam("b_hash", type_=sa.String),
        _t.status == "active",
        rotation.refusal(sa.bindparam("b_now", type_=Time), rotation.CLIENT, rotation.DPOP_KEY).is_(
            None
        ),
        rotation.binds_nothing(rotation.BIND_KEY),
    ),
    _sqlite,
)
_SQLITE_SPEND = _compile(rotation.SPEND, _sqlite)
_SQLITE_USE_JTI = _compile(_use_jti(sqlite.insert), _sqlite)
_SQLITE_ISSUE = _compile(rotation.ISSUE, _sqlite)
_SQLITE_AUDIT = _compile(
    audit_events.insert().values(
        at=_event_at,
        event=_event,
        username=sa.bindparam("b_username", type_=sa.String),
        client_addr=_client_addr,
        request_id=_request_id,
        details=sa.bindparam("b_details", type_=sa.Text),
    ),
    _sqlite,
)


@contextlib.contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One `BEGIN IMMEDIATE` transaction, committed, or rolled back on any error.

    The caller holds the process's SQLite write lock, and `conn` is in autocommit
    mode (its driver-level transaction control is off), so BEGIN IMMEDIATE takes
    the database's write lock before anything is read.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def sqlite_use_jtis(conn: sqlite3.Connection, jtis: Sequence[UsedJti]) -> list[bool]:
    """Record a batch of single-use ids (see `_use_jti`) in one write transaction, one
    after the other; False for each replay."""
    with _write_transaction(conn):
        return [
            conn.execute(
                _SQLITE_USE_JTI.sql,
                _SQLITE_USE_JTI.args(b_key=jti.key, b_expires=jti.expires_at, b_now=jti.now),
            ).rowcount
            == 1
            for jti in jtis
        ]


def sqlite_rotate(conn: sqlite3.Connection, exchanges: Sequence[Exchange]) -> list[Rotated | None]:
    """The plain rotations, one after the other, in one write transaction (a group
    commit: `batching.py`); blocking, but a local call."""
    with _write_transaction(conn):
        return [_sqlite_rotate_one(conn, exchange) for exchange in exchanges]


def _sqlite_rotate_one(conn: sqlite3.Connection, exchange: Exchange) -> Rotated | None:
    """One plain rotation inside the caller's transaction; None (having changed
    nothing) when the token is not one the plain case takes."""
    now, token_hash, successor_hash = exchange.now, exchange.token_hash, exchange.successor_hash
    found = conn.execute(
        _SQLITE_FIND.sql,
        _SQLITE_FIND.args(
            b_hash=token_hash,
            b_now=now,
            b_client=exchange.client_id,
            b_jkt=exchange.dpop_jkt,
            b_bind=exchange.bind_jkt,
        ),
    ).fetchone()
    if found is None:
        return None
    family_id, scope, client_id, username = found
    spent = conn.execute(
        _SQLITE_SPEND.sql,
        _SQLITE_SPEND.args(
            b_hash=token_hash, b_expected="active", b_successor=successor_hash, b_at=now
        ),
    )
    if spent.rowcount != 1:  # cannot happen under the write lock; stay safe anyway
        return None
    conn.execute(
        _SQLITE_ISSUE.sql,
        _SQLITE_ISSUE.args(
            b_token=successor_hash,
            b_family=family_id,
            b_parent=token_hash,
            b_scope=scope,
            b_now=now,
            b_ttl=exchange.refresh_ttl,
        ),
    )
    details = json.dumps({"family_id": family_id}, separators=(",", ":"))
    conn.execute(
        _SQLITE_AUDIT.sql,
        _SQLITE_AUDIT.args(b_username=username, b_details=details, **_event_values(exchange)),
    )
    return Rotated(family_id, username, scope, client_id)
