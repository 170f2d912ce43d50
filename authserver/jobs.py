"""The server's background work, started with the app's lifespan and stopped with it.

- The timing guard's dummy hash costs one bcrypt (~0.3 s at cost 12): it is made
  in the background rather than before listening; a login needing it waits.
- The keys directory is re-read every `keys_reload_interval` seconds, so keys
  added or retired by `authserver keys` reach every running server; the metric of
  loaded keys follows.
- Expired refresh families, old login failures and login networks unused for
  longer than they are remembered are purged every `purge_interval` (`purge`,
  which `authserver db purge` runs too); the single-use ids of DPoP proofs and
  client assertions every `USED_ID_PURGE_INTERVAL` seconds.
- SQLite's WAL checkpoint runs every second in a thread: it fsyncs, and so it
  never stalls the event loop (the process's writes wait for its short last pass).

A failed round is logged and its job carries on: none of this is worth stopping
a server that can still answer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from authserver import metrics
from authserver.keys import KeyRing
from authserver.passwords import PasswordHasher
from authserver.store.sql import SqlStore

log = logging.getLogger("authserver")

Jobs = Sequence[asyncio.Task[None]]

# Single-use ids (DPoP proofs' and client assertions' `jti`) matter for a proof window
# (a minute by default) or an assertion's short life. A busy DPoP server records one
# per request, each at a random place in the table's indexes, so they are purged
# every few seconds: the table stays a few windows of traffic, not a purge interval's.
USED_ID_PURGE_INTERVAL = 10.0


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

    def reload_keys() -> None:
        keyring.reload_if_changed()
        metrics.SIGNING_KEYS.set(len(keyring.jwks()["keys"]))

    async def housekeeping() -> None:
        purged = await purge(
            store, now=time.time(), login_window=login_window, known_address_ttl=known_address_ttl
        )
        if purged.refresh_families:
            log.info("purged expired refresh families", extra={"families": purged.refresh_families})

    metrics.SIGNING_KEYS.set(len(keyring.jwks()["keys"]))
    jobs = [
        _every(
            keys_reload_interval, _in_thread(reload_keys), "reloading the keys directory failed"
        ),
        _every(purge_interval, housekeeping, "housekeeping failed"),
        _every(
            USED_ID_PURGE_INTERVAL,
            functools.partial(forget_used_ids, store),
            "purging single-use ids failed",
        ),
        _every(1.0, store.checkpoint, "WAL checkpoint failed"),
    ]
    return [asyncio.create_task(hasher.warm_up()), *(asyncio.create_task(job) for job in jobs)]


async def stop_jobs(jobs: Jobs) -> None:
    for task in jobs:
        task.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)


async def forget_used_ids(store: SqlStore) -> None:
    """The single-use ids whose proof or assertion could no longer be accepted."""
    await store.purge_used_jtis(before=time.time())


def _in_thread(work: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """Blocking `work` as a job: run in a thread, so it never holds the event loop."""
    return functools.partial(asyncio.to_thread, work)


async def _every(interval: float, work: Callable[[], Awaitable[object]], failure: str) -> None:
    """Await `work` every `interval` seconds; a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(interval)
        try:
            await work()
        except Exception:
            log.exception(failure)


@dataclass(frozen=True, slots=True)
class Purged:
    """How many rows of each kind a purge deleted."""

    refresh_families: int
    login_failures: int
    login_networks: int
    assertion_ids: int
    authorization_codes: int
    browser_sessions: int

    def describe(self) -> list[str]:
        """One line per kind, for people."""
        return [
            f"purged {self.refresh_families} refresh families (expired or revoked)",
            f"purged {self.login_failures} login failures (older than the login window)",
            f"purged {self.login_networks} known login networks (unused for longer than "
            "they are remembered)",
            f"purged {self.assertion_ids} client-assertion ids (expired)",
            f"purged {self.authorization_codes} authorization codes (expired, and their "
            "browser session ended)",
            f"purged {self.browser_sessions} browser sessions (ended or expired)",
        ]


async def purge(
    store: SqlStore, *, now: float, login_window: float, known_address_ttl: float
) -> Purged:
    """Delete what can no longer matter; how many rows of each kind went."""
    families = await store.purge_expired(now=now)
    failures = await store.purge_login_failures(before=now - login_window)
    networks = await store.purge_login_addresses(before=now - known_address_ttl)
    assertion_ids = await store.purge_used_jtis(before=now)
    codes, browser_sessions = await store.purge_browser_sign_in(now=now)
    return Purged(families, failures, networks, assertion_ids, codes, browser_sessions)
