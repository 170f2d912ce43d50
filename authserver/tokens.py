"""JWTs: access tokens (RFC 9068) minted and verified, and client assertions (RFC 7523)
signed and verified. The only module that imports jose.

python-jose 3.5 is lax in ways an auth server cannot be, so verification
does not lean on `jwt.decode`: it checks the header itself (`typ`, `kid`,
`alg` pinned to the key's own algorithm, never HS*/none), verifies the
signature with a prepared jose key, then requires every registered claim.
Every failure, whatever raised it, becomes `InvalidTokenError`.
"""

from __future__ import annotations

import binascii
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jws
from jose.backends.base import Key as JoseKey
from jose.jwk import construct

from authserver.errors import InvalidDPoPProofError, InvalidTokenError
from authserver.keys import ALGORITHMS, KEY_TYPES, KeyRing, public_key_of, thumbprint

ACCESS_TOKEN_TYPE = "at+jwt"
_ACCEPTED_TYPES = frozenset({"at+jwt", "application/at+jwt"})
MAX_TOKEN_LENGTH = 8192
_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# A segment of 4n+2 characters ends in 4 unused bits, of 4n+3 in 2 (RFC 4648 §3.5).
_UNUSED_BITS = {2: 0x0F, 3: 0x03}


class UnknownKeyError(InvalidTokenError):
    """The token names a `kid` the key source does not have (yet): a JWKS-backed
    source may refetch and try again; to the client it is just `invalid_token`."""

    def __init__(self, kid: str) -> None:
        super().__init__("The access token was signed by an unknown key.")
        self.kid = kid


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """The verified claims of an access token."""

    sub: str
    scope: tuple[str, ...]
    client_id: str
    exp: float
    iat: float
    jti: str
    iss: str
    aud: str | list[str]
    raw: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    alg: str
    key: JoseKey


class KeySource(Protocol):
    """Where a verifier finds keys by `kid`; `generation` changes whenever the set does."""

    @property
    def generation(self) -> int: ...

    def verification_key(self, kid: str) -> VerificationKey | None: ...


def prepare_key(key: object, alg: str) -> JoseKey:
    """Wrap a `cryptography` key object (or a JWK dict) as a jose key, once."""
    if alg not in ALGORITHMS:
        raise ValueError(f"algorithm {alg!r} is not allowed")
    prepared: JoseKey = construct(key, alg)
    return prepared


def mint_access_token(
    *,
    key: JoseKey,
    kid: str,
    alg: str,
    issuer: str,
    audience: str,
    subject: str,
    scope: str,
    client_id: str,
    ttl: int,
    now: float | None = None,
    sid: str | None = None,
    jkt: str | None = None,
) -> tuple[str, int]:
    """Sign an RFC 9068 access token; returns the token and its `expires_in`.

    `sid` names the session (the refresh family) of a user's token; a client's own
    token (client_credentials) has none. `jkt` binds the token to a DPoP key
    (RFC 9449 §6.1: `cnf.jkt`, the key's RFC 7638 thumbprint).
    """
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "exp": issued + ttl,
        "iat": issued,
        "jti": secrets.token_urlsafe(16),
        "scope": scope,
        "client_id": client_id,
    }
    if sid is not None:
        claims["sid"] = sid
    if jkt is not None:
        claims["cnf"] = {"jkt": jkt}
    payload = orjson.dumps(claims)
    token: str = jws.sign(
        payload, key, headers={"kid": kid, "typ": ACCESS_TOKEN_TYPE}, algorithm=alg
    )
    return token, ttl


