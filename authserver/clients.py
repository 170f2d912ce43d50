"""The client registry (RFC 6749 §2): who may ask for tokens, and how they prove it.

`ClientService` registers, rotates, disables and removes clients, each change
one transaction with its audit event. The built-in public client `authserver`
is not stored: it always exists, may use the password and refresh_token
grants, and is the client of every request that names none (the seed's flow).

A confidential client's secret is generated here (256 random bits), shown once,
and stored as a SHA-256 digest: a secret no dictionary holds needs no slow hash,
so checking one costs microseconds, not a bcrypt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from authserver import audit
from authserver.audit import Auditor, RequestContext
from authserver.errors import InvalidClientError, InvalidTokenError
from authserver.keys import ALGORITHMS, EC_CURVE, KEY_TYPES, public_key_of
from authserver.store.protocol import (
    AuditEvent,
    Client,
    Conflict,
    RefreshTransaction,
    Store,
    used_id,
)
from authserver.store.schema import BUILTIN_CLIENT_ID as BUILTIN_CLIENT_ID
from authserver.throttle import LoginThrottle
from authserver.tokens import MAX_TOKEN_LENGTH, VerificationKey, prepare_key, verify_assertion

PASSWORD = "password"
REFRESH_TOKEN = "refresh_token"
CLIENT_CREDENTIALS = "client_credentials"
AUTHORIZATION_CODE = "authorization_code"
GRANTS = (PASSWORD, REFRESH_TOKEN, CLIENT_CREDENTIALS, AUTHORIZATION_CODE)
SECRET_BYTES = 32
# RFC 6749 Appendix A.1: client-id = *VSCHAR
_CLIENT_ID = re.compile(r"[\x20-\x7e]{1,255}")

BUILTIN_CLIENT = Client(
    client_id=BUILTIN_CLIENT_ID,
    name="authserver",
    public=True,
    secret_digest=None,
    previous_secret_digest=None,
    previous_secret_expires_at=None,
    jwks=None,
    grants=(PASSWORD, REFRESH_TOKEN),
    scopes=None,
    redirect_uris=(),
    post_logout_redirect_uris=(),
    audience=None,
    third_party=False,
    require_dpop=False,
    disabled=False,
    created_at=0.0,
    updated_at=0.0,
)


# Where the Swagger UI at /docs gets its authorization code back: the built-in client's
# one redirect URI, under the issuer, so /docs can sign in with the browser flow.
DOCS_REDIRECT_PATH = "/docs/oauth2-redirect"


def builtin_client(issuer: str | None) -> Client:
    """The built-in client as a server at `issuer` serves it: also the public client of
    the Swagger UI's authorization code flow (PKCE), returning to /docs only."""
    if issuer is None:
        return BUILTIN_CLIENT
    return replace(
        BUILTIN_CLIENT,
        name="authserver API docs",
        grants=(*BUILTIN_CLIENT.grants, AUTHORIZATION_CODE),
        redirect_uris=(issuer + DOCS_REDIRECT_PATH,),
    )


class ClientError(Exception):
    """A registry change that cannot be made; the message is one line for an operator."""


def is_client_id(client_id: str) -> bool:
    return _CLIENT_ID.fullmatch(client_id) is not None


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret() -> tuple[str, str]:
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return secret, secret_digest(secret)


def check_secret(client: Client, secret: str, *, now: float) -> bool:
    """Whether `secret` is the client's, or its previous one still within its grace."""
    presented = secret_digest(secret)
    ok = client.secret_digest is not None and hmac.compare_digest(presented, client.secret_digest)
    previous = client.previous_secret_digest
    if previous is not None and (client.previous_secret_expires_at or 0.0) > now:
        # Both compared every time: the answer's timing says nothing about which matched.
        ok = hmac.compare_digest(presented, previous) or ok
    return ok


@dataclass(frozen=True, slots=True)
class Registration:
    """What `clients add` asks for; `ClientService.register` checks and completes it."""

    client_id: str
    public: bool = False
    grants: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    redirect_uris: tuple[str, ...] = ()
    post_logout_redirect_uris: tuple[str, ...] = ()
    audience: str | None = None
    name: str | None = None
    third_party: bool = False
    jwks: str | None = None
    require_dpop: bool = False


