"""The client kit: an `httpx.Auth` that logs in, attaches the bearer token and refreshes it.

Three lines::

    auth = TokenAuth("https://auth.example.com/token", username="alice", password="...")
    async with httpx.AsyncClient(auth=auth) as client:
        response = await client.get("https://api.example.com/hello")

`TokenAuth` works with `httpx.AsyncClient` and `httpx.Client`, against any
RFC 6749 token endpoint (password grant §4.3, refresh §6) or authserver's JSON
`/login` + `/refresh` (`LoginEndpoints`). It refreshes the access token shortly
before `expires_in` runs out, and once more when a request answers 401; it
keeps the rotated refresh token each time.

Refreshing is single-flight: when many concurrent requests find the token stale,
one refresh is sent and the others wait for its result. A client sending the
same refresh token twice would look like a stolen token to a server with reuse
detection (RFC 9700 §4.14.2) and lose its whole session; this one never does.

When the refresh token is dead (revoked, reused, expired: `invalid_grant`),
every request raises `SessionExpired` until `set_tokens()` gives it a new pair;
it never loops on 401.

With `dpop=True` (or a `DPoPKey` the application keeps) the tokens are DPoP-bound
(RFC 9449): every token request and every API request carries a fresh proof
signed by that key, so a stolen access or refresh token is useless without it.
Server nonces (`use_dpop_nonce`) are answered by sending the request again once.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import math
import secrets
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authserver.dpop import PROOF_TYPE, access_token_hash
from authserver.keys import public_jwk, thumbprint
from authserver.tokens import ASSERTION_TYPE, load_private_key, sign_jwt, sign_with_embedded_key

__all__ = [
    "AuthError",
    "ClientAuth",
    "ClientSecret",
    "DPoPKey",
    "Endpoints",
    "LoginEndpoints",
    "LoginFailed",
    "PrivateKeyJWT",
    "SessionExpired",
    "TokenAuth",
    "TokenEndpoint",
    "TokenEndpointError",
    "TokenPair",
]

_JSON = {"Accept": "application/json"}
_MIN_AGE_FOR_401_REFRESH = 1.0


class AuthError(Exception):
    """A token request failed; `error` and `description` are the server's (RFC 6749 §5.2)."""

    def __init__(
        self, message: str, *, status_code: int | None = None, error: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error = error


class LoginFailed(AuthError):
    """The username and password were refused (`invalid_grant`). Not retried."""


class SessionExpired(AuthError):
    """The refresh token is dead (revoked, reused, expired): log in again.

    Raised by every request from then on, until `TokenAuth.set_tokens()`.
    """


class TokenEndpointError(AuthError):
    """Any other failure of the token endpoint: 5xx, 429, an unexpected answer.

    The session is not given up: the next request tries again. `retry_after`
    carries the server's `Retry-After` (seconds) when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, error=error)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class TokenPair:
    """What a token response granted; persist it to resume a session later.

    `expires_at` is a Unix time (None: the server did not say); `expires_in`
    is the lifetime the server announced.
    """

    access_token: str = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None
    expires_in: float | None = None
    scope: str | None = None
    token_type: str = "bearer"

    @classmethod
    def from_refresh_token(cls, refresh_token: str) -> TokenPair:
        """A pair to start from when only the refresh token was kept: it refreshes first."""
        return cls(access_token="", refresh_token=refresh_token, expires_at=0.0)

    @classmethod
    def from_response(
        cls, body: Mapping[str, Any], *, now: float, previous: TokenPair | None = None
    ) -> TokenPair:
        """Parse a successful token response (RFC 6749 §5.1); `TokenEndpointError` if it is not."""
        access_token = body.get("access_token")
        token_type = body.get("token_type", "")
        if not isinstance(access_token, str) or not access_token:
            raise TokenEndpointError("The token response has no access_token.")
        if not isinstance(token_type, str) or token_type.lower() not in ("bearer", "dpop"):
            raise TokenEndpointError("The token response is not for a bearer or DPoP token.")
        expires_in = body.get("expires_in")
        lifetime: float | None = None
        if isinstance(expires_in, (int, float, str)) and not isinstance(expires_in, bool):
            try:
                lifetime = max(0.0, float(expires_in))
            except ValueError:
                lifetime = None
        refresh_token = body.get("refresh_token")
        if not isinstance(refresh_token, str) or not refresh_token:
            # RFC 6749 §6: a server that does not rotate keeps the old one valid.
            refresh_token = previous.refresh_token if previous else None
        scope = body.get("scope")
        return cls(
            access_token=access_token,
            refresh_token=refresh_token,
            expires_at=now + lifetime if lifetime is not None else None,
            expires_in=lifetime,
            scope=scope if isinstance(scope, str) else (previous.scope if previous else None),
            token_type="DPoP" if token_type.lower() == "dpop" else "bearer",
        )


class DPoPKey:
    """A client's DPoP key (RFC 9449) and the proofs it signs.

    `DPoPKey()` makes a new EC P-256 key; `DPoPKey(pem)` takes one the application
    kept (`private_pem()` gives it to store, readable by the application alone): a
    key that outlives the process keeps its bound refresh token usable.
    """

    def __init__(self, private_key: str | bytes | Any | None = None) -> None:
        if private_key is None:
            private_key = ec.generate_private_key(ec.SECP256R1())
        if isinstance(private_key, (str, bytes)):
            pem = private_key.encode("ascii") if isinstance(private_key, str) else private_key
            private_key = serialization.load_pem_private_key(pem, password=None)
        self._private = private_key
        self._key, self.alg = load_private_key(private_key)
        public = private_key.public_key()
        assert isinstance(public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey))
        self.jwk = public_jwk(public)
        self.thumbprint = thumbprint(public)
        """The RFC 7638 thumbprint: the `cnf.jkt` of the tokens bound to this key."""

    def private_pem(self) -> bytes:
        pem: bytes = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return pem

    def proof(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
    ) -> str:
        """A proof for one request (RFC 9449 §4.2); `access_token` when sending one."""
        target = httpx.URL(str(url)).copy_with(query=None, fragment=None)
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(16),
            "htm": method,
            "htu": str(target),
            "iat": int(time.time()),
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        return sign_with_embedded_key(
            claims, key=self._key, alg=self.alg, jwk=self.jwk, typ=PROOF_TYPE
        )


def _absolute(url: str) -> httpx.URL:
    parsed = httpx.URL(url)
    # Never relative to the request being authenticated: that would send the
    # password to whichever host the application happens to call.
    if not parsed.is_absolute_url:
        raise ValueError(f"token endpoint URL must be absolute: {url!r}")
    return parsed


class Endpoints(Protocol):
    """How to ask for tokens: build the password-grant and refresh requests."""

    def password_request(
        self, *, username: str, password: str, scope: str | None
    ) -> httpx.Request: ...

    def refresh_request(self, *, refresh_token: str) -> httpx.Request: ...


class ClientAuth(Protocol):
    """How a confidential client proves itself to the token endpoint (RFC 6749 §2.3)."""

    client_id: str

    def apply(self, form: dict[str, str], headers: dict[str, str], *, audience: str) -> None:
        """Add the client's credentials to a token request's form or headers."""


class ClientSecret:
    """A client secret, sent in HTTP Basic (`client_secret_basic`, the default) or in the
    form (`client_secret_post`)."""

    def __init__(self, client_id: str, secret: str, *, method: str = "client_secret_basic") -> None:
        if method not in ("client_secret_basic", "client_secret_post"):
            raise ValueError(f"unknown client authentication method {method!r}")
        self.client_id = client_id
        self._secret = secret
        self.method = method

    def apply(self, form: dict[str, str], headers: dict[str, str], *, audience: str) -> None:
        if self.method == "client_secret_post":
            form["client_id"] = self.client_id
            form["client_secret"] = self._secret
            return
        # RFC 6749 §2.3.1: each part form-encoded, then base64.
        raw = f"{quote(self.client_id, safe='')}:{quote(self._secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode("ascii")


class PrivateKeyJWT:
    """`private_key_jwt` (RFC 7523 §2.2): a fresh, short-lived assertion signed with the
    client's private key (a PEM, or a `cryptography` key) for every token request.

    The server holds the matching public key (`authserver clients add --jwks-file`).
    """

    def __init__(
        self,
        client_id: str,
        private_key: str | bytes | Any,
        *,
        kid: str | None = None,
        lifetime: int = 60,
    ) -> None:
        self.client_id = client_id
        self._kid = kid
        self._lifetime = lifetime
        self._key, self._alg = load_private_key(private_key)

    def apply(self, form: dict[str, str], headers: dict[str, str], *, audience: str) -> None:
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "iat": now,
            "exp": now + self._lifetime,
            "jti": uuid.uuid4().hex,
        }
        form["client_assertion_type"] = ASSERTION_TYPE
        form["client_assertion"] = sign_jwt(claims, key=self._key, alg=self._alg, kid=self._kid)


class TokenEndpoint:
    """An RFC 6749 token endpoint (§3.2): form-encoded grants.

    A public client names itself with `client_id` (in the form, §2.3.1 allows that);
    a confidential one passes `client_auth` (`ClientSecret` or `PrivateKeyJWT`),
    which every request then carries.
    """

    def __init__(
        self, url: str, *, client_id: str | None = None, client_auth: ClientAuth | None = None
    ) -> None:
        self.url = _absolute(url)
        self.client_id = client_id
        self.client_auth = client_auth

    def _post(self, form: dict[str, str]) -> httpx.Request:
        headers = dict(_JSON)
        if self.client_auth is not None:
            self.client_auth.apply(form, headers, audience=str(self.url))
        elif self.client_id:
            form["client_id"] = self.client_id
        return httpx.Request("POST", self.url, data=form, headers=headers)

    def client_credentials_request(self, *, scope: str | None) -> httpx.Request:
        """A token for the client itself (RFC 6749 §4.4)."""
        if self.client_auth is None:
            raise ValueError("client_credentials needs client_auth (a confidential client)")
        form = {"grant_type": "client_credentials"}
        if scope:
            form["scope"] = scope
        return self._post(form)

    def password_request(self, *, username: str, password: str, scope: str | None) -> httpx.Request:
        form = {"grant_type": "password", "username": username, "password": password}
        if scope:
            form["scope"] = scope
        return self._post(form)

    def refresh_request(self, *, refresh_token: str) -> httpx.Request:
        return self._post({"grant_type": "refresh_token", "refresh_token": refresh_token})


class LoginEndpoints:
    """authserver's JSON endpoints: `POST /login` and `POST /refresh` under `base_url`."""

    def __init__(
        self,
        base_url: str,
        *,
        login_path: str = "/login",
        refresh_path: str = "/refresh",
        client_id: str | None = None,
    ) -> None:
        self.login_url = _absolute(base_url.rstrip("/") + login_path)
        self.refresh_url = _absolute(base_url.rstrip("/") + refresh_path)
        self.client_id = client_id

    def password_request(self, *, username: str, password: str, scope: str | None) -> httpx.Request:
        body = {"username": username, "password": password}
        if scope:
            body["scope"] = scope
        if self.client_id:
            body["client_id"] = self.client_id
        return httpx.Request("POST", self.login_url, json=body, headers=_JSON)

    def refresh_request(self, *, refresh_token: str) -> httpx.Request:
        body = {"refresh_token": refresh_token}
        return httpx.Request("POST", self.refresh_url, json=body, headers=_JSON)


OnTokens = Callable[[TokenPair], object]


class TokenAuth(httpx.Auth):
    """Bearer authentication that obtains, attaches and refreshes tokens by itself.

    `endpoint` is the absolute URL of a token endpoint (RFC 6749, form-encoded),
    or an `Endpoints` such as `LoginEndpoints("https://auth.example.com")`.

    Start either from `username` and `password` (the first request logs in;
    the password is forgotten once a refresh token is granted) or from
    `tokens`, a `TokenPair` saved earlier. `on_tokens(pair)` is called with
    every new pair, in order, before any request uses it: persist it there (in
    an async client it may be a coroutine function). An exception from it
    propagates to the request that triggered the refresh; the new pair is
    kept in memory all the same.

    The token is refreshed when less than `refresh_margin` seconds, or a fifth
    of its lifetime if that is less, remain; and after a 401, unless it was
    obtained less than a second ago (then the 401 is returned as it is). Use
    one instance with either sync or async clients, not both at once: each
    kind has its own lock. Request bodies are read into memory so a request
    can be sent again after a 401.
    """

    def __init__(
        self,
        endpoint: str | Endpoints,
        *,
        username: str | None = None,
        password: str | None = None,
        scope: str | None = None,
        tokens: TokenPair | None = None,
        on_tokens: OnTokens | None = None,
        refresh_margin: float = 30.0,
        clock: Callable[[], float] = time.time,
        client_credentials: bool = False,
        dpop: bool | DPoPKey = False,
    ) -> None:
        credentials = (
            (username, password) if username is not None and password is not None else None
        )
        if tokens is None and credentials is None and not client_credentials:
            raise ValueError("TokenAuth needs username and password, tokens, or client_credentials")
        self.endpoint: Endpoints = (
            TokenEndpoint(endpoint) if isinstance(endpoint, str) else endpoint
        )
        if client_credentials and not isinstance(self.endpoint, TokenEndpoint):
            raise ValueError("client_credentials needs a TokenEndpoint with client_auth")
        self._client_credentials = client_credentials
        self._credentials = credentials
        self._scope = scope
        self._tokens = tokens
        self._on_tokens = on_tokens
        self._margin = refresh_margin
        self._clock = clock
        self._dead: AuthError | None = None
        self._renewed_at = -math.inf
        self._sync_lock = threading.Lock()
        self._async_lock = asyncio.Lock()
        self.dpop_key: DPoPKey | None = (
            dpop if isinstance(dpop, DPoPKey) else DPoPKey() if dpop else None
        )
        self._check_key_for(tokens)
        self._nonces: dict[tuple[str, str, int | None], str] = {}  # per origin

    @property
    def tokens(self) -> TokenPair | None:
        """The current token pair (None before the first login)."""
        return self._tokens

    def set_tokens(self, tokens: TokenPair) -> None:
        """Resume with a new pair, e.g. after `SessionExpired` and a fresh login elsewhere."""
        self._check_key_for(tokens)
        self._tokens = tokens
        self._dead = None

    def _check_key_for(self, tokens: TokenPair | None) -> None:
        # Sent as a Bearer token, a DPoP-bound one is refused (RFC 9449 §7.1), and its
        # refresh token needs the key too: without it the pair is worth nothing.
        if tokens is not None and tokens.token_type == "DPoP" and self.dpop_key is None:
            raise ValueError("These tokens are DPoP-bound: pass the DPoPKey they are bound to")

    # -- decisions (no I/O) ----------------------------------------------------

    def _is_stale(self, pair: TokenPair | None) -> bool:
        if pair is None or not pair.access_token:
            return True
        if pair.expires_at is None:
            return False  # no lifetime announced: only a 401 tells
        margin = self._margin if pair.expires_in is None else min(self._margin, pair.expires_in / 5)
        return self._clock() >= pair.expires_at - margin

    def _check_alive(self) -> None:
        dead = self._dead
        if dead is not None:
            # A fresh exception each time: re-raising one instance grows its traceback.
            raise type(dead)(str(dead), status_code=dead.status_code, error=dead.error)

    def _renew_after_401(self, sent: TokenPair) -> bool:
        """Whether a 401 to a request sent with `sent` calls for a refresh before retrying."""
        pair = self._tokens
        if pair is not sent:
            return True  # renewed meanwhile: just retry with the new token
        if not (self._credentials is not None or pair.refresh_token or self._client_credentials):
            return False
        # A token this new was refused for some other reason (another audience, a
        # resource that has not seen the new key yet): refreshing again would not
        # help, and a misconfigured API must not turn every request into a refresh.
        return self._clock() - self._renewed_at >= _MIN_AGE_FOR_401_REFRESH

    def _renew(
        self, seen: TokenPair | None
    ) -> Generator[httpx.Request, httpx.Response, TokenPair | None]:
        """Log in or refresh (the caller holds the lock), unless someone did since `seen`.

        Yields the token request, receives its (read) response; returns the new pair.
        """
        self._check_alive()
        previous = self._tokens
        if previous is not seen:
            return None  # another request refreshed while this one waited: reuse that
        build: Callable[[], httpx.Request]
        if previous is not None and previous.refresh_token:
            build = functools.partial(
                self.endpoint.refresh_request, refresh_token=previous.refresh_token
            )
            dead: type[AuthError] = SessionExpired
        elif self._credentials is not None:
            username, password = self._credentials
            build = functools.partial(
                self.endpoint.password_request,
                username=username,
                password=password,
                scope=self._scope,
            )
            dead = LoginFailed
        elif self._client_credentials and isinstance(self.endpoint, TokenEndpoint):
            # A client's own token comes without a refresh token: ask again each time.
            build = functools.partial(self.endpoint.client_credentials_request, scope=self._scope)
            dead = LoginFailed
        else:
            raise SessionExpired("No refresh token and no credentials: log in again.")
        request = build()
        self._prove(request)
        response = yield request
        if self._nonce_demanded(response, token_endpoint=True):
            # RFC 9449 §8: once more, with the server's nonce. Built anew: a client
            # assertion (private_key_jwt) is single-use, and the server may have
            # recorded the first one's before it asked for a nonce.
            request = build()
            self._prove(request)
            response = yield request
        pair = self._accept(response, previous, dead)
        self._tokens = pair
        self._renewed_at = self._clock()
        if pair.refresh_token:
            self._credentials = None  # the refresh token carries the session from here
        return pair

    def _accept(
        self, response: httpx.Response, previous: TokenPair | None, dead: type[AuthError]
    ) -> TokenPair:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 200 and isinstance(body, dict):
            return TokenPair.from_response(body, now=self._clock(), previous=previous)
        body = body if isinstance(body, dict) else {}
        error = body.get("error") if isinstance(body.get("error"), str) else None
        text = body.get("error_description")
        detail = f"{error}: {text}" if isinstance(text, str) else (error or "no error code")
        if error in ("invalid_grant", "invalid_client") and response.status_code in (400, 401):
            what = "login" if dead is LoginFailed else "refresh"
            self._dead = dead(
                f"The {what} was refused ({detail}).", status_code=response.status_code, error=error
            )
            self._check_alive()
        retry_after = response.headers.get("retry-after", "")
        raise TokenEndpointError(
            f"The token endpoint answered {response.status_code} ({detail}).",
            status_code=response.status_code,
            error=error,
            retry_after=float(retry_after) if retry_after.isdigit() else None,
        )

    def _authorize(self, request: httpx.Request) -> TokenPair:
        pair = self._tokens
        assert pair is not None
        if pair.token_type == "DPoP" and self.dpop_key is not None:
            request.headers["Authorization"] = f"DPoP {pair.access_token}"
            self._prove(request, access_token=pair.access_token)
        else:
            request.headers["Authorization"] = f"Bearer {pair.access_token}"
        return pair

    # -- DPoP (RFC 9449) -------------------------------------------------------

    @staticmethod
    def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
        return url.scheme, url.host, url.port

    def _prove(self, request: httpx.Request, *, access_token: str | None = None) -> None:
        if self.dpop_key is None:
            return
        nonce = self._nonces.get(self._origin(request.url))
        request.headers["DPoP"] = self.dpop_key.proof(
            request.method, request.url, access_token=access_token, nonce=nonce
        )

    def _nonce_demanded(self, response: httpx.Response, *, token_endpoint: bool = False) -> bool:
        """Keep the server's latest nonce; whether the response asks for the request
        again with it (400 at a token endpoint, whose answer has been read; 401 at a
        resource, whose answer is still unread: RFC 9449 §8, §9)."""
        if self.dpop_key is None:
            return False
        nonce = response.headers.get("dpop-nonce")
        if not nonce:
            return False
        self._nonces[self._origin(response.request.url)] = nonce
        if response.status_code == 401:
            return "use_dpop_nonce" in response.headers.get("www-authenticate", "")
        if response.status_code == 400 and token_endpoint:
            try:
                body = response.json()
            except ValueError:
                return False
            return isinstance(body, dict) and body.get("error") == "use_dpop_nonce"
        return False

    # -- sync ------------------------------------------------------------------

    def _sync_renew(self, seen: TokenPair | None) -> Generator[httpx.Request, httpx.Response, None]:
        with self._sync_lock:
            renew = self._renew(seen)
            pair: TokenPair | None = None
            try:
                token_request = next(renew)
                while True:
                    response = yield token_request
                    response.read()
                    token_request = renew.send(response)
            except StopIteration as done:
                pair = done.value
            if pair is not None and self._on_tokens is not None:
                result = self._on_tokens(pair)
                if inspect.isawaitable(result):
                    if inspect.iscoroutine(result):
                        result.close()
                    raise TypeError("on_tokens returned an awaitable in a sync client")

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        self._check_alive()
        request.read()
        seen = self._tokens
        for attempt in range(2):
            if attempt or self._is_stale(seen):
                yield from self._sync_renew(seen)
            seen = self._authorize(request)
            response = yield request
            if self._nonce_demanded(response):
                seen = self._authorize(request)
                response = yield request
            # RFC 6750 §3.1: invalid_token may just mean expired; refresh once, then give up.
            if response.status_code != 401 or not self._renew_after_401(seen):
                return

    # -- async -----------------------------------------------------------------

    async def _notify(self, pair: TokenPair | None) -> None:
        if pair is not None and self._on_tokens is not None:
            result = self._on_tokens(pair)
            if inspect.isawaitable(result):
                await result

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        self._check_alive()
        await request.aread()
        seen = self._tokens
        for attempt in range(2):
            if attempt or self._is_stale(seen):
                async with self._async_lock:
                    renew = self._renew(seen)
                    try:
                        token_request = next(renew)
                        while True:
                            token_response = yield token_request
                            await token_response.aread()
                            token_request = renew.send(token_response)
                    except StopIteration as done:
                        await self._notify(done.value)
            seen = self._authorize(request)
            response = yield request
            if self._nonce_demanded(response):
                seen = self._authorize(request)
                response = yield request
            # RFC 6750 §3.1: invalid_token may just mean expired; refresh once, then give up.
            if response.status_code != 401 or not self._renew_after_401(seen):
                return