def _b64decode(segment: bytes) -> bytes:
    # RFC 7515 §2: base64url without padding; reject any other spelling. Checked
    # with C-level byte operations: this runs three times per fresh token.
    size = len(segment) % 4
    if not segment or size == 1 or segment.translate(None, _B64URL_ALPHABET):
        raise InvalidTokenError("The access token is malformed.")
    if size:
        # Unused low bits in the last character would give one value many spellings.
        if _B64URL_ALPHABET.index(segment[-1]) & _UNUSED_BITS[size]:
            raise InvalidTokenError("The access token is malformed.")
        segment += b"=" * (4 - size)
    try:
        return binascii.a2b_base64(segment.translate(_URLSAFE_TO_STANDARD), strict_mode=True)
    except binascii.Error as exc:
        raise InvalidTokenError("The access token is malformed.") from exc


def _lenient_b64decode(segment: bytes) -> bytes:
    # `base64.urlsafe_b64decode` without its wrappers (twice a DPoP proof): the same
    # translation and the same non-strict decoding.
    if not segment:
        raise InvalidTokenError("The token is malformed.")
    try:
        padded = segment + b"=" * (-len(segment) % 4)
        return binascii.a2b_base64(padded.translate(_URLSAFE_TO_STANDARD))
    except (binascii.Error, ValueError) as exc:
        raise InvalidTokenError("The token is malformed.") from exc


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise InvalidTokenError(f"The access token {what} is not valid JSON.") from exc
    if not isinstance(value, dict):
        raise InvalidTokenError(f"The access token {what} is not a JSON object.")
    return value


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTokenError(f"The access token has no valid '{name}' claim.")
    return float(value)


def _string(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidTokenError(f"The access token has no valid '{name}' claim.")
    return value


# RFC 7523 §2.2: a client authenticating with a JWT it signed (`private_key_jwt`).
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def load_private_key(key: str | bytes | Any) -> tuple[JoseKey, str]:
    """A client's private key (a PEM, or a `cryptography` RSA or EC P-256 key) as a
    jose key, with the algorithm that goes with it."""
    if isinstance(key, (str, bytes)):
        pem = key.encode("ascii") if isinstance(key, str) else key
        key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        alg = "RS256"
    elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        alg = "ES256"
    else:
        raise TypeError("the private key must be RSA or EC P-256")
    return prepare_key(key, alg), alg


def sign_jwt(claims: Mapping[str, Any], *, key: JoseKey, alg: str, kid: str | None) -> str:
    """Sign `claims` as a JWT (`typ: JWT`), e.g. a client assertion."""
    headers = {"typ": "JWT", **({"kid": kid} if kid else {})}
    token: str = jws.sign(orjson.dumps(dict(claims)), key, headers=headers, algorithm=alg)
    return token


def jwt_header(token: str) -> dict[str, Any]:
    """The (unverified) header of a compact JWS; `InvalidTokenError` if it has none."""
    try:
        segment = token.encode("ascii").split(b".", 1)[0]
    except UnicodeEncodeError as exc:
        raise InvalidTokenError("The token is malformed.") from exc
    return _json_object(_b64decode(segment), "header")


def verify_assertion(assertion: str, keys: Sequence[VerificationKey]) -> dict[str, Any]:
    """The claims of a JWT signed by one of `keys` (a client's, for RFC 7523); raises
    `InvalidTokenError`. Its `alg` must be one of `keys.ALGORITHMS` and the key's own,
    and a `kid`, if it names one, picks the key; the claims are the caller's to check."""
    if not isinstance(assertion, str) or len(assertion) > MAX_TOKEN_LENGTH:
        raise InvalidTokenError("The assertion is malformed.")
    try:
        parts = assertion.encode("ascii").split(b".")
    except UnicodeEncodeError as exc:
        raise InvalidTokenError("The assertion is malformed.") from exc
    if len(parts) != 3:
        raise InvalidTokenError("The assertion is malformed.")
    header = _json_object(_b64decode(parts[0]), "header")
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ALGORITHMS or "crit" in header:
        raise InvalidTokenError("The assertion's algorithm is not allowed.")
    signature = _b64decode(parts[2])
    for key in keys:
        if key.alg != alg or (kid is not None and key.kid != kid):
            continue
        try:
            if key.key.verify(parts[0] + b"." + parts[1], signature):
                return _json_object(_b64decode(parts[1]), "payload")
        except Exception:
            continue
    raise InvalidTokenError("The assertion signature is invalid.")


# RFC 9449 §4.2: a proof's `jwk` header holds the public key and nothing private.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# RFC 7638 §3.2: the members that make a key's thumbprint, and all a public key needs.
_REQUIRED_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}
_MAX_EMBEDDED_KEYS = 10_000


