"""Login throttling: failures counted per username and per client address, in the store.

Counting in the store (not in memory) makes every process that shares the
database see the same counts. The window slides: once the oldest failure in it
is older than the window, the key is free again, so nobody is locked out for good.
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

    async def validate(self, username: str, client_addr: str | None, *, now: float) -> bool:
        """Raise `SlowDownError` if either key is over its limit; True if the user has failures."""
        user_has_failures = False
        retry_after = 0.0
        for index, key in enumerate(self.keys(username, client_addr)):
            count, oldest = await self._store.login_failures(key, since=now - self._window)
            if index == 0:
                user_has_failures = count > 0
            if count >= self._max and oldest is not None:
                retry_after = max(retry_after, oldest + self._window - now)
        if retry_after > 0:
            raise SlowDownError(math.ceil(retry_after))
        return user_has_failures

    async def record_failure(self, username: str, client_addr: str | None, *, now: float) -> None:
        await self._store.add_login_failure(self.keys(username, client_addr), at=now)

    async def reset(self, username: str) -> None:
        await self._store.clear_login_failures(_key("user", username))
