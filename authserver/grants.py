"""The grants: password (login), refresh_token and client_credentials, plus revocation and logout.

The HTTP layer parses a request (`api/token.py`: the /token form, the seed's JSON
bodies) and calls one method of `AuthService` with typed arguments; every
client-caused failure leaves here as an `OAuthError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from authserver import audit, metrics
from authserver.audit import Auditor, RequestContext
from authserver.authorize import check_verifier
from authserver.clients import (
    AUTHORIZATION_CODE,
    BUILTIN_CLIENT,
    CLIENT_CREDENTIALS,
    PASSWORD,
    REFRESH_TOKEN,
)
from authserver.errors import (
    InvalidDPoPProofError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    SlowDownError,
    UnauthorizedClientError,
)
from authserver.oidc import OPENID, mint_id_token
from authserver.passwords import PasswordHasher
from authserver.refresh import (
    MAX_REFRESH_TOKEN_LENGTH,
    Issued,
    Lifetimes,
    Refusal,
    Refused,
    digest,
    revoke_family,
    rotate,
    start_family,
)
from authserver.scopes import parse_scope
from authserver.store.protocol import (
    AuthorizationCode,
    Client,
    RefreshTransaction,
    Store,
    User,
)
from authserver.throttle import LoginThrottle
from authserver.tokens import KeyRingSource, mint_access_token
from authserver.users import normalize_username

_BAD_CREDENTIALS = "Invalid username or password."


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    issuer: str
    audience: str
    access_token_ttl: int
    scopes: tuple[str, ...]
    lifetimes: Lifetimes


class AuthService:
    """Issues, rotates and revokes tokens; one instance per application."""

    def __init__(
        self,
        *,
        store: Store,
        hasher: PasswordHasher,
        keys: KeyRingSource,
        auditor: Auditor,
        throttle: LoginThrottle,
        policy: TokenPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.keys = keys
        self.auditor = auditor
        self.throttle = throttle
        self.policy = policy
        self.clock = clock

    def _access_token(
        self,
        *,
        grant: str,
        subject: str,
        scope: str,
        client: Client,
        now: float,
        sid: str | None,
        jkt: str | None = None,
    ) -> dict[str, Any]:
        """The access token half of a response; `jkt` (a checked DPoP proof's key) binds
        it to that key and makes it a DPoP token (RFC 9449 §5)."""
        kid, alg, key = self.keys.signing_key()
        access_token, expires_in = mint_access_token(
            key=key,
            kid=kid,
            alg=alg,
            issuer=self.policy.issuer,
            audience=client.audience or self.policy.audience,
            subject=subject,
            scope=scope,
            client_id=client.client_id,
            ttl=self.policy.access_token_ttl,
            now=now,
            sid=sid,
            jkt=jkt,
        )
        # Only a registered client gets this far, so the label's values stay bounded.
        metrics.TOKENS_ISSUED_BATCH.inc(grant, client.client_id)
        return {
            "access_token": access_token,
            "token_type": "DPoP" if jkt is not None else "bearer",
            "expires_in": expires_in,
            "scope": scope,
        }

    def _token_response(
        self,
        grant: str,
        issued: Issued,
        scope: str,
        client: Client,
        now: float,
        jkt: str | None = None,
    ) -> dict[str, Any]:
        body = self._access_token(
            grant=grant,
            subject=issued.username,
            scope=scope,
            client=client,
            now=now,
            sid=issued.family_id,
            jkt=jkt,
        )
        return {**body, "refresh_token": issued.refresh_token}

    def _allowed_scopes(self, client: Client) -> tuple[str, ...]:
        return client.scopes if client.scopes is not None else self.policy.scopes

    def _granted_scope(self, client: Client, scope: str | None) -> str:
        """The scope to grant for a request's `scope` (RFC 6749 §3.3): what the client may
        have if it asks for nothing, else exactly what it asks, if it may have all of it."""
        requested = parse_scope(scope)
        allowed = self._allowed_scopes(client)
        if requested is not None and any(s not in allowed for s in requested):
            raise InvalidScopeError("The requested scope is not one this client may have.")
        return " ".join(requested or allowed)

    @staticmethod
    def _check_grant(client: Client, grant_type: str, dpop_jkt: str | None) -> None:
        if grant_type not in client.grants:
            raise UnauthorizedClientError(f"This client may not use the {grant_type} grant.")
        if client.require_dpop and dpop_jkt is None:
            # RFC 9449 §5.2 (dpop_bound_access_tokens): no token it could lose as a bearer.
            raise InvalidDPoPProofError("This client must send a DPoP proof.")

    async def client_credentials_grant(
        self,
        ctx: RequestContext,
        *,
        client: Client,
        scope: str | None,
        dpop_jkt: str | None = None,
    ) -> dict[str, Any]:
        """A token for the client itself (RFC 6749 §4.4): `sub` is its id, and no refresh
        token, since it can always authenticate again."""
        self._check_grant(client, CLIENT_CREDENTIALS, dpop_jkt)
        granted = self._granted_scope(client, scope)
        body = self._access_token(
            grant=CLIENT_CREDENTIALS,
            subject=client.client_id,
            scope=granted,
            client=client,
            now=self.clock(),
            sid=None,
            jkt=dpop_jkt,
        )
        # Logged, not stored: a service asks every few minutes, and the trail is for
        # events a person looks into (a failed client authentication is stored).
        self.auditor.event(
            audit.CLIENT_TOKEN_ISSUED, ctx, client_id=client.client_id, scope=granted
        )
        return body

    async def authenticate_user(
        self, ctx: RequestContext, *, username: str, password: str, now: float
    ) -> User:
        """The user whose password this is, or `InvalidGrantError` (the same whoever does
        not exist), or `SlowDownError` past the throttle's limits: the one rule for
        /login, /token's password grant and the browser's sign-in form."""
        name = normalize_username(username)
        user = await self.store.get_user(name) if name is not None else None
        try:
            attempt = await self.throttle.begin(
                name or username, ctx.client_addr, user_id=user.id if user else None, now=now
            )
            # Unknown users get a dummy check too, so timing does not reveal who exists.
            check = await self.hasher.check(password, user.password_hash if user else None)
            if user is None or not check.ok or user.disabled:
                reason = (
                    "unknown_user" if user is None else "disabled" if check.ok else "bad_password"
                )
                await self.auditor.record(
                    audit.LOGIN_FAILED,
                    ctx,
                    username=user.username if user else None,
                    reason=reason,
                )
                await self.throttle.failed(attempt, now=now)
                raise InvalidGrantError(_BAD_CREDENTIALS)
            await self.throttle.succeeded(attempt, now=now)
        except SlowDownError:
            # Named only if the user exists: a password typed as a username stays out of the trail.
            await self.auditor.record(
                audit.LOGIN_THROTTLED, ctx, username=user.username if user else None
            )
            raise
        if check.rehash:
            new_hash = await self.hasher.hash(password)
            await self.store.upgrade_password_hash(user.id, user.password_hash, new_hash)
        return user

    async def password_grant(
        self,
        ctx: RequestContext,
        *,
        username: str,
        password: str,
        scope: str | None,
        client: Client,
        dpop_jkt: str | None = None,
    ) -> dict[str, Any]:
        """Log a user in (RFC 6749 §4.3); the token response body on success.

        `dpop_jkt`, the key of the request's checked DPoP proof, binds the access token
        and, for a public client, the refresh family (RFC 9449 §5)."""
        self._check_grant(client, PASSWORD, dpop_jkt)
        granted = self._granted_scope(client, scope)
        now = self.clock()
        user = await self.authenticate_user(ctx, username=username, password=password, now=now)
        issued = await start_family(
            self.store,
            self.auditor,
            ctx,
            user=user,
            scope=granted,
            client_id=client.client_id,
            lifetimes=self.policy.lifetimes,
            now=now,
            # A confidential client's refresh token is bound by its authentication.
            dpop_jkt=dpop_jkt if client.public else None,
        )
        if issued is None:
            await self.auditor.record(
                audit.LOGIN_FAILED, ctx, username=user.username, reason="user_changed"
            )
            raise InvalidGrantError(_BAD_CREDENTIALS)
        # The signature (about half a millisecond of RSA) runs in a worker thread: the
        # library releases the GIL while it signs, so the loop answers other requests
        # meanwhile instead of holding them behind a login. Logins are rare and cost a
        # bcrypt each, so the hand-off costs them nothing that shows.
        body = await asyncio.to_thread(
            self._token_response, PASSWORD, issued, granted, client, now, dpop_jkt
        )
        if REFRESH_TOKEN not in client.grants:
            # A refresh token the client may never use is one more secret to lose. The
            # session (`sid`) stays: logout and introspection still need it.
            del body["refresh_token"]
        return body

    async def authorization_code_grant(
        self,
        ctx: RequestContext,
        *,
        code: str,
        redirect_uri: str,
        code_verifier: str | None,
        client: Client,
        dpop_jkt: str | None = None,
    ) -> dict[str, Any]:
        """Exchange an authorization code (RFC 6749 §4.1.3, RFC 7636 §4.6): once, within
        its 60 seconds, by the client it was issued to, with the redirect URI and the
        PKCE verifier of its request. A second use revokes what the first one issued
        (§4.1.2). An `id_token` comes with it when `openid` was granted. `dpop_jkt` binds
        the tokens as for the password grant (RFC 9449 §5)."""
        self._check_grant(client, AUTHORIZATION_CODE, dpop_jkt)
        now = self.clock()
        code_hash = digest(code) if len(code) <= MAX_REFRESH_TOKEN_LENGTH else ""
        found = await self.store.find_code(code_hash) if code_hash else None
        if found is None or found[0].client_id != client.client_id:
            raise InvalidGrantError("The authorization code is invalid.")
        stored, username = found
        if stored.used_at is not None:
            await self._code_reused(ctx, stored, username)
        if stored.expires_at <= now:
            raise InvalidGrantError("The authorization code has expired.")
        if redirect_uri != stored.redirect_uri:
            raise InvalidGrantError("The redirect_uri is not the authorization request's.")
        if not check_verifier(code_verifier, stored.code_challenge):
            raise InvalidGrantError("The code_verifier does not match the code_challenge.")
        self.keys.signing_key()  # fail before spending the code if nothing could sign
        user = await self.store.get_user(username)
        spent: list[bool] = []

        async def spend(tx: RefreshTransaction, family_id: str) -> bool:
            spent[:] = [await tx.use_code(code_hash, family_id=family_id, now=now)]
            return spent[0]

        # A password change or disable since the sign-in voids the code.
        fresh = user is not None and user.updated_at <= stored.auth_time
        issued = (
            await start_family(
                self.store,
                self.auditor,
                ctx,
                user=user,
                scope=stored.scope,
                client_id=client.client_id,
                lifetimes=self.policy.lifetimes,
                now=now,
                event_name=audit.CODE_EXCHANGED,
                within=spend,
                # A confidential client's refresh token is bound by its authentication.
                dpop_jkt=dpop_jkt if client.public else None,
            )
            if user is not None and fresh
            else None
        )
        if issued is None:
            if spent == [False]:  # another request spent it meanwhile: that is a reuse
                again = await self.store.find_code(code_hash)
                if again is not None:
                    await self._code_reused(ctx, again[0], username)
            raise InvalidGrantError("The authorization code is invalid.")
        body = self._token_response(AUTHORIZATION_CODE, issued, stored.scope, client, now, dpop_jkt)
        if REFRESH_TOKEN not in client.grants:
            del body["refresh_token"]
        if OPENID in stored.scope.split():
            body["id_token"] = mint_id_token(
                self.keys,
                issuer=self.policy.issuer,
                subject=issued.username,
                client_id=client.client_id,
                nonce=stored.nonce,
                auth_time=stored.auth_time,
                sid=stored.browser_session_id,
                access_token=body["access_token"],
                now=now,
            )
        return body

    async def _code_reused(
        self, ctx: RequestContext, stored: AuthorizationCode, username: str
    ) -> NoReturn:
        """RFC 6749 §4.1.2: a code used twice is refused, and what it issued is revoked."""
        family_id = stored.family_id
        if family_id is not None:
            event = self.auditor.build(
                audit.CODE_REUSE_DETECTED,
                ctx,
                username=username,
                client_id=stored.client_id,
                family_id=family_id,
            )

            async def work(tx: RefreshTransaction) -> None:
                await tx.revoke_family(family_id, at=self.clock(), reason="code_reuse")
                await tx.add_audit_event(event)

            await self.store.atomic(work)
            self.auditor.emit(event)
        raise InvalidGrantError("The authorization code was already used.")

    async def refresh_grant(
        self,
        ctx: RequestContext,
        *,
        refresh_token: str,
        scope: str | None,
        client: Client | None,
        dpop_jkt: str | None = None,
    ) -> dict[str, Any]:
        """Rotate a refresh token (RFC 6749 §6); a narrower scope may be asked for.

        `client` is the authenticated client, to which the token must have been issued;
        None where the request names none (the seed's /refresh), for the tokens of
        public clients only. `dpop_jkt` is the key of the request's checked DPoP proof:
        a bound family's token needs its own key's, and is not spent without it; a
        public client's family bound to no key yet is bound to it (RFC 9449 §5).
        """
        if client is not None:
            self._check_grant(client, REFRESH_TOKEN, dpop_jkt)
        requested = parse_scope(scope)
        # Fail before spending the token if nothing could sign its successor's pair.
        self.keys.signing_key()
        now = self.clock()
        outcome = await rotate(
            self.store,
            self.auditor,
            ctx,
            token=refresh_token,
            lifetimes=self.policy.lifetimes,
            now=now,
            requested_scope=frozenset(requested) if requested else None,
            client_id=client.client_id if client is not None else None,
            dpop_jkt=dpop_jkt,
            # Without a client named, the token is a public client's (rotation.py).
            bind=client is None or client.public,
        )
        if isinstance(outcome, Refused):
            if outcome.reason is Refusal.INVALID_SCOPE:
                raise InvalidScopeError(outcome.reason.description)
            if outcome.reason is Refusal.DPOP_KEY:
                raise InvalidDPoPProofError(outcome.reason.description)
            raise InvalidGrantError(outcome.reason.description)
        if client is None:
            client = await self._client_of(outcome)
        granted = outcome.granted_scope.split()
        effective = [s for s in (requested or granted) if s in self._allowed_scopes(client)]
        return self._token_response(
            REFRESH_TOKEN, outcome, " ".join(effective), client, now, dpop_jkt
        )

    async def _client_of(self, issued: Issued) -> Client:
        """The (public) client a token was issued to: its audience and scopes shape the
        new access token. The built-in client, the seed's, costs no query."""
        if issued.client_id == BUILTIN_CLIENT.client_id:
            return BUILTIN_CLIENT
        client = await self.store.get_client(issued.client_id)
        # The rotation just checked it is registered; removed meanwhile, it gets defaults.
        return client or replace(BUILTIN_CLIENT, client_id=issued.client_id)

    async def revoke(self, ctx: RequestContext, *, token: str, client: Client | None) -> None:
        """RFC 7009: revoke a refresh token's family, if it was issued to `client` (None:
        a request naming none, for public clients' tokens); anything else is silently
        fine (§2.2: the answer does not say)."""
        await revoke_family(
            self.store,
            self.auditor,
            ctx,
            token=token,
            now=self.clock(),
            event=audit.REVOKED,
            client_id=client.client_id if client is not None else None,
        )

    async def logout(
        self, ctx: RequestContext, *, refresh_token: str, client: Client | None
    ) -> None:
        if not refresh_token:
            raise InvalidRequestError("The refresh_token is missing.")
        await revoke_family(
            self.store,
            self.auditor,
            ctx,
            token=refresh_token,
            now=self.clock(),
            event=audit.LOGGED_OUT,
            client_id=client.client_id if client is not None else None,
        )


# The grants /token serves (RFC 8414 `grant_types_supported`).
GRANT_TYPES = (PASSWORD, REFRESH_TOKEN, CLIENT_CREDENTIALS, AUTHORIZATION_CODE)
