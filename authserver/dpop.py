"""DPoP proofs (RFC 9449): checked at the token endpoint and at resources, and the
server's nonces. https://www.rfc-editor.org/rfc/rfc9449

A proof is a JWT the client signs for each request with a key it keeps; a token
bound to that key (`cnf.jkt`) is worth nothing to whoever steals it without the
key. `ProofChecker.check` runs RFC 9449 §4.3's checks in order: the JWS itself
(`tokens.verify_self_signed`: `typ`, an allow-listed asymmetric `alg`, a public
`jwk`, the signature), then `htm`, `htu`, `iat`, `ath`, the nonce, and last the
`jti`, recorded once (`ReplayCache`), so that only a proof that passed every
other check uses up a slot.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import math
import re
import string
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from authserver.errors import InvalidDPoPProofError, UseDPoPNonceError
from authserver.keys import ALGORITHMS
from authserver.store.protocol import used_id
from authserver.tokens import verify_self_signed

PROOF_TYPE = "dpop+jwt"
# RFC 8414 / RFC 9449 §5.1 `dpop_signing_alg_values_supported`: the project's one list.
SIGNING_ALGORITHMS = ALGORITHMS
MAX_JTI_LENGTH = 256
# The `used_jtis` namespace of proofs (client assertions use "jwt:").
_REPLAY_NAMESPACE = "dpop:"

log = logging.getLogger(__name__)


class ReplayCache(Protocol):
    """Where the `jti`s of accepted proofs are kept while the proofs could still be
    accepted; `use_once` is False for a key already there."""

    async def use_once(self, key: str, *, expires_at: float, now: float) -> bool: ...


class JtiStore(Protocol):
    async def use_jti(self, key: str, *, expires_at: float, now: float) -> bool: ...


class StoreReplayCache:
    """The server's: the store's `used_jtis` table, shared by every process using the
    database, so a proof replayed to another process is caught too."""

    def __init__(self, store: JtiStore) -> None:
        self._store = store

    async def use_once(self, key: str, *, expires_at: float, now: float) -> bool:
        return await self._store.use_jti(key, expires_at=expires_at, now=now)


class MemoryReplayCache:
    """One process's memory: the resource kit's default. An API served by several
    processes passes a `ReplayCache` they share (a database, Redis) instead.

    It holds at most `max_entries` ids. Forgetting one that could still be
    accepted would let its proof be replayed, so when every id held is still live
    it refuses new proofs (they fail as replays) until some expire."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        # Ids expire about in the order they came (`iat` + one window), so the
        # expired ones are mostly at the front.
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._max = max_entries
        self._swept_at = -math.inf

    async def use_once(self, key: str, *, expires_at: float, now: float) -> bool:
        seen = self._seen
        while seen:
            first, until = next(iter(seen.items()))
            if until > now:
                break
            del seen[first]
        known = seen.get(key)
        if known is not None and known > now:
            return False
        if len(seen) >= self._max:
            # A whole sweep costs milliseconds at this size: at most one a second, or
            # a flood of proofs would pay for one each.
            if now - self._swept_at >= 1.0:
                self._swept_at = now
                for old in [k for k, until in seen.items() if until <= now]:
                    del seen[old]
            if len(seen) >= self._max:
                log.warning(
                    "The DPoP replay cache holds %d live proof ids; refusing proofs "
                    "until some expire.",
                    len(seen),
                )
                return False
        seen[key] = expires_at
        return True


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _equal(sent: str, expected: str) -> bool:
    """Constant-time equality of a string a client sent (any Unicode) and ours;
    `hmac.compare_digest` refuses non-ASCII strings."""
    return hmac.compare_digest(sent.encode("utf-8", "replace"), expected.encode("utf-8"))


