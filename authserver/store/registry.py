"""What a process may answer from memory: the clients it has read, and (on PostgreSQL)
the sessions it has seen live, forgotten as soon as the database says they changed.

Every client-authenticated request needs its client's row, and introspection needs
its session's liveness too; reading them from the database on every request was most
of those requests' cost on PostgreSQL. The database itself says when they change, by
triggers that fire for any writer (this server, the CLI, another process, SQL typed by
hand; migration 0007):

- SQLite: the triggers bump a counter in `registry_version`. Before a remembered
  client is used, `PRAGMA data_version` on the reader connection (a local call that
  changes whenever any other connection, of this process or another, has committed)
  tells whether anything was written at all; only then is the counter read, and if it
  moved every client is forgotten. Sessions are read every time: the read is local
  and cheap.
- PostgreSQL: the triggers send `NOTIFY authserver_registry` (a client changed) and
  `NOTIFY authserver_sessions` (a session revoked, or deleted while live). One
  dedicated connection per process LISTENs (`PgListener`). While it is not connected
  (not yet, lost, reconnecting) nothing is remembered or answered from memory: every
  request reads the database. It starts from an empty memory at each (re)connection.
  A read's result is kept only if no notification, local eviction or reconnection
  came while it ran (`Registry.guard`), so a read racing a change never outlives it.

The window that remains on PostgreSQL is the notification's delivery: the time from a
commit to its NOTIFY reaching this process's listener socket and being handled, well
under a millisecond on a local database. A process's own revocations and client
changes are forgotten synchronously after their commit (`SqlStore`), before the
request that made them answers.

Only what exists is remembered: an unknown client id or a dead session is read from
the database every time, so a client registered a moment ago works at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from typing import Any

import asyncpg

from authserver.store.protocol import Client

log = logging.getLogger("authserver.store")

REGISTRY_CHANNEL = "authserver_registry"
SESSIONS_CHANNEL = "authserver_sessions"

_MAX_CLIENTS = 1024
_MAX_SESSIONS = 65_536


class Registry:
    """The remembered clients and live sessions of one process, while `on`."""

    def __init__(self, *, on: bool, max_clients: int = _MAX_CLIENTS) -> None:
        self.on = on
        self._clients: dict[str, Client] = {}
        self._sessions: dict[str, None] = {}
        self._max_clients = max_clients
        # Moves whenever anything is forgotten, or the memory is switched on or off: a
        # read that started before a move may be stale, and is not kept.
        self._epoch = 0

    # -- answering ---------------------------------------------------------------

    def client(self, client_id: str) -> Client | None:
        return self._clients.get(client_id) if self.on else None

    def session_live(self, family_id: str) -> bool:
        """True: remembered live. False: not known, read the database."""
        return self.on and family_id in self._sessions

    # -- remembering -------------------------------------------------------------

    def guard(self) -> int | None:
        """Call before a read whose result may be kept; None: it may not."""
        return self._epoch if self.on else None

    def keep_client(self, guard: int | None, client: Client) -> None:
        if guard is None or guard != self._epoch or not self.on:
            return
        clients = self._clients
        if len(clients) >= self._max_clients and client.client_id not in clients:
            del clients[next(iter(clients))]  # the oldest: a bound, not an LRU
        clients[client.client_id] = client

    def keep_session(self, guard: int | None, family_id: str) -> None:
        if guard is None or guard != self._epoch or not self.on:
            return
        sessions = self._sessions
        if len(sessions) >= _MAX_SESSIONS and family_id not in sessions:
            del sessions[next(iter(sessions))]
        sessions[family_id] = None

    # -- forgetting --------------------------------------------------------------

    def forget_clients(self) -> None:
        self._epoch += 1
        self._clients.clear()

    def forget_session(self, family_id: str) -> None:
        self._epoch += 1
        self._sessions.pop(family_id, None)

    def forget_sessions(self) -> None:
        self._epoch += 1
        self._sessions.clear()

    def switch(self, on: bool) -> None:
        """On: the listener is connected (start from nothing). Off: it is not."""
        self._epoch += 1
        self._clients.clear()
        self._sessions.clear()
        self.on = on


# -- SQLite: the counter, looked at only when something was committed --------------

_VERSION_SQL = "SELECT version FROM registry_version WHERE id = 1"


class SqliteCheck:
    """Forget the clients when another connection changed the registry."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._raw: sqlite3.Connection | None = None
        self._data_version: int | None = None
        self._version: int | None = None

    def check(self, raw: sqlite3.Connection) -> None:
        """Call before using a remembered client, on the reader `raw` outside a
        transaction; blocking, but two local statements at most."""
        (data_version,) = raw.execute("PRAGMA data_version").fetchone()
        if raw is self._raw and data_version == self._data_version:
            return  # nothing committed by anyone since the last look
        # The counter is read after the data version: a change committed in between
        # moves both, and the next look forgets again (too often, never too seldom).
        row = raw.execute(_VERSION_SQL).fetchone()
        version = None if row is None else row[0]
        if version is None or version != self._version:
            self._registry.forget_clients()
        self._raw, self._data_version, self._version = raw, data_version, version


