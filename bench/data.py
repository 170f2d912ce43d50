"""What the runs need in place: keys, databases, users, refresh families, access tokens.

Keys, users and refresh families are made with authserver's own code
(`generate_key`, `SqlStore`, `refresh.start_family`), so a seeded family is
exactly what a login would have produced. Access tokens are signed by the
sign-only peer's `Signer`, which reads the key file itself: authserver's
/protected accepting them (the runs count every refusal as an error) shows the
peer signs what authserver signs.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import asyncpg
import bcrypt

from authserver.audit import Auditor, RequestContext
from authserver.config import Settings
from authserver.keys import generate_key
from authserver.refresh import Lifetimes, start_family
from authserver.store.migrate import upgrade_async
from authserver.store.sql import SqlStore
from authserver.tokens import AccessTokenVerifier
from bench.peers.signer import Signer

BENCH_USER = "benchuser"
BENCH_PASSWORD = "bench-password-0123"
_SEED_CONTEXT = RequestContext(client_addr="bench-seed")


def make_keys(keys_dir: Path, count: int = 1) -> None:
    for _ in range(count):
        generate_key(keys_dir, "RS256")
        time.sleep(0.001)  # file names are UTC times: keep them distinct


def verifier_cache_size() -> int:
    """How many verified tokens the server remembers (AccessTokenVerifier's default)."""
    parameter = inspect.signature(AccessTokenVerifier.__init__).parameters.get("cache_size")
    default = parameter.default if parameter is not None else None
    return default if isinstance(default, int) else 10_000


# -- access tokens ---------------------------------------------------------------


def _mint_batch(keys_dir: str, issuer: str, audience: str, count: int) -> list[str]:
    signer = Signer.from_keys_dir(Path(keys_dir))
    return [
        signer.mint(
            issuer=issuer,
            audience=audience,
            subject=BENCH_USER,
            scope="read write",
            client_id="authserver",
            ttl=3600,
        )
        for _ in range(count)
    ]


def mint_access_tokens(
    keys_dir: Path, *, issuer: str, audience: str, count: int, processes: int = 2
) -> list[str]:
    """`count` distinct access tokens signed by the current key, in parallel processes."""
    if count <= 200 or processes <= 1:
        return _mint_batch(str(keys_dir), issuer, audience, count)
    share = -(-count // processes)
    with ProcessPoolExecutor(processes) as pool:
        batches = pool.map(
            _mint_batch,
            [str(keys_dir)] * processes,
            [issuer] * processes,
            [audience] * processes,
            [share] * processes,
        )
        tokens = [t for batch in batches for t in batch]
    return tokens[:count]


# -- database ----------------------------------------------------------------------


def bench_settings(database_url: str, keys_dir: Path, **overrides: object) -> Settings:
    return Settings(database_url=database_url, keys_dir=keys_dir, **overrides)  # type: ignore[arg-type]


async def _ensure_user(store: SqlStore, username: str, rounds: int) -> None:
    if await store.get_user(username) is None:
        hashed = bcrypt.hashpw(BENCH_PASSWORD.encode(), bcrypt.gensalt(rounds)).decode()
        await store.add_user(username, hashed, at=time.time())


async def _seed(settings: Settings, families: int, username: str) -> list[str]:
    store = SqlStore.from_settings(settings)
    try:
        await upgrade_async(store.engine)
        await _ensure_user(store, username, settings.bcrypt_rounds)
        user = await store.get_user(username)
        assert user is not None
        lifetimes = Lifetimes(
            refresh_ttl=settings.refresh_token_ttl,
            session_max_age=settings.session_max_age,
            reuse_grace=settings.refresh_reuse_grace,
        )
        auditor = Auditor(store)
        tokens = []
        for _ in range(families):
            issued = await start_family(
                store,
                auditor,
                _SEED_CONTEXT,
                user=user,
                scope=" ".join(settings.scopes),
                client_id="authserver",
                lifetimes=lifetimes,
                now=time.time(),
            )
            assert issued is not None
            tokens.append(issued.refresh_token)
        return tokens
    finally:
        await store.close()


def seed_families(settings: Settings, families: int, username: str = BENCH_USER) -> list[str]:
    """Start `families` refresh families for `username` (created if absent); their tokens."""
    return asyncio.run(_seed(settings, families, username))


def ensure_user(settings: Settings, username: str) -> None:
    asyncio.run(_seed(settings, 0, username))


async def _count(settings: Settings, tables: tuple[str, ...]) -> dict[str, int]:
    import sqlalchemy as sa

    store = SqlStore.from_settings(settings)
    try:
        async with store.engine.connect() as conn:
            return {
                t: int((await conn.execute(sa.text(f"SELECT count(*) FROM {t}"))).scalar_one())
                for t in tables
            }
    finally:
        await store.close()


def count_rows(settings: Settings, *tables: str) -> dict[str, int]:
    return asyncio.run(_count(settings, tables))


# -- PostgreSQL --------------------------------------------------------------------


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