@dataclass(frozen=True, slots=True)
class EmbeddedKey:
    """A public key carried in a JWS header (`jwk`), prepared, with its RFC 7638 thumbprint."""

    key: JoseKey
    thumbprint: str


# Clients keep their DPoP key for a long time: parse and thumbprint each key once.
_embedded_keys: OrderedDict[tuple[str, tuple[tuple[str, str], ...]], EmbeddedKey] = OrderedDict()


def _embedded_key(jwk: object, alg: str) -> EmbeddedKey:
    if not isinstance(jwk, dict):
        raise InvalidDPoPProofError("The DPoP proof has no 'jwk' header.")
    if not _PRIVATE_MEMBERS.isdisjoint(jwk):
        raise InvalidDPoPProofError("The DPoP proof's jwk holds a private key.")
    kty = KEY_TYPES[alg]
    if jwk.get("kty") != kty:
        raise InvalidDPoPProofError("The DPoP proof's jwk does not match its algorithm.")
    members = tuple((name, jwk.get(name)) for name in _REQUIRED_MEMBERS[kty])
    if not all(isinstance(value, str) and value for _, value in members):
        raise InvalidDPoPProofError("The DPoP proof's jwk is incomplete.")
    cache_key = (alg, tuple((name, str(value)) for name, value in members))
    known = _embedded_keys.get(cache_key)
    if known is not None:
        return known
    try:
        public = public_key_of(dict(cache_key[1]))  # RSA of 2048 to 8192 bits, or P-256
        prepared = EmbeddedKey(prepare_key(public, alg), thumbprint(public))
    except Exception as exc:
        raise InvalidDPoPProofError("The DPoP proof's jwk is not a usable public key.") from exc
    if len(_embedded_keys) >= _MAX_EMBEDDED_KEYS:
        _embedded_keys.popitem(last=False)
    _embedded_keys[cache_key] = prepared
    return prepared


# A client signs every proof with the same header (`typ`, `alg`, its `jwk`): the header
# segment, byte for byte, stands for the checks below, so a known one skips them (its
# base64, JSON and jwk). Only headers that passed are kept; any other byte is a miss.
_proof_headers: OrderedDict[tuple[bytes, str], EmbeddedKey] = OrderedDict()


def _proof_header_key(segment: bytes, typ: str) -> EmbeddedKey:
    """The key of a self-signed JWT's header `segment` (as sent), its header checked."""
    cache_key = (segment, typ)
    known = _proof_headers.get(cache_key)
    if known is not None:
        _proof_headers.move_to_end(cache_key)
        return known
    try:
        header = _json_object(_lenient_b64decode(segment), "header")
    except InvalidTokenError as exc:
        raise InvalidDPoPProofError("The DPoP proof is malformed.") from exc
    if header.get("typ") != typ:
        raise InvalidDPoPProofError(f"The DPoP proof's typ must be {typ}.")
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise InvalidDPoPProofError("The DPoP proof's algorithm is not allowed.")
    if "crit" in header:
        raise InvalidDPoPProofError("The DPoP proof has unsupported critical headers.")
    key = _embedded_key(header.get("jwk"), alg)
    if len(_proof_headers) >= _MAX_EMBEDDED_KEYS:
        _proof_headers.popitem(last=False)
    _proof_headers[cache_key] = key
    return key


