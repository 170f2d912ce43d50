"""Real `authserver serve` processes: one, several workers, several servers on PostgreSQL.

What an in-process test cannot show: that rotation stays atomic when the
requests really race (RFC 9700 §4.14.2: exactly one of N concurrent exchanges
of one refresh token wins, and the rest are reuse), across uvicorn workers on
one SQLite file, and across separate servers sharing PostgreSQL and a keys
directory, as a load-balanced deployment runs them. (That `atomic` retries a
real PostgreSQL deadlock is the store's own contract: tests/test_store.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from authserver import audit
from authserver.client import DPoPKey
from authserver.config import Settings
from authserver.keys import generate_key
from authserver.store.sql import SqlStore
from tests.helpers.databases import (
    POSTGRES_URL,
    create_pg_database,
    drop_pg_database,
    needs_postgres,
)
from tests.helpers.factories import DEFAULT_PASSWORD, seed_user
from tests.helpers.procs import ServerPool, ServerProcess, base_env, run_cli, server_errors
from tests.helpers.tokens import jwt_header

pytestmark = pytest.mark.slow

CONCURRENCY = 50
KEY_PICKUP_DEADLINE = 60.0
CREDENTIALS = {"username": "alice", "password": DEFAULT_PASSWORD}
ISSUER = "http://127.0.0.1:8000"  # every server's default AUTHSERVER_ISSUER


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ServerPool]:
    with ServerPool(tmp_path) as servers:
        yield servers


async def audit_events(database_url: str, event: str) -> int:
    store = SqlStore.from_settings(Settings(database_url=database_url))
    try:
        return len(await store.list_audit_events(event=event))
    finally:
        await store.close()


async def login(
    client: httpx.AsyncClient, server: ServerProcess, credentials: dict[str, str] = CREDENTIALS
) -> dict[str, Any]:
    response = await client.post(f"{server.url}/login", json=credentials)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def refresh(client: httpx.AsyncClient, server: ServerProcess, token: str) -> httpx.Response:
    return await client.post(f"{server.url}/refresh", json={"refresh_token": token})


async def refresh_storm(
    servers: Sequence[ServerProcess], token: str
) -> tuple[dict[str, Any], list[httpx.Response]]:
    """CONCURRENCY simultaneous exchanges of one token, spread round-robin over `servers`.

    Returns the one winner's body and the losers' responses; fails unless
    exactly one won and every other one was refused as `invalid_grant`.
    """
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        responses = await asyncio.gather(
            *(refresh(client, servers[i % len(servers)], token) for i in range(CONCURRENCY))
        )
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 1, 401: CONCURRENCY - 1}, statuses
    losers = [r for r in responses if r.status_code != 200]
    assert {r.json()["error"] for r in losers} == {"invalid_grant"}
    (winner,) = (r for r in responses if r.status_code == 200)
    body: dict[str, Any] = winner.json()
    return body, losers


def assert_clean_logs(*servers: ServerProcess) -> None:
    for server in servers:
        problems = server_errors(server.log())
        assert not problems, f"{server.name}:\n" + "\n".join(problems)


def wait_for_log(server: ServerProcess, text: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while server.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} x{count} never logged:\n{server.log()}"
        time.sleep(0.1)


# -- SQLite ----------------------------------------------------------------------------


@pytest.fixture
def sqlite_env(tmp_path: Path, keys_dir: Path) -> dict[str, str]:
    return base_env(
        AUTHSERVER_DATABASE_URL=f"sqlite:///{tmp_path / 'authserver.db'}",
        AUTHSERVER_KEYS_DIR=str(keys_dir),
    )


async def test_concurrent_refresh_one_process_sqlite(
    pool: ServerPool, sqlite_env: dict[str, str]
) -> None:
    database_url = sqlite_env["AUTHSERVER_DATABASE_URL"]
    await seed_user(database_url)
    server = pool.start(sqlite_env, name="single")
    async with httpx.AsyncClient(timeout=30) as client:
        tokens = await login(client, server)
        winner, _ = await refresh_storm([server], tokens["refresh_token"])
        # The losers presented a spent token: reuse, so the whole family is revoked,
        # the successor the winner just received included.
        late = await refresh(client, server, winner["refresh_token"])
        assert late.status_code == 401
        assert late.json()["error"] == "invalid_grant"
        # The access token beside it is self-contained and still works until it expires.
        protected = await client.get(
            f"{server.url}/protected",
            headers={"Authorization": f"Bearer {winner['access_token']}"},
        )
        assert protected.status_code == 200
    assert await audit_events(database_url, audit.REUSE_DETECTED) >= 1
    assert_clean_logs(server)


async def test_concurrent_refresh_three_workers_sqlite(
    pool: ServerPool, sqlite_env: dict[str, str]
) -> None:
    """`serve --workers 3` on one SQLite file: WAL, BEGIN IMMEDIATE and the busy timeout."""
    await seed_user(sqlite_env["AUTHSERVER_DATABASE_URL"])
    server = pool.start(sqlite_env, name="workers", workers=3)
    wait_for_log(server, "Application startup complete.", 3)
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(3):
            tokens = await login(client, server)
            winner, _ = await refresh_storm([server], tokens["refresh_token"])
            late = await refresh(client, server, winner["refresh_token"])
            assert late.status_code == 401
    assert_clean_logs(server)


# -- PostgreSQL: three servers, one database, one keys directory -------------------------


@dataclass
class Cluster:
    servers: list[ServerProcess]
    env: dict[str, str]
    database_url: str
    keys_dir: Path
    workdir: Path


# The cluster's tests share it (three server starts each cost seconds); a test that changes a
# user signs in as one of its own.
USERS = ("alice", "carol")


@pytest.fixture(scope="module")
def shared_cluster(
    tmp_path_factory: pytest.TempPathFactory, rsa_key_pem: bytes
) -> Iterator[Cluster]:
    if not POSTGRES_URL:
        pytest.skip("needs PostgreSQL: AUTHSERVER_TEST_POSTGRES_URL is not set")
    workdir = tmp_path_factory.mktemp("cluster")
    keys_dir = workdir / "keys"
    keys_dir.mkdir(mode=0o700)
    key_file = keys_dir / "20200101T000000000000Z-rs256.pem"
    key_file.write_bytes(rsa_key_pem)
    key_file.chmod(0o600)
    database_url = asyncio.run(create_pg_database())
    try:
        env = base_env(
            AUTHSERVER_DATABASE_URL=database_url,
            AUTHSERVER_KEYS_DIR=str(keys_dir),
            AUTHSERVER_KEYS_RELOAD_INTERVAL="1",
        )
        with ServerPool(workdir) as pool:
            # Started together on an empty database: their migrations race, and must not fail.
            servers = [pool.spawn(env, name=name) for name in ("a", "b", "c")]
            for server in servers:
                server.wait_healthy()
            for username in USERS:
                asyncio.run(seed_user(database_url, username))
            yield Cluster(servers, env, database_url, keys_dir, workdir)
    finally:
        asyncio.run(drop_pg_database(database_url))


@pytest.fixture
def cluster(shared_cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster; its logs hold no error after each test that used it."""
    yield shared_cluster
    assert_clean_logs(*shared_cluster.servers)


