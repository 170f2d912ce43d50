"""Group commit (`store/batching.py`): rotations arriving together share a transaction,
and each still gets exactly the outcome it would have had alone. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import sqlalchemy as sa

from authserver import audit
from authserver.audit import Auditor, RequestContext
from authserver.refresh import Issued, Lifetimes, Refusal, Refused, digest, rotate, start_family
from authserver.store.batching import Batcher
from authserver.store.schema import audit_events, refresh_families, refresh_tokens
from authserver.store.sql import SqlStore
from tests.helpers.app import StartApp
from tests.helpers.factories import make_user

CTX = RequestContext(client_addr="203.0.113.9", request_id="group-commit")
LIFETIMES = Lifetimes(refresh_ttl=600, session_max_age=86_400, reuse_grace=0)
FAMILIES = 12


async def _families(store: SqlStore, auditor: Auditor, count: int) -> list[Issued]:
    user = await make_user(store, "alice")
    issued = []
    for _ in range(count):
        one = await start_family(
            store,
            auditor,
            CTX,
            user=user,
            scope="read",
            client_id="authserver",
            lifetimes=LIFETIMES,
            now=time.time(),
        )
        assert one is not None
        issued.append(one)
    return issued


async def _rotate(store: SqlStore, auditor: Auditor, token: str) -> Issued | Refused:
    return await rotate(
        store, auditor, CTX, token=token, lifetimes=LIFETIMES, now=time.time(), client_id=None
    )


async def test_rotations_arriving_together_each_get_their_own_successor(
    start_app: StartApp,
) -> None:
    running = await start_app()
    store = running.store
    assert isinstance(store, SqlStore)
    auditor = Auditor(store)
    families = await _families(store, auditor, FAMILIES)

    results = await asyncio.gather(*(_rotate(store, auditor, f.refresh_token) for f in families))

    outcomes = [o for o in results if isinstance(o, Issued)]
    assert len(outcomes) == FAMILIES
    for family, outcome in zip(families, outcomes, strict=True):
        assert outcome.family_id == family.family_id  # answers are not mixed up in a batch
        assert outcome.refresh_token != family.refresh_token
    async with store.engine.connect() as conn:
        for family, outcome in zip(families, outcomes, strict=True):
            rows = (
                await conn.execute(
                    sa.select(refresh_tokens.c.token_hash, refresh_tokens.c.status).where(
                        refresh_tokens.c.family_id == family.family_id
                    )
                )
            ).all()
            assert sorted(rows) == sorted(
                [(digest(family.refresh_token), "spent"), (digest(outcome.refresh_token), "active")]
            )
        refreshed = await conn.scalar(
            sa.select(sa.func.count()).where(audit_events.c.event == audit.REFRESHED)
        )
    assert refreshed == FAMILIES
    # And every successor works in turn.
    again = await asyncio.gather(*(_rotate(store, auditor, o.refresh_token) for o in outcomes))
    assert all(isinstance(o, Issued) for o in again)


async def test_one_token_twice_in_a_batch_is_reuse(start_app: StartApp) -> None:
    running = await start_app()
    store = running.store
    assert isinstance(store, SqlStore)
    auditor = Auditor(store)
    [family, bystander] = await _families(store, auditor, 2)

    first, second, other = await asyncio.gather(
        _rotate(store, auditor, family.refresh_token),
        _rotate(store, auditor, family.refresh_token),
        _rotate(store, auditor, bystander.refresh_token),
    )

    outcomes = [first, second]
    assert sum(isinstance(o, Issued) for o in outcomes) == 1
    [refused] = [o for o in outcomes if isinstance(o, Refused)]
    assert refused.reason is Refusal.REUSE
    assert isinstance(other, Issued)  # the rest of the batch is untouched
    async with store.engine.connect() as conn:
        revoked = await conn.scalar(
            sa.select(refresh_families.c.revoked_at).where(
                refresh_families.c.id == family.family_id
            )
        )
        bystander_revoked = await conn.scalar(
            sa.select(refresh_families.c.revoked_at).where(
                refresh_families.c.id == bystander.family_id
            )
        )
    assert revoked is not None
    assert bystander_revoked is None


async def test_a_failure_of_one_request_stays_its_own(start_app: StartApp) -> None:
    """A successor whose hash is already stored violates the key: that request fails,
    and the one batched with it still rotates."""
    running = await start_app()
    store = running.store
    assert isinstance(store, SqlStore)
    auditor = Auditor(store)
    [clashing, fine] = await _families(store, auditor, 2)

    def attempt(token: str, successor_hash: str) -> asyncio.Future[object]:
        return asyncio.ensure_future(
            store.rotate_active(
                token_hash=digest(token),
                successor_hash=successor_hash,
                now=time.time(),
                refresh_ttl=600,
                event=auditor.build(audit.REFRESHED, CTX),
                client_id=None,
            )
        )

    results = await asyncio.gather(
        attempt(clashing.refresh_token, digest(fine.refresh_token)),  # a stored token's hash
        attempt(fine.refresh_token, "a-fresh-successor-hash"),
        return_exceptions=True,
    )

    assert isinstance(results[0], Exception)
    assert results[1] is not None and not isinstance(results[1], BaseException)
    async with store.engine.connect() as conn:
        status = await conn.scalar(
            sa.select(refresh_tokens.c.status).where(
                refresh_tokens.c.token_hash == digest(clashing.refresh_token)
            )
        )
    assert status == "active"  # nothing of the failed rotation was kept


async def test_the_batcher_groups_one_loop_turn() -> None:
    seen: list[list[int]] = []

    async def run(items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(run, shared_failure=lambda exc: False)
    answers = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
    assert answers == [0, 10, 20, 30, 40]
    assert seen == [[0, 1, 2, 3, 4]]
    assert await batcher.submit(7) == 70
    assert seen[-1] == [7]


async def test_single_use_ids_arriving_together(start_app: StartApp) -> None:
    """DPoP proofs' and client assertions' ids, recorded a batch at a time: each id
    is taken once, a repeat within the batch or after it is a replay, and an expired
    record gives its id back."""
    running = await start_app()
    store = running.store
    assert isinstance(store, SqlStore)
    now = time.time()

    def use(key: str, *, at: float = now, ttl: float = 60) -> asyncio.Future[bool]:
        return asyncio.ensure_future(store.use_jti(key, expires_at=at + ttl, now=at))

    first = await asyncio.gather(use("a"), use("b"), use("a"), use("c"), use("b"), use("a"))
    assert list(first) == [True, True, False, True, False, False]
    again = await asyncio.gather(use("a"), use("c"), use("d"))
    assert list(again) == [False, False, True]
    # Once a record has expired, its id may be used again (its proof is long refused).
    at = now + 100
    later = await asyncio.gather(use("a", at=at), use("a", at=at), use("e", at=at))
    assert list(later) == [True, False, True]