def verify_self_signed(jwt: str, *, typ: str) -> tuple[dict[str, Any], str]:
    """The claims of a JWT of type `typ` signed by the public key in its own `jwk` header
    (a DPoP proof, RFC 9449 §4.3 steps 2 to 7), and that key's RFC 7638 thumbprint;
    raises `InvalidDPoPProofError`.

    The header is checked before the signature: `typ` exactly, `alg` one of
    `keys.ALGORITHMS` (asymmetric: never `none` or HS*), the key's type the
    algorithm's, no private member and no `crit`. The claims are the caller's to check.
    """
    if not isinstance(jwt, str) or len(jwt) > MAX_TOKEN_LENGTH:
        raise InvalidDPoPProofError("The DPoP proof is malformed.")
    try:
        parts = jwt.encode("ascii").split(b".")
        if len(parts) != 3:
            raise InvalidDPoPProofError("The DPoP proof is malformed.")
        # Not `_b64decode`'s one-spelling check: the signature covers the segments as
        # sent, and a proof is single-use by its `jti`, whatever its spelling.
        signature = _lenient_b64decode(parts[2])
        payload = parts[1]
    except (UnicodeEncodeError, InvalidTokenError) as exc:
        raise InvalidDPoPProofError("The DPoP proof is malformed.") from exc
    key = _proof_header_key(parts[0], typ)
    try:
        valid = key.key.verify(parts[0] + b"." + payload, signature)
    except Exception:
        valid = False
    if not valid:
        raise InvalidDPoPProofError("The DPoP proof's signature is invalid.")
    try:
        claims = _json_object(_lenient_b64decode(payload), "payload")
    except InvalidTokenError as exc:
        raise InvalidDPoPProofError("The DPoP proof is malformed.") from exc
    return claims, key.thumbprint


def sign_with_embedded_key(
    claims: Mapping[str, Any], *, key: JoseKey, alg: str, jwk: Mapping[str, str], typ: str
) -> str:
    """Sign `claims` with the public key in the header (`jwk`): a DPoP proof's shape."""
    headers = {"typ": typ, "jwk": dict(jwk)}
    token: str = jws.sign(orjson.dumps(dict(claims)), key, headers=headers, algorithm=alg)
    return token