@needs_postgres
async def test_concurrent_refresh_across_three_servers(cluster: Cluster) -> None:
    a, b, c = cluster.servers
    # Counted from here: other tests of the shared database detect reuse too.
    reuse_before = await audit_events(cluster.database_url, audit.REUSE_DETECTED)
    async with httpx.AsyncClient(timeout=30) as client:
        tokens = await login(client, a)
        winner, _ = await refresh_storm(cluster.servers, tokens["refresh_token"])
        for server in cluster.servers:
            late = await refresh(client, server, winner["refresh_token"])
            assert late.status_code == 401
    assert await audit_events(cluster.database_url, audit.REUSE_DETECTED) >= reuse_before + 1


@needs_postgres
async def test_reuse_on_one_server_revokes_the_family_on_all(cluster: Cluster) -> None:
    a, b, c = cluster.servers
    async with httpx.AsyncClient(timeout=30) as client:
        first = await login(client, a)
        rotated = await refresh(client, a, first["refresh_token"])
        assert rotated.status_code == 200
        newest = rotated.json()["refresh_token"]
        other_session = await login(client, c)

        reuse = await refresh(client, b, first["refresh_token"])
        assert reuse.status_code == 401
        assert reuse.json()["error"] == "invalid_grant"

        for server in (c, a, b):
            dead = await refresh(client, server, newest)
            assert dead.status_code == 401, server.name
            assert dead.json()["error"] == "invalid_grant"
        # Only that family: the user's other session lives on.
        alive = await refresh(client, b, other_session["refresh_token"])
        assert alive.status_code == 200, alive.text


