"""The store's own contract, below HTTP: `Store` and `RefreshTransaction` used directly.

Each test takes the `store` fixture, a real `SqlStore` over a fresh database of
its own, so it runs on SQLite and on PostgreSQL unless it says otherwise.
Tests that only use the store to set up an HTTP test stay with that test.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from authserver.config import Settings
from authserver.store.protocol import RefreshTransaction, StoreUnavailable
from authserver.store.sql import SqlStore
from tests.helpers.databases import POSTGRESQL_ONLY
from tests.helpers.factories import make_user

# -- atomic: a real PostgreSQL deadlock is retried, not answered with a 500 -----------------


@POSTGRESQL_ONLY
async def test_deadlock_is_retried(store: SqlStore) -> None:
    """Two transactions lock two token rows in opposite orders: PostgreSQL aborts one
    (SQLSTATE 40P01), and `atomic` runs it again after the other commits."""
    user = await make_user(store)
    now = time.time()

    async def setup(tx: RefreshTransaction) -> None:
        await tx.create_family(
            family_id="f", user_id=user.id, client_id="c", created_at=now, expires_at=now + 60
        )
        for token_hash in ("x", "y"):
            await tx.add_refresh(
                token_hash=token_hash,
                family_id="f",
                parent_hash=None,
                scope="read",
                created_at=now,
                refresh_ttl=60,
            )

    await store.atomic(setup)
    locked = {"x": asyncio.Event(), "y": asyncio.Event()}
    attempts: Counter[str] = Counter()

    def crossing(first: str, second: str) -> Callable[[RefreshTransaction], Awaitable[str]]:
        async def work(tx: RefreshTransaction) -> str:
            attempts[first] += 1
            assert (
                await tx.get_refresh(first, now=now, client_id=None) is not None
            )  # SELECT ... FOR UPDATE
            locked[first].set()
            await locked[second].wait()
            assert await tx.get_refresh(second, now=now, client_id=None) is not None
            return first

        return work

    done = await asyncio.gather(store.atomic(crossing("x", "y")), store.atomic(crossing("y", "x")))
    assert sorted(done) == ["x", "y"]
    # Exactly one of them was the deadlock's victim, and it ran once more.
    assert sorted(attempts.values()) == [1, 2]


@POSTGRESQL_ONLY
async def test_a_saturated_pool_waits_at_most_its_timeout_then_is_unavailable(
    database_url: str,
) -> None:
    """The hot reads take a free connection without a timer (`fastpath._acquire`), but
    with none free they still wait `database_pool_timeout` at most."""
    settings = Settings(database_url=database_url, database_pool_size=1, database_pool_timeout=0.2)
    store = SqlStore.from_settings(settings)
    try:
        assert await store.get_client("nobody") is None  # the pool's one connection, idle
        rotator = store._rotator
        assert rotator is not None
        pool = await rotator._get_pool()
        async with pool.acquire():  # taken: the pool is saturated
            with pytest.raises(StoreUnavailable):
                await store.get_client("nobody")
        assert await store.get_client("nobody") is None
    finally:
        await store.close()


# -- fairness: a run of store calls lets other requests in between them ----------------


async def test_store_calls_hand_the_event_loop_to_other_requests_between_them(
    store: SqlStore,
) -> None:
    """SQLite's calls run inline and never wait for I/O: unless each transaction hands
    the loop over before it starts and after it commits, a login's dozen calls hold
    every other request from the first to the last. (asyncpg waits at each statement.)"""
    user = await make_user(store)
    turns = 0
    done = False

    async def another_request() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(another_request())
    await asyncio.sleep(0)
    seen: list[tuple[str, int]] = []
    try:
        for _ in range(3):
            before = turns
            await store.get_user(user.username)
            seen.append(("read", turns - before))
            before = turns
            await store.remember_login_address(user.id, "net", at=time.time())
            seen.append(("write", turns - before))
    finally:
        done = True
        await other
    # One turn before a read; one before a write and one after its commit.
    assert all(n >= (1 if kind == "read" else 2) for kind, n in seen), seen
