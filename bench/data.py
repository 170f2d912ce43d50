"""What the runs need in place: keys, users, access tokens, databases, row counts.

Only authserver's public entry points make them: keys and users come from its
command line (`authserver keys generate`, `authserver users add`), refresh
families from real logins (bench/seeding.py). Access tokens are signed by the
sign-only peer's `Signer`, which reads the key file itself: authserver's
/protected accepting them (the runs count every refusal as an error) shows the
peer signs what authserver signs.
"""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import subprocess
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import asyncpg

from bench.peers.signer import Signer
from bench.server import AUDIENCE, SCOPE, authserver_command, server_env

BENCH_USER = "benchuser"
BENCH_PASSWORD = "bench-password-0123"
CLIENT_ID = "authserver"  # what /login issues to when the client names none
LOGIN_BCRYPT_ROUNDS = 12  # the cost the /login target is stated for
CACHE_SIZE_IF_UNKNOWN = 10_000


def cli(
    database_url: str,
    keys_dir: Path,
    *args: str,
    stdin: str = "",
    stdout_only: bool = False,
    **env: str,
) -> str:
    """Run `authserver ARGS` against a database and keys directory; its output."""
    done = subprocess.run(
        [*authserver_command(), *args],
        input=stdin,
        env=server_env(database_url=database_url, keys_dir=keys_dir, port=0, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"authserver {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout if stdout_only else done.stdout + done.stderr


def make_keys(keys_dir: Path, database_url: str, count: int = 1) -> None:
    for _ in range(count):
        cli(database_url, keys_dir, "keys", "generate", "--alg", "RS256")
        time.sleep(0.001)  # file names are UTC times: keep them distinct


def add_user(
    database_url: str, keys_dir: Path, username: str, *, rounds: int, password: str = BENCH_PASSWORD
) -> None:
    cli(
        database_url,
        keys_dir,
        "users",
        "add",
        username,
        "--password-stdin",
        stdin=password + "\n",
        AUTHSERVER_BCRYPT_ROUNDS=str(rounds),
    )


def add_confidential_client(database_url: str, keys_dir: Path, client_id: str) -> str:
    """Register a confidential client (client_credentials, the read scope); its secret."""
    out = cli(
        database_url,
        keys_dir,
        "clients",
        "add",
        client_id,
        "--grant",
        "client_credentials",
        "--scope",
        "read",
        stdout_only=True,
    )
    return out.strip().splitlines()[0]


def verifier_cache_size() -> int:
    """How many verified tokens the server remembers, so fresh tokens can outnumber them.

    The one look inside authserver: no public interface tells the cache's size, and
    guessing it low would let cache hits into the fresh-token figure unnoticed.
    """
    try:
        from authserver.tokens import AccessTokenVerifier

        parameters = inspect.signature(AccessTokenVerifier.__init__).parameters
    except (ImportError, AttributeError, ValueError):
        return CACHE_SIZE_IF_UNKNOWN
    default = parameters["cache_size"].default if "cache_size" in parameters else None
    return default if isinstance(default, int) else CACHE_SIZE_IF_UNKNOWN


# -- access tokens ---------------------------------------------------------------


def _mint_batch(keys_dir: str, issuer: str, count: int) -> list[str]:
    signer = Signer.from_keys_dir(Path(keys_dir))
    return [
        signer.mint(
            issuer=issuer,
            audience=AUDIENCE,
            subject=BENCH_USER,
            scope=SCOPE,
            client_id=CLIENT_ID,
            ttl=3600,
        )
        for _ in range(count)
    ]


def mint_access_tokens(keys_dir: Path, *, issuer: str, count: int, processes: int = 2) -> list[str]:
    """`count` distinct access tokens signed by the current key, in parallel processes."""
    if count <= 200 or processes <= 1:
        return _mint_batch(str(keys_dir), issuer, count)
    share = -(-count // processes)
    with ProcessPoolExecutor(processes) as pool:
        batches = pool.map(
            _mint_batch, [str(keys_dir)] * processes, [issuer] * processes, [share] * processes
        )
        tokens = [t for batch in batches for t in batch]
    return tokens[:count]


# -- DPoP proofs (RFC 9449) -----------------------------------------------------------


def _proof_batch(
    key_pem: bytes, method: str, url: str, access_token: str | None, count: int
) -> list[str]:
    from authserver.client import DPoPKey

    key = DPoPKey(key_pem)
    return [key.proof(method, url, access_token=access_token) for _ in range(count)]


def dpop_proofs(
    key_pem: bytes,
    method: str,
    url: str,
    count: int,
    *,
    access_token: str | None = None,
    processes: int = 2,
) -> list[str]:
    """`count` proofs (each its own jti, iat now) by the client kit's `DPoPKey`, made
    before a run: the load generator only sends them, as it sends pre-minted tokens."""
    if count <= 200 or processes <= 1:
        return _proof_batch(key_pem, method, url, access_token, count)
    share = -(-count // processes)
    with ProcessPoolExecutor(processes) as pool:
        batches = pool.map(
            _proof_batch,
            *zip(*[(key_pem, method, url, access_token, share)] * processes, strict=True),
        )
        proofs = [p for batch in batches for p in batch]
    return proofs[:count]


# -- databases ---------------------------------------------------------------------


def count_rows(database_url: str, *tables: str) -> dict[str, int]:
    """Rows per table, read with the database's own driver."""
    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}

    async def count() -> dict[str, int]:
        conn = await asyncpg.connect(database_url, timeout=5)
        try:
            return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in tables}
        finally:
            await conn.close()

    return asyncio.run(count())


async def _pg_execute(admin_url: str, sql: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_pg_database(admin_url: str) -> str:
    """A fresh database on the server of `admin_url`; its URL."""
    name = f"authserver_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_execute(admin_url, f'CREATE DATABASE "{name}"'))
    return f"{admin_url.rpartition('/')[0]}/{name}"


def drop_pg_database(admin_url: str, url: str) -> None:
    name = url.rpartition("/")[2]
    asyncio.run(_pg_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def pg_reachable(admin_url: str) -> str | None:
    """None if PostgreSQL answers at `admin_url`, else why not."""
    try:
        asyncio.run(_pg_execute(admin_url, "SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