@needs_postgres
async def test_a_dpop_proof_replayed_to_another_server_is_refused(cluster: Cluster) -> None:
    """RFC 9449 §11.1: a proof's jti is single-use across every server of the database.
    Proofs name the issuer's URL, as clients behind a load balancer do."""
    a, b, c = cluster.servers
    key = DPoPKey()
    async with httpx.AsyncClient(timeout=30) as client:
        proof = key.proof("POST", ISSUER + "/login")
        first = await client.post(f"{a.url}/login", json=CREDENTIALS, headers={"DPoP": proof})
        assert first.status_code == 200, first.text
        replay = await client.post(f"{b.url}/login", json=CREDENTIALS, headers={"DPoP": proof})
        assert replay.status_code == 400
        assert replay.json()["error"] == "invalid_dpop_proof"
        token = first.json()["access_token"]
        proof = key.proof("GET", ISSUER + "/protected", access_token=token)
        headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
        responses = await asyncio.gather(
            *(client.get(f"{s.url}/protected", headers=headers) for s in (a, b, c, a, b, c))
        )
    assert Counter(r.status_code for r in responses) == {200: 1, 401: 5}


@needs_postgres
async def test_new_key_is_served_and_trusted_by_every_server(cluster: Cluster) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        before = await login(client, cluster.servers[0])
        new_key = generate_key(cluster.keys_dir, "ES256")

        deadline = time.monotonic() + KEY_PICKUP_DEADLINE
        pending = list(cluster.servers)
        while pending:
            assert time.monotonic() < deadline, f"{[s.name for s in pending]} missed the new key"
            jwks = await asyncio.gather(
                *(client.get(f"{s.url}/.well-known/jwks.json") for s in pending)
            )
            pending = [
                s
                for s, r in zip(pending, jwks, strict=True)
                if new_key.kid not in {k["kid"] for k in r.json()["keys"]}
            ]
            await asyncio.sleep(0.2)

        for signer in cluster.servers:
            tokens = await login(client, signer)
            header = jwt_header(tokens["access_token"])
            assert (header["kid"], header["alg"]) == (new_key.kid, "ES256")
            for verifier in cluster.servers:
                for token in (tokens["access_token"], before["access_token"]):
                    response = await client.get(
                        f"{verifier.url}/protected",
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    assert response.status_code == 200, (signer.name, verifier.name)


@needs_postgres
async def test_user_disabled_by_cli_is_refused_by_every_server(cluster: Cluster) -> None:
    carol = {**CREDENTIALS, "username": "carol"}  # not alice: the other tests sign her in
    async with httpx.AsyncClient(timeout=30) as client:
        sessions = [await login(client, server, carol) for server in cluster.servers]

        result = await asyncio.to_thread(
            run_cli, ["users", "disable", "carol"], cluster.env, cwd=cluster.workdir
        )
        assert result.returncode == 0, result.stderr

        for i, server in enumerate(cluster.servers):
            refused = await client.post(f"{server.url}/login", json=carol)
            assert refused.status_code == 401, server.name
            assert refused.json()["error"] == "invalid_grant"
            # Each session's token, on a server other than the one that issued it.
            token = sessions[(i + 1) % len(sessions)]["refresh_token"]
            dead = await refresh(client, server, token)
            assert dead.status_code == 401, server.name
            assert dead.json()["error"] == "invalid_grant"


async def test_a_dpop_proof_replayed_to_another_worker_is_refused_sqlite(
    pool: ServerPool, sqlite_env: dict[str, str]
) -> None:
    """RFC 9449 §11.1 on one SQLite file: a proof's jti is single-use across the workers
    of `serve --workers 3`, whichever of them each connection lands on."""
    await seed_user(sqlite_env["AUTHSERVER_DATABASE_URL"])
    server = pool.start(sqlite_env, name="dpop-workers", workers=3)
    wait_for_log(server, "Application startup complete.", 3)
    key = DPoPKey()
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        proof = key.proof("POST", ISSUER + "/login")
        first = await client.post(f"{server.url}/login", json=CREDENTIALS, headers={"DPoP": proof})
        assert first.status_code == 200, first.text
        token = first.json()["access_token"]
        for _ in range(3):
            proof = key.proof("GET", ISSUER + "/protected", access_token=token)
            headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
            responses = await asyncio.gather(
                *(client.get(f"{server.url}/protected", headers=headers) for _ in range(12))
            )
            assert Counter(r.status_code for r in responses) == {200: 1, 401: 11}
            refused = {r.json()["error_description"] for r in responses if r.status_code == 401}
            assert refused == {"The DPoP proof was already used."}
    assert_clean_logs(server)
