"""Login throttling that bounds guessing without locking honest users out.

Failures are counted in the store, so every process sharing the database sees
the same counts, over a sliding window: once the oldest failure in it is older
than the window, the key is free again. Three counts, each with its own limit
(the split Auth0 makes; OWASP ASVS V2.2.1 asks a server to resist lockout):

- per (username, network): `max_failures` guesses at one account from one
  place, then 429 for that pair, the right password included;
- per username, over the networks the user has *not* logged in from:
  `max_failures_per_user`, then 429 for those networks only;
- per network, over all usernames: `max_failures_per_address`, then 429 for
  that network, except for a user's right password at a network known for
  that user.

A network is known for a user once the user has logged in from it, for
`known_address_ttl` seconds after the last such login. So an attacker who does
not know the password cannot lock a user out of a place the user logs in from:
failures from elsewhere count against elsewhere, and failures for other
usernames from the user's own network are waved through for the right password.

A client is counted by the network it owns (`network_of`): an IPv6 host by its
/64, an IPv4-mapped IPv6 address as the IPv4 address.

Limits are checked before the password and again after it: failures are
recorded only once the password check has failed, but an attempt that finds a
limit reached by then (a burst of parallel guesses) is answered 429 even if its
password was right. So of any burst only the first few answers tell a guess
apart (RFC 6819 §4.4.3.6), and honest logins are never counted at all.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from dataclasses import dataclass

from authserver.errors import SlowDownError
from authserver.store.protocol import Store

_IPV6_HOST_PREFIX = 64  # RFC 6177 / RFC 7421: a site or host gets at least a /64


def network_of(client_addr: str) -> str:
    """The network a client address stands for; anything but an IP address as it is."""
    try:
        ip = ipaddress.ip_address(client_addr)
    except ValueError:
        return client_addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, _IPV6_HOST_PREFIX), strict=False))
    return str(ip)


def _key(kind: str, *parts: str) -> str:
    # Hashed: bounded length whatever the client sends, and no usernames in this table.
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
    return f"{kind}:{digest}"


@dataclass(frozen=True, slots=True)
class FailureKeys:
    """What a login's failures are counted under (digests: no usernames stored)."""

    pair: str
    user: str
    network: str | None  # None when the client's address is unknown

    @classmethod
    def of(cls, username: str, client_addr: str | None) -> FailureKeys:
        network = network_of(client_addr) if client_addr else ""
        return cls(
            pair=_key("pair", username, network),
            user=_key("user", username),
            network=_key("addr", network) if network else None,
        )


@dataclass(frozen=True, slots=True)
class ThrottleLimits:
    max_failures: int
    max_failures_per_user: int
    max_failures_per_address: int
    window: int
    known_address_ttl: int


@dataclass(frozen=True, slots=True)
class Attempt:
    """One login attempt's keys, and whether its network is known for its user."""

    user_id: int | None
    keys: FailureKeys
    known: bool


class LoginThrottle:
    def __init__(self, store: Store, limits: ThrottleLimits) -> None:
        self._store = store
        self.limits = limits

    async def begin(
        self, username: str, client_addr: str | None, *, user_id: int | None, now: float
    ) -> Attempt:
        """Start an attempt for `username` (normalised where it can be); `user_id` if the
        user exists. Raises `SlowDownError` if a limit that no password lifts is reached."""
        keys = FailureKeys.of(username, client_addr)
        known = (
            user_id is not None
            and keys.network is not None
            and await self._store.is_login_address(
                user_id, keys.network, since=now - self.limits.known_address_ttl
            )
        )
        attempt = Attempt(user_id=user_id, keys=keys, known=known)
        await self._check(attempt, now=now, extra=0, address_exempt=attempt.known)
        return attempt

    async def failed(self, attempt: Attempt, *, now: float) -> None:
        """Count a failure; raise `SlowDownError` if a limit is reached by now."""
        keys = attempt.keys
        counted = [keys.pair]
        if not attempt.known:
            counted.append(keys.user)
        if keys.network is not None:
            counted.append(keys.network)
        await self._store.add_login_failure(counted, at=now)
        # Counting this failure too: only the attempt that makes a limit still gets a 401.
        await self._check(attempt, now=now, extra=1, address_exempt=False)

    async def succeeded(self, attempt: Attempt, *, now: float) -> None:
        """Re-check the limits (parallel failures may have reached them); then forget the
        pair's failures and remember the network as one the user logs in from."""
        count = await self._check(attempt, now=now, extra=0, address_exempt=attempt.known)
        keys = attempt.keys
        if count:
            await self._store.clear_login_failures(keys.pair)
        if attempt.user_id is not None and keys.network is not None:
            await self._store.remember_login_address(attempt.user_id, keys.network, at=now)

    async def _check(
        self, attempt: Attempt, *, now: float, extra: int, address_exempt: bool
    ) -> int:
        """Raise `SlowDownError` if a count has reached its limit (plus `extra`); else
        the pair's count.

        `address_exempt`: skip the network's count, for an attempt at a network known
        for its user, until its password has failed: the right one is never refused
        for what others did from that network.
        """
        limits, keys = self.limits, attempt.keys
        checks = [(keys.pair, limits.max_failures)]
        if not attempt.known:
            checks.append((keys.user, limits.max_failures_per_user))
        if keys.network is not None and not address_exempt:
            checks.append((keys.network, limits.max_failures_per_address))
        retry_after = 0.0
        counts = []
        for key, limit in checks:
            count, oldest = await self._store.login_failures(key, since=now - limits.window)
            counts.append(count)
            if count >= limit + extra and oldest is not None:
                retry_after = max(retry_after, oldest + limits.window - now)
        if retry_after > 0:
            raise SlowDownError(math.ceil(retry_after))
        return counts[0]