# -- PostgreSQL: one LISTEN connection per process -----------------------------------


class PgListener:
    """Keeps a LISTEN connection open in the background, and the registry on only
    while it is connected."""

    def __init__(
        self,
        connect_args: dict[str, Any],
        registry: Registry,
        *,
        probe_interval: float = 10.0,
        retry_max: float = 5.0,
    ) -> None:
        self._connect_args = connect_args
        self._registry = registry
        self._probe_interval = probe_interval
        self._retry_max = retry_max
        self._task: asyncio.Task[None] | None = None
        self._connection: asyncpg.Connection | None = None
        self.connections = 0  # how many times it has connected (for tests)

    @property
    def backend_pid(self) -> int | None:
        conn = self._connection
        return None if conn is None or conn.is_closed() else conn.get_server_pid()

    def check(self) -> None:
        """Call before every use of the registry: starts listening (once), and switches
        the memory off at once when the connection is closed, since asyncpg calls its
        termination listeners only at the loop's next turn."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        if self._registry.on:
            conn = self._connection
            if conn is None or conn.is_closed():
                self._registry.switch(False)

    async def close(self) -> None:
        task, self._task = self._task, None
        self._registry.switch(False)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_registry(self, *_args: Any) -> None:
        self._registry.forget_clients()

    def _on_session(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload == "*":
            self._registry.forget_sessions()
        else:
            self._registry.forget_session(payload)

    def _on_lost(self, *_args: Any) -> None:
        self._registry.switch(False)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            connected = self.connections
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: off, and try again
                log.warning("store.listener_lost", extra={"error": type(exc).__name__})
            finally:
                self._registry.switch(False)
                conn, self._connection = self._connection, None
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            if self.connections != connected:
                delay = 0.05  # it had been listening: try again soon
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)

    async def _listen(self) -> None:
        conn = await asyncpg.connect(**self._connect_args)
        self._connection = conn
        lost = asyncio.Event()

        def on_lost(_conn: Any) -> None:
            self._on_lost()
            lost.set()

        conn.add_termination_listener(on_lost)
        await conn.add_listener(REGISTRY_CHANNEL, self._on_registry)
        await conn.add_listener(SESSIONS_CHANNEL, self._on_session)
        # LISTEN is in effect: every commit from now on will be notified.
        self._registry.switch(True)
        self.connections += 1
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self._probe_interval)
            if lost.is_set() or conn.is_closed():
                raise ConnectionError("listener connection closed")
            # A connection that died without a word (a network partition, a failover)
            # would never say so: ask it, now and then.
            await conn.fetchval("SELECT 1", timeout=self._probe_interval)