class Nonces:
    """Server nonces (RFC 9449 §8) that need no storage: a time step and its HMAC.

    A nonce is good during the step it was made in and the next, so it lives
    between `lifetime` and twice that. `secrets` returns the HMAC keys, the one to
    make nonces with first; every process deriving the same keys accepts the
    others' nonces (the server derives them from its signing keys).
    """

    def __init__(
        self,
        secrets: Callable[[], Sequence[bytes]],
        *,
        lifetime: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secrets = secrets
        self._lifetime = lifetime
        self._clock = clock

    def _step(self) -> int:
        return int(self._clock() // self._lifetime)

    @staticmethod
    def _make(secret: bytes, step: int) -> str:
        packed = struct.pack(">Q", step)
        return _b64(packed + hmac.new(secret, packed, hashlib.sha256).digest()[:16])

    def current(self) -> str:
        """A nonce for clients to use now."""
        return self._make(self._secrets()[0], self._step())

    def check(self, nonce: object) -> bool:
        if not isinstance(nonce, str) or len(nonce) > 64:
            return False
        step = self._step()
        return any(
            _equal(nonce, self._make(secret, s))
            for secret in self._secrets()
            for s in (step, step - 1)
        )


_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _percent(match: re.Match[str]) -> str:
    char = chr(int(match.group()[1:], 16))
    return char if char in _UNRESERVED else match.group().upper()


@functools.lru_cache(maxsize=4096)  # a client sends the same few URLs again and again
def normalise_url(url: str) -> str | None:
    """`url` without query and fragment, normalised as RFC 9449 §4.3 asks (RFC 3986
    §6.2.2 and §6.2.3: case of scheme, host and percent-encodings, unreserved
    characters decoded, default port and empty path); None if it is no http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    return f"{scheme}://{host}{_PERCENT.sub(_percent, parts.path) or '/'}"


@functools.lru_cache(maxsize=1024)  # a client presents one token with many proofs
def access_token_hash(access_token: str) -> str:
    """RFC 9449 §4.2 `ath`: base64url of the SHA-256 of the token's ASCII."""
    return _b64(hashlib.sha256(access_token.encode("ascii", "replace")).digest())


@dataclass(frozen=True, slots=True)
class Proof:
    """A proof that passed every check: who signed it (`jkt`) and its `jti`."""

    jkt: str
    jti: str
    iat: float


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidDPoPProofError(f"The DPoP proof has no valid '{name}' claim.")
    return float(value)


# Where an ASGI middleware that rewrites a request's method (the server's `HeadAsGet`)
# keeps the method the client sent, which is the one its proof names (`htm`).
SENT_METHOD = "authserver.sent_method"


def sent_method(scope: Mapping[str, Any]) -> str:
    """The HTTP method the client sent: `scope`'s, unless a middleware rewrote it."""
    method: str = scope.get(SENT_METHOD) or scope["method"]
    return method


class ProofChecker:
    """Checks DPoP proofs (RFC 9449 §4.3); share one per process.

    `window` is how far (seconds) a proof's `iat` may be from now, either way;
    its `jti` is remembered for that long after `iat`. With `nonces`, every proof
    must carry a current server nonce (`use_dpop_nonce` otherwise). `base_url` is
    the public URL the service is reached at, if a proxy in front of it rewrites
    the scheme, host or a path prefix: a proof's `htu` may then name either.
    """

    def __init__(
        self,
        *,
        replay: ReplayCache,
        window: float = 60.0,
        nonces: Nonces | None = None,
        base_url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.replay = replay
        self.base_url = base_url.rstrip("/") if base_url else None
        self.window = window
        self.nonces = nonces
        self._clock = clock

    async def check(
        self,
        proofs: Sequence[str],
        *,
        method: str,
        url: str,
        access_token: str | None = None,
        jkt: str | None = None,
    ) -> Proof:
        """The checked proof of a request whose `DPoP` header values are `proofs`, sent
        with `method` to `url` (as received). At a resource, `access_token` is the
        token the proof must be for (`ath`) and `jkt` the key it is bound to. Raises
        `InvalidDPoPProofError` or `UseDPoPNonceError`."""
        if len(proofs) != 1:
            raise InvalidDPoPProofError("Send exactly one DPoP header.")
        claims, thumbprint = verify_self_signed(proofs[0], typ=PROOF_TYPE)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
            raise InvalidDPoPProofError("The DPoP proof has no valid 'jti' claim.")
        if claims.get("htm") != method:
            raise InvalidDPoPProofError("The DPoP proof is for another HTTP method.")
        htu = claims.get("htu")
        target = normalise_url(htu) if isinstance(htu, str) else None
        if target is None or target not in self._targets(url):
            raise InvalidDPoPProofError("The DPoP proof is for another URL.")
        iat, now = _number(claims, "iat"), self._clock()
        if iat < now - self.window:
            raise InvalidDPoPProofError("The DPoP proof is too old.")
        if iat > now + self.window:
            raise InvalidDPoPProofError("The DPoP proof was issued in the future.")
        if access_token is not None:
            ath = claims.get("ath")
            if not isinstance(ath, str) or not _equal(ath, access_token_hash(access_token)):
                raise InvalidDPoPProofError("The DPoP proof is for another access token.")
        if jkt is not None and not _equal(thumbprint, jkt):
            raise InvalidDPoPProofError("The DPoP proof is signed by another key than the token's.")
        if self.nonces is not None and not self.nonces.check(claims.get("nonce")):
            raise UseDPoPNonceError(self.nonces.current())
        key = used_id(_REPLAY_NAMESPACE, thumbprint, jti)
        if not await self.replay.use_once(key, expires_at=iat + self.window, now=now):
            raise InvalidDPoPProofError("The DPoP proof was already used.")
        return Proof(thumbprint, jti, iat)

    def _targets(self, url: str) -> tuple[str | None, ...]:
        """What `htu` may name for a request received at `url`: that URL and, behind a
        proxy, the same path under `base_url` (None for a URL that cannot be)."""
        own = normalise_url(url)
        if self.base_url is None or own is None:
            return (own,)
        return own, normalise_url(self.base_url + urlsplit(url).path)
