"""The server's background work, started with the app's lifespan and stopped with it.

- The timing guard's dummy hash costs one bcrypt (~0.3 s at cost 12): it is made
  in the background rather than before listening; a login needing it waits.
- The keys directory is re-read every `keys_reload_interval` seconds, so keys
  added or retired by `authserver keys` reach every running server.
- Expired refresh families, old login failures and login networks unused for
  longer than they are remembered are purged every `purge_interval` (`purge`,
  which `authserver db purge` runs too).
- SQLite's WAL checkpoint runs every second in a thread: it fsyncs, and so it
  never stalls a request.

A failed round is logged and its job carries on: none of this is worth stopping
a server that can still answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from authserver.keys import KeyRing
from authserver.passwords import PasswordHasher
from authserver.store.sql import SqlStore

log = logging.getLogger("authserver")

Jobs = Sequence[asyncio.Task[None]]


def start_jobs(
    *,
    store: SqlStore,
    keyring: KeyRing,
    hasher: PasswordHasher,
    keys_reload_interval: float,
    purge_interval: float,
    login_window: float,
    known_address_ttl: float,
) -> Jobs:
    """Start every background job; hand the result to `stop_jobs` at shutdown."""
    return [
        asyncio.create_task(hasher.warm_up()),
        asyncio.create_task(
            _every(
                keys_reload_interval,
                keyring.reload_if_changed,
                "reloading the keys directory failed",
            )
        ),
        asyncio.create_task(
            _purge_every(
                purge_interval,
                store,
                login_window=login_window,
                known_address_ttl=known_address_ttl,
            )
        ),
        asyncio.create_task(_every(1.0, store.checkpoint, "WAL checkpoint failed")),
    ]


async def stop_jobs(jobs: Jobs) -> None:
    for task in jobs:
        task.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)


async def _every(interval: float, work: Callable[[], object], failure: str) -> None:
    """Run blocking `work` in a thread every `interval` seconds; a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(work)
        except Exception:
            log.exception(failure)


async def purge(
    store: SqlStore, *, now: float, login_window: float, known_address_ttl: float
) -> int:
    """Delete what can no longer matter; how many refresh families went."""
    families = await store.purge_expired(now=now)
    await store.purge_login_failures(before=now - login_window)
    await store.purge_login_addresses(before=now - known_address_ttl)
    await store.purge_used_jtis(before=now)
    await store.purge_browser_sign_in(now=now)
    return families


async def _purge_every(
    interval: float, store: SqlStore, *, login_window: float, known_address_ttl: float
) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            families = await purge(
                store,
                now=time.time(),
                login_window=login_window,
                known_address_ttl=known_address_ttl,
            )
            if families:
                log.info("purged expired refresh families", extra={"families": families})
        except Exception:
            log.exception("housekeeping failed")
