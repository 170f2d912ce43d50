"""Database outages, against a real server process on PostgreSQL.

A TCP proxy inside the test stands between the server and PostgreSQL. Cut
(connections reset, new ones refused) or frozen (a partition: nothing
answers, so only timeouts end a request), /health says 503, /login and
/refresh answer 503 `temporarily_unavailable` with `Retry-After`, and
/protected keeps working (verifying an access token needs only the keys).
When the database is back, the same process recovers by itself, and a refresh
token presented during the outage was not spent by it. Connections the
database itself ends (a restart, a failover) are replaced unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.helpers.databases import (
    POSTGRES_URL,
    create_pg_database,
    drop_pg_database,
    needs_postgres,
)
from tests.helpers.factories import DEFAULT_PASSWORD, seed_user
from tests.helpers.metrics import Samples, scrape_until, value
from tests.helpers.procs import ServerPool, ServerProcess, base_env, free_port

pytestmark = [pytest.mark.slow, needs_postgres]
log = logging.getLogger(__name__)
RECOVERY_DEADLINE = 30.0
HTTP_COUNT = "authserver_http_request_duration_seconds_count"


class TcpProxy:
    """Forwards 127.0.0.1:`port` to the target, until told otherwise.

    `cut()`: the database is gone (connections reset, new ones refused).
    `freeze()`: the network is partitioned (connections accepted, bytes never delivered).
    `restore()`: back to normal; connections from before are dropped.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._drop_links()

    def freeze(self) -> None:
        self._flowing.clear()

    async def restore(self) -> None:
        if not self._flowing.is_set():
            await self._drop_links()
            self._flowing.set()
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        self._flowing.set()
        await self.cut()

    async def _drop_links(self) -> None:
        for client, upstream in list(self._links):
            client.transport.abort()
            upstream.transport.abort()
        self._links.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        link = (client_w, up_w)
        self._links.add(link)
        pumps = [
            asyncio.create_task(self._pump(client_r, up_w)),
            asyncio.create_task(self._pump(up_r, client_w)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            self._links.discard(link)
            for writer in link:
                writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    url = await create_pg_database()
    try:
        yield url
    finally:
        await drop_pg_database(url)


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[ServerPool]:
    servers = ServerPool(tmp_path)
    try:
        yield servers
    finally:
        # Off the event loop: the proxy on it must keep forwarding while servers shut down.
        await asyncio.to_thread(servers.stop_all)


@pytest.fixture
async def proxy(pg_url: str) -> AsyncIterator[TcpProxy]:
    url = make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def _timed(label: str, request: Awaitable[httpx.Response]) -> httpx.Response:
    started = time.monotonic()
    response = await request
    log.info("%s answered %s in %.3f s", label, response.status_code, time.monotonic() - started)
    return response


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "temporarily_unavailable"
    assert body["error_description"]
    assert int(response.headers["Retry-After"]) >= 1


async def _start_behind_proxy(
    pg_url: str,
    proxy: TcpProxy,
    pool: ServerPool,
    keys_dir: Path,
    *,
    name: str,
    args: Sequence[str] = (),
) -> ServerProcess:
    """Seed alice, then start a server whose database connections all go through `proxy`."""
    await seed_user(pg_url)
    via_proxy = make_url(pg_url).set(host="127.0.0.1", port=proxy.port)
    env = base_env(
        AUTHSERVER_DATABASE_URL=via_proxy.render_as_string(hide_password=False),
        AUTHSERVER_KEYS_DIR=str(keys_dir),
    )
    # The proxy runs on this event loop, so start the server without blocking it.
    return await asyncio.to_thread(pool.start, env, name=name, args=args)


async def test_outage_answers_503_and_recovers_without_restart(
    pg_url: str, proxy: TcpProxy, pool: ServerPool, keys_dir: Path
) -> None:
    metrics_port = free_port()
    server = await _start_behind_proxy(
        pg_url, proxy, pool, keys_dir, name="outage", args=["--metrics-port", str(metrics_port)]
    )
    credentials = {"username": "alice", "password": DEFAULT_PASSWORD}

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        login = await client.post("/login", json=credentials)
        assert login.status_code == 200, login.text
        tokens = login.json()
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}

        await proxy.cut()
        health = await _timed("/health", client.get("/health"))
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        # Liveness touches nothing but the process: a database outage restarts nobody.
        live = await _timed("/health/live", client.get("/health/live"))
        assert live.status_code == 200, live.text
        _assert_unavailable(await _timed("/login", client.post("/login", json=credentials)))
        refresh_body = {"refresh_token": tokens["refresh_token"]}
        _assert_unavailable(await _timed("/refresh", client.post("/refresh", json=refresh_body)))
        form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        _assert_unavailable(await _timed("/token", client.post("/token", data=form)))
        protected = await _timed("/protected", client.get("/protected", headers=bearer))
        assert protected.status_code == 200, protected.text
        assert protected.json()["username"] == "alice"

        await proxy.restore()
        restored = time.monotonic()
        deadline = restored + RECOVERY_DEADLINE
        while (await client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, "no recovery after the database came back"
            await asyncio.sleep(0.2)
        log.info("/health back to 200 %.3f s after restore", time.monotonic() - restored)

        # The refresh attempted during the outage did not spend the token.
        refreshed = await client.post("/refresh", json=refresh_body)
        assert refreshed.status_code == 200, refreshed.text
        again = await client.post("/login", json=credentials)
        assert again.status_code == 200, again.text
        assert (await client.get("/protected", headers=bearer)).status_code == 200

    # /login, /refresh and /token (and /health) met the database down, and said 503.
    routes = ("/health", "/login", "/refresh", "/token")

    def counted(samples: Samples) -> bool:
        return value(samples, "authserver_database_errors_total") >= 3 and all(
            value(samples, HTTP_COUNT, route=route, status="503") >= 1 for route in routes
        )

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    samples = await asyncio.to_thread(scrape_until, url, counted)
    assert value(samples, "authserver_database_errors_total") >= 3
    for route in routes:
        count = value(samples, HTTP_COUNT, route=route, status="503")
        assert count >= 1, route

    assert server.proc.poll() is None, "the server died during the outage"
    # Every failure above was answered by the StoreUnavailable handler, none by the 500 one.
    assert "unhandled error" not in server.log(), server.log()[-4000:]


async def test_unresponsive_database_answers_503_and_recovers(
    pg_url: str, proxy: TcpProxy, pool: ServerPool, keys_dir: Path
) -> None:
    """A partition, not a refusal: nothing answers, so only timeouts can end a request."""
    server = await _start_behind_proxy(pg_url, proxy, pool, keys_dir, name="partition")
    credentials = {"username": "alice", "password": DEFAULT_PASSWORD}

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        login = await client.post("/login", json=credentials)
        assert login.status_code == 200, login.text
        tokens = login.json()
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        refresh_body = {"refresh_token": tokens["refresh_token"]}

        proxy.freeze()
        # First a request whose pooled connection is now dead silent, then new connections.
        _assert_unavailable(
            await _timed("/login (frozen)", client.post("/login", json=credentials))
        )
        health = await _timed("/health (frozen)", client.get("/health"))
        assert health.status_code == 503
        _assert_unavailable(
            await _timed("/refresh (frozen)", client.post("/refresh", json=refresh_body))
        )
        protected = await _timed("/protected (frozen)", client.get("/protected", headers=bearer))
        assert protected.status_code == 200, protected.text

        await proxy.restore()
        restored = time.monotonic()
        deadline = restored + RECOVERY_DEADLINE
        while (await client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, "no recovery after the partition ended"
            await asyncio.sleep(0.2)
        log.info("/health back to 200 %.3f s after the partition", time.monotonic() - restored)
        refreshed = await client.post("/refresh", json=refresh_body)
        assert refreshed.status_code == 200, refreshed.text

    assert "unhandled error" not in server.log(), server.log()[-4000:]


async def test_connections_killed_by_the_database_are_replaced(
    pg_url: str, pool: ServerPool, keys_dir: Path
) -> None:
    """A PostgreSQL restart or failover ends every session: the next requests must not notice."""
    await seed_user(pg_url)
    env = base_env(AUTHSERVER_DATABASE_URL=pg_url, AUTHSERVER_KEYS_DIR=str(keys_dir))
    server = await asyncio.to_thread(pool.start, env, name="terminated")
    credentials = {"username": "alice", "password": DEFAULT_PASSWORD}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        tokens = (await client.post("/login", json=credentials)).json()

        admin = await asyncpg.connect(POSTGRES_URL)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND application_name = 'authserver'",
                make_url(pg_url).database,
            )
        finally:
            await admin.close()
        assert killed >= 1

        refreshed = await client.post("/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert refreshed.status_code == 200, refreshed.text
        assert (await client.post("/login", json=credentials)).status_code == 200
        assert (await client.get("/health")).status_code == 200
    assert "unhandled error" not in server.log(), server.log()[-4000:]
