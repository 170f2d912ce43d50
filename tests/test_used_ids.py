"""Single-use ids (DPoP proofs' and client assertions' `jti`): their keys, and how they
are forgotten once they can no longer be replayed."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import sqlalchemy as sa

from authserver import jobs
from authserver.config import Settings
from authserver.store.migrate import upgrade_async
from authserver.store.protocol import used_id
from authserver.store.schema import used_jtis
from authserver.store.sql import SqlStore


def test_a_used_id_is_its_namespace_and_a_short_digest_of_its_parts() -> None:
    key = used_id("dpop:", "thumbprint", "jti-1")
    assert key.startswith("dpop:")
    assert len(key) == len("dpop:") + 22  # 128 bits in base64url, unpadded
    assert key == used_id("dpop:", "thumbprint", "jti-1")
    # Who issued it is part of it: the same jti from another key or client is another id,
    # and the separator keeps the parts' boundary.
    assert key != used_id("dpop:", "thumbprint", "jti-2")
    assert key != used_id("dpop:", "other", "jti-1")
    assert used_id("jwt:", "a", "bc") != used_id("jwt:", "ab", "c")
    # Any text a JSON string may hold, lone surrogates included, makes a key.
    assert used_id("jwt:", "client", "\ud800").startswith("jwt:")


async def test_a_purge_in_chunks_forgets_every_expired_id_and_only_those(
    store: SqlStore,
) -> None:
    now = time.time()
    for n in range(11):
        assert await store.use_jti(f"dpop:old-{n}", expires_at=now - 1, now=now - 60)
    for n in range(2):
        assert await store.use_jti(f"dpop:live-{n}", expires_at=now + 60, now=now)
    assert await store.purge_used_jtis(before=now, chunk=3) == 11
    # The live ones are still replays; the expired ones may be used again.
    assert not await store.use_jti("dpop:live-0", expires_at=now + 60, now=now)
    assert not await store.use_jti("dpop:live-1", expires_at=now + 60, now=now)
    assert await store.purge_used_jtis(before=now, chunk=3) == 0
    assert await store.use_jti("dpop:old-0", expires_at=now + 60, now=now)


async def test_the_server_forgets_expired_ids_every_few_seconds(store: SqlStore) -> None:
    assert jobs.USED_ID_PURGE_INTERVAL <= 30  # a window or so of traffic, not an hour's
    now = time.time()
    assert await store.use_jti("dpop:soon", expires_at=now + 0.2, now=now)
    assert await store.use_jti("dpop:later", expires_at=now + 3600, now=now)
    assert await rows(store) == 2
    forget = functools.partial(jobs.forget_used_ids, store)
    job = asyncio.create_task(jobs._every(0.1, forget, "purging single-use ids failed"))
    try:
        deadline = time.monotonic() + 10
        while await rows(store) != 1:
            assert time.monotonic() < deadline, "the job never purged the expired id"
            await asyncio.sleep(0.05)
    finally:
        job.cancel()
    assert not await store.use_jti("dpop:later", expires_at=now + 3600, now=time.time())


async def rows(store: SqlStore) -> int:
    async with store.engine.connect() as conn:
        count = await conn.scalar(sa.select(sa.func.count()).select_from(used_jtis))
    return int(count or 0)


async def _wal_size_under_writes(path: Path, *, beside: bool) -> int:
    """The size the WAL reaches while ids are written without a pause and a checkpoint
    runs every 20 ms, 25 times (the server's job: every second): the store's, or one in a thread
    beside the writes (`beside`)."""
    store = SqlStore.from_settings(Settings(database_url=f"sqlite:///{path}"))
    try:
        await upgrade_async(store.engine)
        stop = asyncio.Event()

        async def write() -> None:
            n = 0
            while not stop.is_set():
                now = time.time()
                ids = (f"dpop:{n}-{i}" for i in range(8))
                await asyncio.gather(
                    *(store.use_jti(key, expires_at=now + 60, now=now) for key in ids)
                )
                n += 1

        writer = asyncio.create_task(write())
        try:
            for _ in range(25):
                await asyncio.sleep(0.02)
                if beside:
                    await asyncio.to_thread(store._checkpoint)
                else:
                    await store.checkpoint()
        finally:
            stop.set()
            await writer
        return Path(f"{path}-wal").stat().st_size
    finally:
        await store.close()


async def test_the_wal_starts_over_under_a_steady_stream_of_writes(tmp_path: Path) -> None:
    """A checkpoint beside the writes never reaches the end of the log, so the log never
    starts over and only grows; the store's checkpoint lets this process's writes wait."""
    beside = await _wal_size_under_writes(tmp_path / "beside.db", beside=True)
    waiting = await _wal_size_under_writes(tmp_path / "waiting.db", beside=False)
    assert waiting < beside / 2, (waiting, beside)
