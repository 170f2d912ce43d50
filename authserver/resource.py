"""The resource-server kit: accept authserver's access tokens in another service.

Three lines in a FastAPI app::

    validator = TokenValidator.from_issuer("https://auth.example.com", audience="authserver")
    install_error_handler(app)

    @app.get("/hello")
    async def hello(claims: AccessClaims = Depends(require_token(validator, scopes=["read"]))):
        return {"hello": claims.sub}

`TokenValidator` reads `jwks_uri` from the issuer's RFC 8414 metadata, caches
the JWKS for as long as its `Cache-Control: max-age` says, and refetches it
when a token names an unknown `kid` (a key rotation) — at most once per
`min_refetch_interval`, so forged `kid`s cannot make it hammer the issuer.
The checks themselves (`typ: at+jwt`, `alg` pinned to the key, signature,
`iss`, `aud`, `exp`, `nbf`) are `authserver.tokens.AccessTokenVerifier`, the
very code behind the server's own `/protected`.

Errors follow RFC 6750 §3 (https://www.rfc-editor.org/rfc/rfc6750#section-3):
no token is 401 with a bare `WWW-Authenticate: Bearer`, a bad one 401
`invalid_token`, a token without the required scopes 403 `insufficient_scope`.
`install_error_handler` and `error_response` are the server's own rendering
(`authserver.responses`), so the kit answers exactly as the server does.

Where a revoked session must stop working at once, `IntrospectingValidator`
asks the issuer instead (RFC 7662), with a short positive cache.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote

import httpx
from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import URL

from authserver.client import ClientAuth
from authserver.dpop import MemoryReplayCache, ProofChecker, sent_method
from authserver.errors import (
    DPoPResourceError,
    InsufficientScopeError,
    InvalidDPoPProofError,
    InvalidTokenError,
    MalformedBearerRequestError,
    MissingTokenError,
    TemporarilyUnavailableError,
    UseDPoPNonceError,
)
from authserver.keys import ALGORITHMS, EC_CURVE, KEY_TYPES, MIN_RSA_BITS
from authserver.responses import error_response, install_error_handler
from authserver.tokens import (
    AccessClaims,
    AccessTokenVerifier,
    KeySource,
    UnknownKeyError,
    VerificationKey,
    prepare_key,
)

__all__ = [
    "AccessClaims",
    "IntrospectingValidator",
    "JwksKeySource",
    "KeysUnavailableError",
    "ProofChecker",
    "RefreshableKeySource",
    "TokenValidator",
    "Validator",
    "error_response",
    "install_error_handler",
    "require_token",
    "token_claims",
]

log = logging.getLogger("authserver.resource")

METADATA_PATH = "/.well-known/oauth-authorization-server"
# Only the public members: a private member in a published JWKS is the
# publisher's mistake, and must not turn a verification key into a private one.
_PUBLIC_MEMBERS = {"RSA": ("kty", "n", "e"), "EC": ("kty", "crv", "x", "y")}
_MAX_KEYS = 64


class KeysUnavailableError(Exception):
    """The issuer's metadata or JWKS could not be fetched or understood."""


class RefreshableKeySource(KeySource, Protocol):
    """A `KeySource` whose keys live elsewhere and must be fetched (asynchronously)."""

    def needs_refresh(self) -> bool:
        """Whether `refresh()` is due: no keys yet, or past their age and a fetch is allowed."""

    async def refresh(self) -> None:
        """Fetch the keys if still needed; raise `KeysUnavailableError` only if none are known."""

    async def refresh_for_kid(self, kid: str) -> bool:
        """Refetch for an unknown `kid`, rate-limited; return whether the kid is now known."""


@runtime_checkable
class Validator(Protocol):
    """Anything that turns a bearer token into verified claims, or raises an `OAuthError`."""

    async def validate(self, token: str) -> AccessClaims: ...


def _max_age(cache_control: str | None) -> float | None:
    """The `max-age` of a `Cache-Control` header (RFC 9111 §5.2.2.1); 0 for no-store/no-cache."""
    if not cache_control:
        return None
    for directive in cache_control.split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            return 0.0
        if name == "max-age":
            try:
                return float(int(value.strip().strip('"')))
            except ValueError:
                return None
    return None