class AccessTokenVerifier:
    """Verifies access tokens against a key source; safe to share across requests.

    `audience=None` accepts a token for any audience (it must name one): the
    server's own introspection, for tokens issued to clients with audiences of
    their own. A resource server always names its audience.

    Verified tokens are remembered (keyed by the exact token string, until their
    `exp`, forgotten whenever the key set changes), so a client that reuses its
    token costs one dictionary lookup. Another spelling of the same token is a
    miss and gets the full check. At most `cache_size` are kept, the least
    recently used going first: an `OrderedDict`, whose eviction costs the same
    however many entries came and went (a plain dict's `next(iter(...))` walks
    over the holes its deletions leave: 10 µs a fresh token, measured).
    """

    def __init__(
        self,
        keys: KeySource,
        *,
        issuer: str,
        audience: str | None,
        leeway: float = 0.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[str, AccessClaims] = OrderedDict()
        self._generation = keys.generation

    def verify(self, token: str) -> AccessClaims:
        """Return the claims of a valid token; raise `InvalidTokenError` otherwise."""
        now = self._clock()
        if self._generation != self._keys.generation:
            self._cache.clear()
            self._generation = self._keys.generation
        cached = self._cache.get(token)
        if cached is not None:
            if now < cached.exp + self._leeway:
                self._cache.move_to_end(token)
                return cached
            del self._cache[token]
        claims = self._verify(token, now)
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                self._cache.popitem(last=False)
            self._cache[token] = claims
        return claims

    def _verify(self, token: str, now: float) -> AccessClaims:
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            raise InvalidTokenError("The access token is malformed.")
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError as exc:
            raise InvalidTokenError("The access token is malformed.") from exc
        parts = raw.split(b".")
        if len(parts) != 3:
            raise InvalidTokenError("The access token is malformed.")
        header = _json_object(_b64decode(parts[0]), "header")
        key = self._key_for(header)
        signature = _b64decode(parts[2])
        try:
            valid = key.key.verify(parts[0] + b"." + parts[1], signature)
        except Exception:
            valid = False
        if not valid:
            raise InvalidTokenError("The access token signature is invalid.")
        return self._check_claims(_json_object(_b64decode(parts[1]), "payload"), now)

    def _key_for(self, header: Mapping[str, Any]) -> VerificationKey:
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYPES:
            raise InvalidTokenError("The token is not an access token (typ must be at+jwt).")
        if "crit" in header:
            raise InvalidTokenError("The access token has unsupported critical headers.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise InvalidTokenError("The access token has no valid 'kid' header.")
        key = self._keys.verification_key(kid)
        if key is None:
            raise UnknownKeyError(kid)
        # The key decides the algorithm, never the token (RFC 8725 §3.1).
        if header.get("alg") != key.alg:
            raise InvalidTokenError("The access token algorithm does not match its key.")
        return key

    def _check_claims(self, claims: Mapping[str, Any], now: float) -> AccessClaims:
        exp = _number(claims, "exp")
        if now >= exp + self._leeway:
            raise InvalidTokenError("The access token has expired.")
        iat = _number(claims, "iat")
        if iat > now + self._leeway + 60:
            raise InvalidTokenError("The access token was issued in the future.")
        if "nbf" in claims and _number(claims, "nbf") > now + self._leeway:
            raise InvalidTokenError("The access token is not valid yet.")
        iss = _string(claims, "iss")
        if iss != self._issuer:
            raise InvalidTokenError("The access token was issued by another issuer.")
        aud = claims.get("aud")
        if self._audience is None:
            # Any audience (the issuer's own introspection): but there must be one.
            if not (isinstance(aud, str) and aud) and not (
                isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud)
            ):
                raise InvalidTokenError("The access token has no valid 'aud' claim.")
        elif not (aud == self._audience or (isinstance(aud, list) and self._audience in aud)):
            raise InvalidTokenError("The access token is meant for another audience.")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise InvalidTokenError("The access token has no valid 'scope' claim.")
        client_id = claims.get("client_id", "")
        if not isinstance(client_id, str):
            raise InvalidTokenError("The access token has no valid 'client_id' claim.")
        return AccessClaims(
            sub=_string(claims, "sub"),
            scope=tuple(scope.split()),
            client_id=client_id,
            exp=exp,
            iat=iat,
            jti=_string(claims, "jti"),
            iss=iss,
            aud=aud,
            raw=dict(claims),
        )


class KeyRingSource:
    """`KeySource` over the server's own `KeyRing`, with jose keys prepared once."""

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        self._prepared: dict[str, VerificationKey] = {}
        self._signing: dict[str, JoseKey] = {}
        self._seen = -1

    @property
    def generation(self) -> int:
        return self._ring.generation

    def _sync(self) -> None:
        if self._seen == self._ring.generation:
            return
        prepared = {}
        for key in self._ring.keys:
            known = self._prepared.get(key.kid)
            prepared[key.kid] = known or VerificationKey(
                kid=key.kid, alg=key.alg, key=prepare_key(key.public_key, key.alg)
            )
        self._prepared = prepared
        self._signing = {k: v for k, v in self._signing.items() if k in prepared}
        self._seen = self._ring.generation

    def verification_key(self, kid: str) -> VerificationKey | None:
        self._sync()
        return self._prepared.get(kid)

    def verification_keys(self) -> list[VerificationKey]:
        self._sync()
        return list(self._prepared.values())

    def signing_key(self) -> tuple[str, str, JoseKey]:
        """The kid, algorithm and prepared private key of the current signing key."""
        self._sync()
        key = self._ring.signing_key
        prepared = self._signing.get(key.kid)
        if prepared is None:
            prepared = self._signing[key.kid] = prepare_key(key.private_key, key.alg)
        return key.kid, key.alg, prepared
