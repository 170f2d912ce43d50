"""Login throttling: failures counted per username and per client address, in the store.

Counting in the store (not in memory) makes every process that shares the
database see the same counts. The window slides: once the oldest failure in it
is older than the window, the key is free again, so nobody is locked out for good.

Limits are checked before the password and again after it: failures are
recorded only once the password check has failed, but an attempt that finds
the limit reached by then (a burst of parallel guesses) is answered 429 even
if its password was right. So of any burst, only the first `max_failures`
answers tell a guess apart (RFC 6819 §4.4.3.6), while honest users logging in
in parallel from one address are never counted at all.
"""

from __future__ import annotations

import hashlib
import math

from authserver.errors import SlowDownError
from authserver.store.protocol import Store


def _key(kind: str, value: str) -> str:
    # Hashed: bounded length whatever the client sends, and no usernames in this table.
    return f"{kind}:{hashlib.sha256(value.encode('utf-8', 'surrogatepass')).hexdigest()}"


class LoginThrottle:
    def __init__(self, store: Store, *, max_failures: int, window: int) -> None:
        self._store = store
        self._max = max_failures
        self._window = window

    def keys(self, username: str, client_addr: str | None) -> list[str]:
        keys = [_key("user", username)]
        if client_addr:
            keys.append(_key("addr", client_addr))
        return keys

    async def _over_limit(self, keys: list[str], *, now: float, limit: int) -> float:
        """Seconds until the first key over `limit` failures frees up; 0 if none is."""
        retry_after = 0.0
        for key in keys:
            count, oldest = await self._store.login_failures(key, since=now - self._window)
            if count >= limit and oldest is not None:
                retry_after = max(retry_after, oldest + self._window - now)
        return retry_after

    async def validate(self, username: str, client_addr: str | None, *, now: float) -> None:
        """Raise `SlowDownError` if the username or the address has reached the limit."""
        retry_after = await self._over_limit(
            self.keys(username, client_addr), now=now, limit=self._max
        )
        if retry_after > 0:
            raise SlowDownError(math.ceil(retry_after))

    async def failed(self, username: str, client_addr: str | None, *, now: float) -> None:
        """Count a failure; raise `SlowDownError` if others reached the limit meanwhile."""
        keys = self.keys(username, client_addr)
        await self._store.add_login_failure(keys, at=now)
        # Counting this failure too: only the attempt that makes `max` still gets a 401.
        retry_after = await self._over_limit(keys, now=now, limit=self._max + 1)
        if retry_after > 0:
            raise SlowDownError(math.ceil(retry_after))

    async def succeeded(self, username: str, client_addr: str | None, *, now: float) -> None:
        """Re-check the limit (parallel failures may have reached it); then reset the username."""
        await self.validate(username, client_addr, now=now)
        user_key = self.keys(username, None)[0]
        count, _ = await self._store.login_failures(user_key, since=now - self._window)
        if count:
            await self._store.clear_login_failures(user_key)
