"""The grants: password (login) and refresh_token, plus revocation and logout.

The HTTP layer parses a request and calls one method of `AuthService`; every
client-caused failure leaves here as an `OAuthError`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from authserver import audit
from authserver.audit import Auditor, RequestContext
from authserver.errors import (
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    SlowDownError,
    UnsupportedGrantTypeError,
)
from authserver.passwords import PasswordHasher
from authserver.refresh import (
    Issued,
    Lifetimes,
    Refusal,
    Refused,
    revoke_family,
    rotate,
    start_family,
)
from authserver.store.protocol import Store
from authserver.throttle import LoginThrottle
from authserver.tokens import KeyRingSource, mint_access_token

MAX_USERNAME_LENGTH = 150
# RFC 6749 §3.3 scope-token characters.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_BAD_CREDENTIALS = "Invalid username or password."


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    issuer: str
    audience: str
    access_token_ttl: int
    scopes: tuple[str, ...]
    lifetimes: Lifetimes


def could_exist(username: str) -> bool:
    """False for a name no user can have: too long, or with a NUL (which PostgreSQL
    cannot even compare). Such a login fails like any unknown user's."""
    return len(username) <= MAX_USERNAME_LENGTH and "\x00" not in username


def parse_scope(scope: str | None) -> tuple[str, ...] | None:
    """Split a scope parameter (RFC 6749 §3.3); None when absent or empty."""
    if scope is None or not scope.strip(" "):
        return None
    tokens = tuple(dict.fromkeys(t for t in scope.split(" ") if t))
    if not all(_SCOPE_TOKEN.fullmatch(t) for t in tokens):
        raise InvalidScopeError("The scope parameter is malformed.")
    return tokens


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

    def _token_response(self, issued: Issued, scope: str, now: float) -> dict[str, Any]:
        kid, alg, key = self.keys.signing_key()
        access_token, expires_in = mint_access_token(
            key=key,
            kid=kid,
            alg=alg,
            issuer=self.policy.issuer,
            audience=self.policy.audience,
            subject=issued.username,
            scope=scope,
            client_id=issued.client_id,
            ttl=self.policy.access_token_ttl,
            now=now,
        )
        return {
            "access_token": access_token,
            "refresh_token": issued.refresh_token,
            "token_type": "bearer",
            "expires_in": expires_in,
            "scope": scope,
        }

    async def password_grant(
        self,
        ctx: RequestContext,
        *,
        username: str,
        password: str,
        scope: str | None,
        client_id: str,
    ) -> dict[str, Any]:
        """Log a user in (RFC 6749 §4.3); the token response body on success."""
        requested = parse_scope(scope)
        if requested is not None:
            unknown = [s for s in requested if s not in self.policy.scopes]
            if unknown:
                raise InvalidScopeError(f"Unknown scope: {' '.join(unknown)[:200]}.")
        granted = " ".join(requested or self.policy.scopes)
        now = self.clock()
        user = await self.store.get_user(username) if could_exist(username) else None
        try:
            await self.throttle.validate(username, ctx.client_addr, now=now)
            # Unknown users get a dummy check too, so timing does not reveal who exists.
            ok = await self.hasher.verify(password, user.password_hash if user else None)
            if user is None or not ok or user.disabled:
                reason = "unknown_user" if user is None else "disabled" if ok else "bad_password"
                await self.auditor.record(
                    audit.LOGIN_FAILED,
                    ctx,
                    username=user.username if user else None,
                    reason=reason,
                )
                await self.throttle.failed(username, ctx.client_addr, now=now)
                raise InvalidGrantError(_BAD_CREDENTIALS)
            await self.throttle.succeeded(username, ctx.client_addr, now=now)
        except SlowDownError:
            # Named only if the user exists: a password typed as a username stays out of the trail.
            await self.auditor.record(
                audit.LOGIN_THROTTLED, ctx, username=user.username if user else None
            )
            raise
        if self.hasher.needs_rehash(user.password_hash):
            new_hash = await self.hasher.hash(password)
            await self.store.upgrade_password_hash(user.id, user.password_hash, new_hash)
        # A login's steps after the hash (the throttle's reads, the new family's write,
        # the signature) take the event loop for about a millisecond when run back to
        # back; letting other requests in between them keeps their latency flat
        # under a stream of logins.
        await asyncio.sleep(0)
        issued = await start_family(
            self.store,
            self.auditor,
            ctx,
            user=user,
            scope=granted,
            client_id=client_id,
            lifetimes=self.policy.lifetimes,
            now=now,
        )
        if issued is None:
            await self.auditor.record(
                audit.LOGIN_FAILED, ctx, username=user.username, reason="user_changed"
            )
            raise InvalidGrantError(_BAD_CREDENTIALS)
        await asyncio.sleep(0)
        return self._token_response(issued, granted, now)

    async def refresh_grant(
        self, ctx: RequestContext, *, refresh_token: str, scope: str | None
    ) -> dict[str, Any]:
        """Rotate a refresh token (RFC 6749 §6); a narrower scope may be asked for."""
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
        )
        if isinstance(outcome, Refused):
            if outcome.reason is Refusal.INVALID_SCOPE:
                raise InvalidScopeError(outcome.reason.description)
            raise InvalidGrantError(outcome.reason.description)
        granted = outcome.granted_scope.split()
        effective = [s for s in (requested or granted) if s in self.policy.scopes]
        return self._token_response(outcome, " ".join(effective), now)

    async def revoke(self, ctx: RequestContext, *, token: str) -> None:
        """RFC 7009: revoke a refresh token's family; unknown tokens are silently fine."""
        await revoke_family(
            self.store, self.auditor, ctx, token=token, now=self.clock(), event=audit.REVOKED
        )

    async def logout(self, ctx: RequestContext, *, refresh_token: str) -> None:
        if not refresh_token:
            raise InvalidRequestError("The refresh_token is missing.")
        await revoke_family(
            self.store,
            self.auditor,
            ctx,
            token=refresh_token,
            now=self.clock(),
            event=audit.LOGGED_OUT,
        )


PASSWORD_GRANT = "password"
REFRESH_TOKEN_GRANT = "refresh_token"
GRANT_TYPES = (PASSWORD_GRANT, REFRESH_TOKEN_GRANT)


def _required(params: Mapping[str, str], name: str, *, empty_ok: bool = False) -> str:
    value = params.get(name)
    if value is None or (not value and not empty_ok):
        raise InvalidRequestError(f"The '{name}' parameter is missing.")
    return value


async def token_request(
    service: AuthService, ctx: RequestContext, params: Mapping[str, str], *, client_id: str
) -> dict[str, Any]:
    """The RFC 6749 token endpoint: dispatch on `grant_type` (§4.3, §6)."""
    grant_type = params.get("grant_type")
    if not grant_type:
        raise InvalidRequestError("The 'grant_type' parameter is missing.")
    if grant_type == PASSWORD_GRANT:
        return await service.password_grant(
            ctx,
            username=_required(params, "username"),
            # Unlike a username, an empty password is a (wrong) password, not a missing one.
            password=_required(params, "password", empty_ok=True),
            scope=params.get("scope"),
            client_id=client_id,
        )
    if grant_type == REFRESH_TOKEN_GRANT:
        return await service.refresh_grant(
            ctx, refresh_token=_required(params, "refresh_token"), scope=params.get("scope")
        )
    raise UnsupportedGrantTypeError(f"Unsupported grant_type; use one of {', '.join(GRANT_TYPES)}.")