def _b64_bits(value: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return 0
    return len(raw.lstrip(b"\0")) * 8


def _public_jwk(jwk: object) -> tuple[str, str, dict[str, str]] | None:
    """(kid, alg, public members) of a usable signature key, or None to skip it."""
    if not isinstance(jwk, dict):
        return None
    kid, alg, kty = jwk.get("kid"), jwk.get("alg"), jwk.get("kty")
    # Only keys that say what they are for and with which algorithm (RFC 7517 §4.2,
    # §4.4): the token's header never gets to choose (RFC 8725 §3.1).
    if jwk.get("use") != "sig" or alg not in ALGORITHMS or kty != KEY_TYPES[alg]:
        return None
    if not isinstance(kid, str) or not kid or len(kid) > 256:
        return None
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    members = {name: jwk.get(name) for name in _PUBLIC_MEMBERS[kty]}
    if not all(isinstance(v, str) and v for v in members.values()):
        return None
    if kty == "EC" and members["crv"] != EC_CURVE:
        return None
    if kty == "RSA" and _b64_bits(str(members["n"])) < MIN_RSA_BITS:
        return None
    return kid, alg, {k: str(v) for k, v in members.items()}


class JwksKeySource:
    """The issuer's published keys: a `KeySource` for `AccessTokenVerifier`.

    `verification_key` only reads the cache (it is synchronous, called while
    verifying); `refresh` and `refresh_for_kid` fetch, single-flight behind one
    lock. Pass `http` to use your own `httpx.AsyncClient` (it is then yours to
    close); otherwise one is created on first use and closed by `aclose()`.

    - The JWKS is cached for its `Cache-Control: max-age` (`default_max_age`
      without one), clamped to [`min_refetch_interval`, `max_cache_age`].
    - No two fetches start less than `min_refetch_interval` seconds apart,
      whatever the reason: an unknown `kid` inside that window is simply
      unknown, and a failed fetch is retried no sooner.
    - When a refetch fails, the keys already known keep working.
    - Only RS256/ES256 keys with `use: sig` are taken; others are skipped.
    """

    def __init__(
        self,
        issuer: str,
        *,
        http: httpx.AsyncClient | None = None,
        metadata_url: str | None = None,
        min_refetch_interval: float = 5.0,
        default_max_age: float = 300.0,
        max_cache_age: float = 86_400.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        # RFC 8414 §3 with the issuer's path kept in front, as authserver serves it.
        self.metadata_url = metadata_url or self.issuer + METADATA_PATH
        self._http = http
        self._owns_http = http is None
        self._timeout = timeout
        self._min_interval = min_refetch_interval
        self._default_max_age = default_max_age
        self._max_cache_age = max(max_cache_age, min_refetch_interval)
        self._clock = clock
        self._lock = asyncio.Lock()
        self._jwks_uri: str | None = None
        self._keys: dict[str, VerificationKey] = {}
        self._members: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {}
        self._loaded = False
        self._fresh_until = -math.inf
        self._last_fetch = -math.inf
        self._generation = 0
        self.fetches = 0
        """How many JWKS fetches were attempted (for metrics and tests)."""

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def verification_key(self, kid: str) -> VerificationKey | None:
        return self._keys.get(kid)

    def needs_refresh(self) -> bool:
        if not self._loaded:
            return True
        now = self._clock()
        return now >= self._fresh_until and now - self._last_fetch >= self._min_interval

    async def refresh(self) -> None:
        """Fetch the JWKS if it is stale; keep serving the old keys if that fails."""
        async with self._lock:
            if not self.needs_refresh():
                return  # fresh, or fetched by whoever held the lock
            if self._clock() - self._last_fetch < self._min_interval:
                # Never loaded, and the last attempt failed moments ago.
                raise KeysUnavailableError(f"no keys from {self.issuer} yet; retrying shortly")
            try:
                await self._fetch("expired" if self._loaded else "initial")
            except KeysUnavailableError as exc:
                if not self._loaded:
                    raise
                log.warning("JWKS refresh failed, keeping the known keys: %s", exc)

    async def refresh_for_kid(self, kid: str) -> bool:
        """Refetch because a token names `kid`; at most once per `min_refetch_interval`."""
        async with self._lock:
            # Whoever held the lock may just have fetched the key we need.
            if kid in self._keys:
                return True
            if self._clock() - self._last_fetch < self._min_interval:
                return False
            try:
                await self._fetch("unknown kid")
            except KeysUnavailableError as exc:
                log.warning("JWKS refetch for an unknown kid failed: %s", exc)
                return False
            return kid in self._keys

    async def aclose(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout)
        return self._http

    async def _get_json(self, url: str) -> tuple[Any, httpx.Response]:
        try:
            response = await self._client().get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise KeysUnavailableError(f"GET {url} failed: {exc!r}") from exc
        if response.status_code != 200:
            raise KeysUnavailableError(f"GET {url} answered {response.status_code}")
        try:
            return response.json(), response
        except ValueError as exc:
            raise KeysUnavailableError(f"GET {url} did not return JSON") from exc

    async def _discover(self) -> str:
        metadata, _ = await self._get_json(self.metadata_url)
        if not isinstance(metadata, dict):
            raise KeysUnavailableError(f"{self.metadata_url} is not a JSON object")
        # RFC 8414 §3.3: the metadata must name the issuer we asked about.
        if metadata.get("issuer") != self.issuer:
            raise KeysUnavailableError(
                f"{self.metadata_url} names issuer {metadata.get('issuer')!r}, not {self.issuer!r}"
            )
        jwks_uri = metadata.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise KeysUnavailableError(f"{self.metadata_url} has no usable jwks_uri")
        return jwks_uri

    async def _fetch(self, reason: str) -> None:
        self._last_fetch = self._clock()
        self.fetches += 1
        try:
            self._jwks_uri = self._jwks_uri or await self._discover()
            document, response = await self._get_json(self._jwks_uri)
        except KeysUnavailableError:
            # Perhaps the jwks_uri moved: read the metadata again next time.
            self._jwks_uri = None
            raise
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise KeysUnavailableError(f"{self._jwks_uri} is not a JWK Set")
        self._apply(keys[:_MAX_KEYS])
        max_age = _max_age(response.headers.get("cache-control"))
        ttl = self._default_max_age if max_age is None else max_age
        ttl = min(max(ttl, self._min_interval), self._max_cache_age)
        self._fresh_until = self._last_fetch + ttl
        self._loaded = True
        log.info(
            "JWKS fetched from %s (%s): kids %s",
            self._jwks_uri,
            reason,
            " ".join(self._keys),
            extra={"reason": reason, "kids": list(self._keys)},
        )

    def _apply(self, jwks: list[Any]) -> None:
        members: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {}
        keys: dict[str, VerificationKey] = {}
        for jwk in jwks:
            parsed = _public_jwk(jwk)
            if parsed is None or parsed[0] in members:
                continue
            kid, alg, public = parsed
            signature = (alg, tuple(sorted(public.items())))
            known = self._keys.get(kid)
            if known is not None and self._members.get(kid) == signature:
                keys[kid] = known  # unchanged: keep the prepared key
            else:
                try:
                    keys[kid] = VerificationKey(kid=kid, alg=alg, key=prepare_key(public, alg))
                except Exception as exc:
                    log.warning("JWKS key %s skipped: %s", kid, type(exc).__name__)
                    continue
            members[kid] = signature
        if members != self._members:
            self._keys, self._members = keys, members
            self._generation += 1


class TokenValidator:
    """Verifies access tokens for a resource server; share one per process.

    `validate(token)` returns the `AccessClaims` (`sub`, `scope`, `client_id`,
    `exp`, ..., and `raw`) or raises `InvalidTokenError`. With a refreshable key
    source it first brings a stale JWKS up to date, and on an unknown `kid`
    refetches (rate-limited) and verifies once more. With a local source (the
    auth server's own keys) it never awaits anything.
    """

    def __init__(
        self, verifier: AccessTokenVerifier, keys: RefreshableKeySource | None = None
    ) -> None:
        self.verifier = verifier
        self.keys = keys

    @classmethod
    def from_issuer(
        cls,
        issuer: str,
        *,
        audience: str,
        http: httpx.AsyncClient | None = None,
        leeway: float = 0.0,
        min_refetch_interval: float = 5.0,
        metadata_url: str | None = None,
    ) -> TokenValidator:
        """A validator for tokens of `issuer` meant for `audience`, keys from its JWKS."""
        keys = JwksKeySource(
            issuer,
            http=http,
            metadata_url=metadata_url,
            min_refetch_interval=min_refetch_interval,
        )
        verifier = AccessTokenVerifier(keys, issuer=keys.issuer, audience=audience, leeway=leeway)
        return cls(verifier, keys)

    async def validate(self, token: str) -> AccessClaims:
        keys = self.keys
        if keys is not None and keys.needs_refresh():
            try:
                await keys.refresh()
            except KeysUnavailableError as exc:
                log.error("cannot verify tokens: %s", exc)  # noqa: TRY400 - an outage: no traceback
                raise TemporarilyUnavailableError(
                    "The token issuer's keys are unavailable.", retry_after=5
                ) from exc
        try:
            return self.verifier.verify(token)
        except UnknownKeyError as exc:
            if keys is None or not await keys.refresh_for_kid(exc.kid):
                raise
        return self.verifier.verify(token)

    async def aclose(self) -> None:
        """Close the HTTP client the key source created, if any."""
        if isinstance(self.keys, JwksKeySource):
            await self.keys.aclose()


class IntrospectingValidator:
    """Validates tokens by asking the issuer (RFC 7662 introspection), for an API where a
    logout, a disabled client or a detected theft must take effect at once, not when the
    access token expires.

    The API authenticates as a registered confidential client (`client_auth`: a
    `authserver.client.ClientSecret` or `PrivateKeyJWT`). An active answer is cached
    for `cache_ttl` seconds (never past the token's `exp`; at most `max_entries`
    tokens): that bounds both the load on the issuer and how long a revoked token is
    still taken. `audience`, if given, must be among the token's `aud`.
    """

    def __init__(
        self,
        introspection_url: str,
        client_auth: ClientAuth,
        *,
        audience: str | None = None,
        http: httpx.AsyncClient | None = None,
        cache_ttl: float = 5.0,
        max_entries: int = 10_000,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = introspection_url
        self._client_auth = client_auth
        self._audience = audience
        self._http = http
        self._owns_http = http is None
        self._timeout = timeout
        self._ttl = cache_ttl
        self._max = max_entries
        self._clock = clock
        self._cache: dict[str, tuple[float, AccessClaims]] = {}
        self.calls = 0
        """How many introspection requests were sent (for metrics and tests)."""

    @classmethod
    async def from_issuer(
        cls, issuer: str, client_auth: ClientAuth, **kwargs: Any
    ) -> IntrospectingValidator:
        """Find the issuer's `introspection_endpoint` in its RFC 8414 metadata."""
        url = issuer.rstrip("/") + METADATA_PATH
        http = kwargs.get("http") or httpx.AsyncClient(timeout=kwargs.get("timeout", 5.0))
        try:
            metadata = (await http.get(url, headers={"Accept": "application/json"})).json()
        except (httpx.HTTPError, ValueError) as exc:
            raise KeysUnavailableError(f"cannot read {url}: {exc!r}") from exc
        finally:
            if "http" not in kwargs:
                await http.aclose()
        endpoint = metadata.get("introspection_endpoint") if isinstance(metadata, dict) else None
        if not isinstance(endpoint, str):
            raise KeysUnavailableError(f"{url} names no introspection_endpoint")
        return cls(endpoint, client_auth, **kwargs)

    async def validate(self, token: str) -> AccessClaims:
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            until, claims = cached
            if now < until:
                return claims
            del self._cache[token]
        claims = self._claims(await self._ask(token), now)
        if self._ttl > 0:
            if len(self._cache) >= self._max:
                self._cache.pop(next(iter(self._cache)))  # the oldest entry
            self._cache[token] = (min(now + self._ttl, claims.exp), claims)
        return claims

    async def _ask(self, token: str) -> dict[str, Any]:
        form = {"token": token, "token_type_hint": "access_token"}
        headers = {"Accept": "application/json"}
        self._client_auth.apply(form, headers, audience=self.url)
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout)
        self.calls += 1
        try:
            response = await self._http.post(self.url, data=form, headers=headers)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.error("introspection failed: %r", exc)  # noqa: TRY400 - an outage: no traceback
            raise TemporarilyUnavailableError(
                "The token issuer cannot be asked.", retry_after=5
            ) from exc
        if response.status_code != 200 or not isinstance(body, dict):
            log.error("introspection answered %s", response.status_code)
            raise TemporarilyUnavailableError("The token issuer cannot be asked.", retry_after=5)
        return body

    def _claims(self, body: Mapping[str, Any], now: float) -> AccessClaims:
        token_type = body.get("token_type", "access_token")
        # authserver says `access_token`; other issuers the scheme (RFC 9449 §6.2: DPoP).
        if body.get("active") is not True or str(token_type).lower() not in _ACCESS_TOKEN_TYPES:
            raise InvalidTokenError("The access token is not active.")
        aud = body.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self._audience is not None and self._audience not in audiences:
            raise InvalidTokenError("The access token is meant for another audience.")
        exp, iat = body.get("exp"), body.get("iat")
        if not isinstance(exp, (int, float)) or now >= exp:
            raise InvalidTokenError("The access token has expired.")
        scope, sub = body.get("scope", ""), body.get("sub")
        if not isinstance(sub, str) or not isinstance(scope, str):
            raise InvalidTokenError("The access token is not active.")
        return AccessClaims(
            sub=sub,
            scope=tuple(scope.split()),
            client_id=str(body.get("client_id", "")),
            exp=float(exp),
            iat=float(iat) if isinstance(iat, (int, float)) else now,
            jti=str(body.get("jti", "")),
            iss=str(body.get("iss", "")),
            aud=aud if isinstance(aud, (str, list)) else "",
            raw=dict(body),
        )

    async def aclose(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None


_ACCESS_TOKEN_TYPES = frozenset({"access_token", "bearer", "dpop"})
ValidatorGetter = Callable[[Request], Validator]
CheckerGetter = Callable[[Request], ProofChecker]
_bearer = HTTPBearer(auto_error=False, description="An access token from the auth server.")
_BOUND = "The access token is DPoP-bound: send it as 'Authorization: DPoP' with a DPoP proof."


@functools.lru_cache(maxsize=4096)  # a resource is asked the same few URLs again and again
def _url_of(
    scheme: str, server: tuple[Any, ...] | None, host: bytes | None, path: str, raw: bytes | None
) -> str:
    if raw is not None:
        # The path as the client wrote it, which its `htu` names (`%2F`, `%20` and all);
        # `path` is decoded. Some servers leave the query on it; a proxy's prefix
        # (`root_path`) is not on it, and then the decoded path is all there is.
        sent = raw.split(b"?", 1)[0].decode("latin-1")
        if unquote(sent) == path:
            path = sent
    scope: dict[str, Any] = {
        "type": "http",
        "scheme": scheme,
        "server": server,
        "path": path,
        "query_string": b"",
        "headers": [] if host is None else [(b"host", host)],
    }
    return str(URL(scope=scope))


def request_url(request: Request) -> str:
    """`str(request.url)` without the query and with the path as sent, for a DPoP
    proof's `htu` (which leaves the query out, RFC 9449 §4.2), remembered by what
    Starlette builds it from: building it costs ~10 µs a request, a tenth of a
    proof's whole check besides its signature."""
    scope = request.scope
    host = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
            break
    server = scope.get("server")
    return _url_of(
        scope.get("scheme", "http"),
        None if server is None else tuple(server),
        host,
        scope["path"],
        scope.get("raw_path"),
    )


async def _dpop_claims(
    request: Request, token: str, validator: Validator, checker: ProofChecker
) -> AccessClaims:
    """RFC 9449 §7.1: a DPoP-bound token and the request's proof of its key; every
    refusal is 401 with a `DPoP` challenge."""
    try:
        claims = await validator.validate(token)
    except InvalidTokenError as exc:
        raise DPoPResourceError.of(exc) from exc
    cnf = claims.raw.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    if not isinstance(jkt, str):
        raise DPoPResourceError("invalid_token", "The access token is not DPoP-bound.")
    try:
        await checker.check(
            request.headers.getlist("dpop"),
            method=sent_method(request.scope),
            url=request_url(request),
            access_token=token,
            jkt=jkt,
        )
    except (InvalidDPoPProofError, UseDPoPNonceError) as exc:
        raise DPoPResourceError.of(exc) from exc
    return claims


ClaimsOfRequest = Callable[[Request], Awaitable[AccessClaims]]


def _claims_checker(
    validator: Validator | ValidatorGetter,
    required: tuple[str, ...],
    dpop: ProofChecker | CheckerGetter | None,
) -> Callable[[Request, Any], Awaitable[AccessClaims]]:
    """The one check behind `require_token` and `token_claims`: the token the scheme
    found (`credentials`), or a `DPoP` one with its proof; exactly one Authorization
    header; the validator; the required scopes."""
    get_validator: ValidatorGetter
    if isinstance(validator, Validator):
        fixed = validator
        get_validator = lambda _request: fixed  # noqa: E731
    else:
        get_validator = validator
    get_checker: CheckerGetter
    if isinstance(dpop, ProofChecker) or dpop is None:
        checker = dpop or ProofChecker(replay=MemoryReplayCache())
        get_checker = lambda _request: checker  # noqa: E731
    else:
        get_checker = dpop

    async def check(request: Request, credentials: Any) -> AccessClaims:
        token = (
            credentials.credentials
            if isinstance(credentials, HTTPAuthorizationCredentials)
            else credentials
        )
        if not token or not isinstance(token, str):
            authorization = request.headers.get("authorization", "")
            if authorization[:5].lower() != "dpop ":
                raise MissingTokenError()
            token = authorization[5:].strip()
            if not token:
                raise MissingTokenError()
            dpop_token = True
        else:
            dpop_token = False
        if len(request.headers.getlist("authorization")) > 1:
            # A proxy and this server might each read a different one of them.
            raise MalformedBearerRequestError("Send exactly one Authorization header.")
        if dpop_token:
            claims = await _dpop_claims(
                request, token, get_validator(request), get_checker(request)
            )
        else:
            claims = await get_validator(request).validate(token)
            if "cnf" in claims.raw:  # RFC 9449 §7.2: a bound token is no bearer token
                raise InvalidTokenError(_BOUND)
        if required:
            missing = [s for s in required if s not in claims.scope]
            if missing:
                raise InsufficientScopeError(
                    required,
                    f"The access token lacks the scope: {' '.join(missing)}.",
                    dpop=dpop_token,
                )
        return claims

    return check


def require_token(
    validator: Validator | ValidatorGetter,
    scopes: Iterable[str] = (),
    *,
    scheme: Callable[..., Any] | None = None,
    dpop: ProofChecker | CheckerGetter | None = None,
) -> Callable[..., Any]:
    """A FastAPI dependency that returns the `AccessClaims` of the request's access token:
    `Authorization: Bearer <token>`, or `Authorization: DPoP <token>` with a `DPoP` proof
    (RFC 9449 §7) for a DPoP-bound token, which is refused as a Bearer token.

    `validator` is a `TokenValidator` (or any `Validator`), or a function of the
    request returning one (for a validator built in the app's lifespan). Every
    scope in `scopes` must be granted, else 403 `insufficient_scope`. `scheme`
    is what the OpenAPI document advertises (`HTTPBearer` by default; pass an
    `OAuth2PasswordBearer` to give the Swagger UI a login form). The app needs
    `install_error_handler(app)` so the errors become RFC 6750 responses.

    `dpop` checks the proofs (a `ProofChecker`, or a function of the request returning
    one); by default one with a replay cache in this process's memory. An API served by
    several processes gives them a shared `ReplayCache`, so that a proof replayed to
    another process is refused too.
    """
    required = tuple(scopes)
    security = scheme or _bearer
    check = _claims_checker(validator, required, dpop)

    # Annotations are strings here (`from __future__`), so the security
    # dependency goes in the default, where FastAPI reads it as an object.
    async def claims_dependency(
        request: Request, credentials: Any = Security(security, scopes=list(required))
    ) -> AccessClaims:
        return await check(request, credentials)

    return claims_dependency


def token_claims(
    validator: Validator | ValidatorGetter,
    scopes: Iterable[str] = (),
    *,
    scheme: Callable[..., Any] | None = None,
    dpop: ProofChecker | CheckerGetter | None = None,
) -> ClaimsOfRequest:
    """`require_token`'s check as a plain function of the request, for a handler that
    reads the request itself: the same scheme, the same answers, without FastAPI's
    dependency resolution (which costs more than a cached token's check)."""
    security = scheme or _bearer
    check = _claims_checker(validator, tuple(scopes), dpop)

    async def claims_of(request: Request) -> AccessClaims:
        return await check(request, await security(request))

    return claims_of