_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def parse_jwks(text: str) -> str:
    """Check a client's JWK Set (RFC 7517 §5) for `private_key_jwt`: public RSA or EC
    keys only, of the algorithms this server verifies; the set as compact JSON."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ClientError("the JWKS file is not JSON") from exc
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ClientError('the JWKS file must be a JWK Set: {"keys": [...]} with a key')
    for index, jwk in enumerate(keys):
        where = f"key {index + 1} of the JWKS file"
        if not isinstance(jwk, dict):
            raise ClientError(f"{where} is not a JSON object")
        if _PRIVATE_MEMBERS & set(jwk):
            raise ClientError(f"{where} holds private key material: register the public key only")
        kty, alg = jwk.get("kty"), jwk.get("alg")
        if kty not in KEY_TYPES.values():
            raise ClientError(f"{where} has kty {kty!r}: use RSA or EC")
        if alg is not None and (alg not in ALGORITHMS or KEY_TYPES[alg] != kty):
            raise ClientError(f"{where} has alg {alg!r}: use {' or '.join(ALGORITHMS)}")
        if kty == "EC" and jwk.get("crv") != EC_CURVE:
            raise ClientError(f"{where} is not on curve {EC_CURVE}")
        try:
            public_key_of(jwk)
        except ValueError as exc:
            raise ClientError(f"{where} is not a usable public key ({exc})") from exc
    return json.dumps(document, separators=(",", ":"))


def _check_redirect_uri(uri: str) -> str:
    """RFC 6749 §3.1.2: an absolute URI without a fragment, compared exactly later."""
    parts = urlsplit(uri)
    if not parts.scheme or parts.fragment or "#" in uri:
        raise ClientError(f"redirect URI {uri[:100]!r} must be absolute and have no fragment")
    if parts.scheme in ("http", "https") and not parts.netloc:
        raise ClientError(f"redirect URI {uri[:100]!r} has no host")
    return uri


def _default_grants(registration: Registration) -> tuple[str, ...]:
    if not registration.public and not registration.redirect_uris:
        return (CLIENT_CREDENTIALS,)
    return (AUTHORIZATION_CODE, REFRESH_TOKEN)


class ClientService:
    """Registers and manages clients; one instance per process."""

    def __init__(
        self,
        *,
        store: Store,
        auditor: Auditor,
        scopes: tuple[str, ...],
        issuer: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.auditor = auditor
        self.scopes = scopes
        self.clock = clock
        self.builtin = builtin_client(issuer)

    async def get(self, client_id: str) -> Client | None:
        """The client of this id (the built-in one included), disabled or not."""
        if client_id == BUILTIN_CLIENT_ID:
            return self.builtin
        return await self.store.get_client(client_id) if is_client_id(client_id) else None

    async def get_with_session(self, client_id: str, session: str) -> tuple[Client | None, bool]:
        """`get`, and whether `session` is live, in one read of the store."""
        if client_id == BUILTIN_CLIENT_ID:
            return self.builtin, await self.store.session_live(session)
        if not is_client_id(client_id):
            return None, False
        return await self.store.get_client_and_session(client_id, session)

    async def list(self) -> Sequence[Client]:
        return [BUILTIN_CLIENT, *await self.store.list_clients()]

    def _complete(self, registration: Registration, now: float) -> tuple[Client, str | None]:
        r = registration
        if not is_client_id(r.client_id) or r.client_id.strip() != r.client_id:
            raise ClientError(f"invalid client id {r.client_id[:40]!r}: use 1-255 printable ASCII")
        if r.client_id == BUILTIN_CLIENT_ID:
            raise ClientError(f"{BUILTIN_CLIENT_ID!r} is the built-in client")
        grants = tuple(dict.fromkeys(r.grants)) or _default_grants(r)
        unknown = [g for g in grants if g not in GRANTS]
        if unknown:
            raise ClientError(f"unknown grant {unknown[0]!r}: use {', '.join(GRANTS)}")
        if r.public and CLIENT_CREDENTIALS in grants:
            # RFC 6749 §4.4: only a confidential client may use client_credentials.
            raise ClientError("a public client cannot use client_credentials")
        if r.public and r.jwks is not None:
            raise ClientError("a public client has no keys: drop --jwks-file or --public")
        if AUTHORIZATION_CODE in grants and not r.redirect_uris:
            raise ClientError("authorization_code needs at least one --redirect-uri")
        scopes = tuple(dict.fromkeys(r.scopes)) or None
        if scopes is not None:
            unknown = [s for s in scopes if s not in self.scopes]
            if unknown:
                raise ClientError(
                    f"unknown scope {unknown[0]!r}: AUTHSERVER_SCOPES has {' '.join(self.scopes)}"
                )
        secret, digest = (None, None) if r.public or r.jwks is not None else new_secret()
        client = Client(
            client_id=r.client_id,
            name=r.name or r.client_id,
            public=r.public,
            secret_digest=digest,
            previous_secret_digest=None,
            previous_secret_expires_at=None,
            jwks=r.jwks,
            grants=grants,
            scopes=scopes,
            redirect_uris=tuple(_check_redirect_uri(u) for u in dict.fromkeys(r.redirect_uris)),
            post_logout_redirect_uris=tuple(
                _check_redirect_uri(u) for u in dict.fromkeys(r.post_logout_redirect_uris)
            ),
            audience=r.audience,
            third_party=r.third_party,
            require_dpop=r.require_dpop,
            disabled=False,
            created_at=now,
            updated_at=now,
        )
        return client, secret

    async def register(
        self, ctx: RequestContext, registration: Registration
    ) -> tuple[Client, str | None]:
        """Add a client; its generated secret (shown once) if it is confidential without keys."""
        now = self.clock()
        client, secret = self._complete(registration, now)
        event = self.auditor.build(
            audit.CLIENT_ADDED,
            ctx,
            client_id=client.client_id,
            public=client.public,
            grants=list(client.grants),
        )

        async def work(tx: RefreshTransaction) -> None:
            await tx.add_client(client)
            await tx.add_audit_event(event)

        try:
            await self.store.atomic(work)
        except Conflict as exc:
            raise ClientError(f"client {client.client_id!r} already exists") from exc
        self.auditor.emit(event)
        return client, secret

    async def rotate_secret(self, ctx: RequestContext, client_id: str, *, grace: int) -> str:
        """A new secret; the current one keeps working for `grace` seconds."""
        secret, digest = new_secret()

        def rotate(client: Client, now: float) -> Client:
            if client.public or client.secret_digest is None:
                raise ClientError(f"client {client_id!r} has no secret to rotate")
            return replace(
                client,
                secret_digest=digest,
                previous_secret_digest=client.secret_digest if grace > 0 else None,
                previous_secret_expires_at=now + grace if grace > 0 else None,
            )

        await self._change(ctx, client_id, audit.CLIENT_SECRET_ROTATED, rotate, grace=grace)
        return secret

    async def set_disabled(self, ctx: RequestContext, client_id: str, disabled: bool) -> None:
        """A disabled client cannot authenticate, and its refresh tokens are refused."""
        event = audit.CLIENT_DISABLED if disabled else audit.CLIENT_ENABLED
        await self._change(
            ctx, client_id, event, lambda client, _now: replace(client, disabled=disabled)
        )

    async def remove(self, ctx: RequestContext, client_id: str) -> int:
        """Delete a client and revoke every refresh family issued to it; how many."""
        now = self.clock()
        self._refuse_builtin(client_id)

        events: list[AuditEvent] = []

        async def work(tx: RefreshTransaction) -> int | None:
            events.clear()
            if not await tx.delete_client(client_id):
                return None
            revoked = await tx.revoke_client_families(client_id, at=now, reason="client_removed")
            event = self.auditor.build(
                audit.CLIENT_REMOVED, ctx, client_id=client_id, families=revoked
            )
            await tx.add_audit_event(event)
            events.append(event)
            return revoked

        revoked = await self.store.atomic(work) if is_client_id(client_id) else None
        if revoked is None:
            raise ClientError(f"unknown client {client_id!r}")
        for event in events:
            self.auditor.emit(event)
        return revoked

    async def _change(
        self,
        ctx: RequestContext,
        client_id: str,
        event_name: str,
        change: Callable[[Client, float], Client],
        **details: Any,
    ) -> None:
        self._refuse_builtin(client_id)
        now = self.clock()
        event = self.auditor.build(event_name, ctx, client_id=client_id, **details)

        async def work(tx: RefreshTransaction) -> bool:
            client = await tx.get_client(client_id)
            if client is None:
                return False
            await tx.update_client(replace(change(client, now), updated_at=now))
            await tx.add_audit_event(event)
            return True

        if not (is_client_id(client_id) and await self.store.atomic(work)):
            raise ClientError(f"unknown client {client_id!r}")
        self.auditor.emit(event)

    @staticmethod
    def _refuse_builtin(client_id: str) -> None:
        if client_id == BUILTIN_CLIENT_ID:
            raise ClientError(f"{BUILTIN_CLIENT_ID!r} is the built-in client: it cannot change")


def describe(client: Client) -> dict[str, object]:
    """What `clients list --json` shows of a client: never a secret or its digest."""
    return {
        "client_id": client.client_id,
        "name": client.name,
        "type": "public" if client.public else "confidential",
        "auth": "none"
        if client.public
        else "private_key_jwt"
        if client.jwks is not None
        else "client_secret",
        "grants": list(client.grants),
        "scopes": list(client.scopes) if client.scopes is not None else None,
        "redirect_uris": list(client.redirect_uris),
        "post_logout_redirect_uris": list(client.post_logout_redirect_uris),
        "audience": client.audience,
        "third_party": client.third_party,
        "require_dpop": client.require_dpop,
        "created_at": client.created_at,
        "disabled": client.disabled,
        "jwks_keys": len(json.loads(client.jwks).get("keys", [])) if client.jwks else 0,
    }


MAX_ASSERTION_LIFETIME = 300  # seconds an assertion's `exp` may lie ahead (RFC 7523 §3)
_CLOCK_SKEW = 30


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """What a request presented to say which client it is (RFC 6749 §2.3, RFC 7523 §2.2)."""

    client_id: str | None = None
    secret: str | None = None
    assertion: str | None = None
    basic: bool = False  # the credentials came in HTTP Basic

    @property
    def method(self) -> str:
        if self.assertion is not None:
            return "private_key_jwt"
        if self.secret:
            return "client_secret_basic" if self.basic else "client_secret_post"
        return "none"


AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt", "none")
_REFUSED = "Client authentication failed."


def _assertion_subject(assertion: str) -> str | None:
    """The `sub` an assertion claims, read before its signature is checked: only to find
    whose keys check it."""
    if len(assertion) > MAX_TOKEN_LENGTH:
        return None
    try:
        payload = assertion.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, RecursionError):
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) else None


def _client_keys(client: Client) -> list[VerificationKey]:
    keys = []
    for jwk in json.loads(client.jwks or '{"keys": []}')["keys"]:
        alg = jwk.get("alg") or next(a for a, kty in KEY_TYPES.items() if kty == jwk["kty"])
        keys.append(VerificationKey(kid=jwk.get("kid", ""), alg=alg, key=prepare_key(jwk, alg)))
    return keys


class ClientAuthenticator:
    """Says which registered client a request comes from, or refuses: `authenticate`.

    Every failure is the same 401 `invalid_client`, whether the client is unknown,
    disabled or its credentials wrong; it is audited and counted by the login throttle
    under the client's id and the caller's network, and past the throttle's limits
    the answer is 429 `slow_down`.
    """

    def __init__(
        self,
        *,
        clients: ClientService,
        throttle: LoginThrottle,
        issuer: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clients = clients
        self.throttle = throttle
        self.issuer = issuer
        self.clock = clock

    async def authenticate(
        self, ctx: RequestContext, credentials: ClientCredentials, *, endpoint: str
    ) -> Client:
        """The client `credentials` prove, for a request to `endpoint` (its path)."""
        client, _live = await self._authenticate(ctx, credentials, endpoint=endpoint, session=None)
        return client

    async def authenticate_with_session(
        self, ctx: RequestContext, credentials: ClientCredentials, *, endpoint: str, session: str
    ) -> tuple[Client, bool]:
        """As `authenticate`, and whether `session` is live: read in the same query as the
        client (introspection's one round trip), told only once the client is proven."""
        return await self._authenticate(ctx, credentials, endpoint=endpoint, session=session)

    async def _authenticate(
        self,
        ctx: RequestContext,
        credentials: ClientCredentials,
        *,
        endpoint: str,
        session: str | None,
    ) -> tuple[Client, bool]:
        c = credentials
        if c.client_id is None and c.assertion is None:
            if c.secret:
                raise InvalidClientError(_REFUSED)
            # The seed's flow names no client.
            return self.clients.builtin, await self._session_live(session)
        claimed = c.client_id or (_assertion_subject(c.assertion) if c.assertion else None)
        client, live = await self._lookup(claimed, session)
        if client is not None and client.public and not client.disabled:
            # Nothing to check, and so nothing to guess: a public client only names itself.
            if c.method != "none":
                raise InvalidClientError("A public client sends no client secret.")
            return client, live
        now = self.clock()
        if (
            client is not None
            and not client.disabled
            and await self._verify(client, c, endpoint=endpoint, now=now)
        ):
            # Right: no count to check. A 256-bit secret is not guessed however many tries
            # the throttle allows, so the throttle's reads are spent on failures only.
            return client, live
        await self.clients.auditor.record(
            audit.CLIENT_AUTH_FAILED,
            ctx,
            # Named only if registered: a secret pasted as an id stays out of the trail.
            client_id=client.client_id if client is not None else None,
            method=c.method,
        )
        attempt = await self.throttle.begin(
            f"\0client\0{claimed or ''}", ctx.client_addr, user_id=None, now=now
        )
        await self.throttle.failed(attempt, now=now)  # 429 once the failures reach a limit
        raise InvalidClientError(_REFUSED)

    async def _lookup(self, claimed: str | None, session: str | None) -> tuple[Client | None, bool]:
        if not claimed:
            return None, False
        if session is None:
            return await self.clients.get(claimed), False
        return await self.clients.get_with_session(claimed, session)

    async def _session_live(self, session: str | None) -> bool:
        return session is not None and await self.clients.store.session_live(session)

    async def _verify(
        self, client: Client, c: ClientCredentials, *, endpoint: str, now: float
    ) -> bool:
        if client.jwks is not None:
            return c.assertion is not None and await self._verify_assertion(
                client, c.assertion, endpoint=endpoint, now=now
            )
        if c.assertion is not None or not c.secret:
            return False
        return check_secret(client, c.secret, now=now)

    async def _verify_assertion(
        self, client: Client, assertion: str, *, endpoint: str, now: float
    ) -> bool:
        """RFC 7523 §3: signed by the client's key, `iss` = `sub` = its id, for us, short-lived,
        and never seen before (on any process: the store records its `jti`)."""
        try:
            claims = verify_assertion(assertion, _client_keys(client))
        except InvalidTokenError:
            return False
        aud = claims.get("aud")
        audiences = {aud} if isinstance(aud, str) else set(aud) if isinstance(aud, list) else set()
        ours = {self.issuer, f"{self.issuer}/token", f"{self.issuer}{endpoint}"}
        exp, jti = claims.get("exp"), claims.get("jti")
        if (
            claims.get("iss") != client.client_id
            or claims.get("sub") != client.client_id
            or not audiences & ours
            or isinstance(exp, bool)
            or not isinstance(exp, (int, float))
            or not now - _CLOCK_SKEW < exp <= now + MAX_ASSERTION_LIFETIME + _CLOCK_SKEW
            or not isinstance(jti, str)
            or not jti
        ):
            return False
        nbf = claims.get("nbf")
        if isinstance(nbf, (int, float)) and nbf > now + _CLOCK_SKEW:
            return False
        key = used_id("jwt:", client.client_id, jti)
        # Kept for as long as the assertion would still be accepted (`exp` plus the skew).
        expires_at = float(exp) + _CLOCK_SKEW
        return await self.clients.store.use_jti(key, expires_at=expires_at, now=now)
