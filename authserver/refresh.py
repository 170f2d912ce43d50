"""Refresh-token rotation with reuse detection.

Every exchange spends the presented token and issues its successor in one
transaction (a compare-and-set on the token's state), so concurrent requests
with one token see exactly one winner. A spent token presented again is
treated as theft: RFC 6819 §5.2.2.3 and RFC 9700 §4.14.2 say to revoke the
whole family, the attacker's and the legitimate client's tokens alike.
https://www.rfc-editor.org/rfc/rfc9700#section-4.14.2

The only exception is the grace window (`refresh_reuse_grace`): for a few
seconds after a rotation, the *immediately previous* token may be exchanged
again, for a client whose response was lost. That revokes the unused
successor and issues a fresh one, so a family always has one live token.

Most exchanges are plain (an active, unexpired token of a live session), and
the store does those in one step (`Store.rotate_active`); everything else is
decided here, in `_Rotation.decide`. What makes a token unusable (a revoked
family, a disabled user, the session's maximum age, the idle lifetime) and how
long a successor lives are stated once, in SQL the two paths share
(`store/rotation.py`); the reasons a refusal gives are `Refusal`.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from authserver import audit
from authserver.audit import Auditor, RequestContext
from authserver.store.protocol import AuditEvent, RefreshRecord, RefreshTransaction, Store, User
from authserver.users import may_begin_session

REFRESH_TOKEN_BYTES = 32
MAX_REFRESH_TOKEN_LENGTH = 512


def digest(token: str) -> str:
    """What the database stores instead of the token: SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_refresh_token() -> tuple[str, str]:
    token = secrets.token_urlsafe(REFRESH_TOKEN_BYTES)
    return token, digest(token)


@dataclass(frozen=True, slots=True)
class Lifetimes:
    refresh_ttl: int
    session_max_age: int
    reuse_grace: int


@dataclass(frozen=True, slots=True)
class Issued:
    """A refresh token handed out, with what the access token beside it needs."""

    refresh_token: str
    family_id: str
    username: str
    granted_scope: str
    client_id: str


class Refusal(StrEnum):
    """Why an exchange failed: the audit trail's `reason`, and the client's description."""

    UNKNOWN = "unknown"
    MALFORMED = "malformed"
    WRONG_CLIENT = "wrong_client"
    DPOP_KEY = "dpop_key"
    CLIENT_DISABLED = "client_disabled"
    REVOKED = "revoked"
    REUSE = "reuse"
    EXPIRED = "expired"
    SESSION_EXPIRED = "session_expired"
    USER_DISABLED = "user_disabled"
    INVALID_SCOPE = "invalid_scope"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Refusal.UNKNOWN: "The refresh token is invalid.",
    Refusal.MALFORMED: "The refresh token is invalid.",
    # RFC 6749 §6: only the client it was issued to may use it; the token is not spent.
    Refusal.WRONG_CLIENT: "The refresh token was issued to another client.",
    # RFC 9449 §5: a public client's family is bound to its DPoP key; the token is not spent.
    Refusal.DPOP_KEY: "The refresh token is bound to a DPoP key: send a proof signed by it.",
    Refusal.CLIENT_DISABLED: "The refresh token has been revoked.",
    Refusal.REVOKED: "The refresh token has been revoked.",
    Refusal.REUSE: "The refresh token was already used; the session has been revoked.",
    Refusal.EXPIRED: "The refresh token has expired.",
    Refusal.SESSION_EXPIRED: "The session has reached its maximum age; log in again.",
    # Told apart from a revocation in the audit trail only: no hint that the account exists.
    Refusal.USER_DISABLED: "The refresh token has been revoked.",
    Refusal.INVALID_SCOPE: "The requested scope exceeds the granted scope.",
}


@dataclass(frozen=True, slots=True)
class Refused:
    """Why an exchange failed; raised by the caller only after the transaction commits."""

    reason: Refusal
    username: str | None = None
    family_id: str | None = None


async def start_family(
    store: Store,
    auditor: Auditor,
    ctx: RequestContext,
    *,
    user: User,
    scope: str,
    client_id: str,
    lifetimes: Lifetimes,
    now: float,
    event_name: str = audit.LOGIN_SUCCEEDED,
    within: Callable[[RefreshTransaction, str], Awaitable[bool]] | None = None,
    dpop_jkt: str | None = None,
) -> Issued | None:
    """Begin a new family at login and issue its first refresh token.

    `user` is the row the password was checked against. None (and nothing stored)
    if `users.may_begin_session` refuses: the user changed since, or if `within`
    (run in the same transaction with the new family's id, such as spending the
    authorization code it comes from) returns False. `dpop_jkt` binds
    the family to a DPoP key: every refresh must then prove possession of it.
    """
    family_id = str(uuid.uuid4())
    token, token_hash = new_refresh_token()
    session_end = now + lifetimes.session_max_age
    event = auditor.build(
        event_name,
        ctx,
        username=user.username,
        family_id=family_id,
        client_id=client_id,
        scope=scope,
    )

    async def work(tx: RefreshTransaction) -> bool:
        if not may_begin_session(user, await tx.lock_user(user.id)):
            return False
        if within is not None and not await within(tx, family_id):
            return False
        await tx.create_family(
            family_id=family_id,
            user_id=user.id,
            client_id=client_id,
            created_at=now,
            expires_at=session_end,
            ip=ctx.client_addr,
            user_agent=ctx.user_agent,
            dpop_jkt=dpop_jkt,
        )
        await tx.add_refresh(
            token_hash=token_hash,
            family_id=family_id,
            parent_hash=None,
            scope=scope,
            created_at=now,
            refresh_ttl=lifetimes.refresh_ttl,
        )
        await tx.add_audit_event(event)
        return True

    if not await store.atomic(work):
        return None
    auditor.emit(event)  # logged only once it is true
    return Issued(token, family_id, user.username, scope, client_id)


@dataclass(slots=True)
class _Rotation:
    """One exchange's decisions, made inside its transaction."""

    auditor: Auditor
    ctx: RequestContext
    lifetimes: Lifetimes
    now: float
    requested_scope: frozenset[str] | None
    client_id: str | None
    new_token: str
    new_hash: str
    dpop_jkt: str | None = None
    bind: bool = False  # bind an unbound family to `dpop_jkt` (a public client's proof)
    events: list[AuditEvent] = field(default_factory=list)

    async def decide(self, tx: RefreshTransaction, token_hash: str) -> Issued | Refused:
        self.events.clear()  # a retried transaction starts over
        rec = await tx.get_refresh(
            token_hash, now=self.now, client_id=self.client_id, dpop_jkt=self.dpop_jkt
        )
        if rec is None:
            return Refused(Refusal.UNKNOWN)
        # Another client's, without the family's DPoP key, revoked, disabled, too old or
        # idle too long: decided by the store, in the same SQL the fast path filters on.
        if rec.refusal is not None:
            return Refused(Refusal(rec.refusal), rec.username, rec.family_id)
        if rec.status == "active":
            if self._widens(rec):
                return Refused(Refusal.INVALID_SCOPE, rec.username, rec.family_id)
            if not await tx.spend_refresh(
                token_hash, expected="active", successor_hash=self.new_hash, at=self.now
            ):
                return await self._reuse(tx, rec)
            return await self._issue(tx, rec)
        # A token its family issued before it was bound (not refused above) may be retried
        # only with the family's key: a thief who bound a stolen copy to their own key
        # must not have the owner's retry go to them, nor their own retry be spared.
        if self._proves_the_family_key(rec) and await _within_grace(
            tx, rec, self.lifetimes, self.now
        ):
            if self._widens(rec):
                return Refused(Refusal.INVALID_SCOPE, rec.username, rec.family_id)
            # A retry after a lost response: the unused successor gives way.
            assert rec.successor_hash is not None and rec.spent_at is not None
            await tx.revoke_token(rec.successor_hash)
            await tx.spend_refresh(
                token_hash, expected="spent", successor_hash=self.new_hash, at=rec.spent_at
            )
            return await self._issue(tx, rec)
        return await self._reuse(tx, rec)  # spent, and not the grace window's retry

    def _proves_the_family_key(self, rec: RefreshRecord) -> bool:
        return rec.dpop_jkt is None or rec.dpop_jkt == self.dpop_jkt

    def _widens(self, rec: RefreshRecord) -> bool:
        # RFC 6749 §6: a refresh may narrow the scope, never widen it.
        granted = set(rec.scope.split())
        return self.requested_scope is not None and not self.requested_scope <= granted

    async def _issue(self, tx: RefreshTransaction, rec: RefreshRecord) -> Issued:
        if self.bind and self.dpop_jkt is not None and rec.dpop_jkt is None:
            # From the successor on (its `created_at` is `now`): the family's earlier
            # tokens stay unbound, and a spent one replayed meets reuse detection.
            await tx.bind_family(rec.family_id, self.dpop_jkt, at=self.now)
        await tx.add_refresh(
            token_hash=self.new_hash,
            family_id=rec.family_id,
            parent_hash=rec.token_hash,
            scope=rec.scope,
            created_at=self.now,
            refresh_ttl=self.lifetimes.refresh_ttl,
        )
        await self._audit(
            tx,
            self.auditor.build(
                audit.REFRESHED, self.ctx, username=rec.username, family_id=rec.family_id
            ),
        )
        return Issued(self.new_token, rec.family_id, rec.username, rec.scope, rec.client_id)

    async def _reuse(self, tx: RefreshTransaction, rec: RefreshRecord) -> Refused:
        await tx.revoke_family(rec.family_id, at=self.now, reason="reuse")
        await self._audit(
            tx,
            self.auditor.build(
                audit.REUSE_DETECTED,
                self.ctx,
                username=rec.username,
                family_id=rec.family_id,
                spent_at=rec.spent_at,
            ),
        )
        return Refused(Refusal.REUSE, rec.username, rec.family_id)

    async def _audit(self, tx: RefreshTransaction, event: AuditEvent) -> None:
        await tx.add_audit_event(event)
        self.events.append(event)


async def rotate(
    store: Store,
    auditor: Auditor,
    ctx: RequestContext,
    *,
    token: str,
    lifetimes: Lifetimes,
    now: float,
    requested_scope: frozenset[str] | None = None,
    client_id: str | None,
    dpop_jkt: str | None = None,
    bind: bool = False,
    fast_path: bool = True,
) -> Issued | Refused:
    """Exchange a refresh token for its successor, detecting reuse.

    `client_id` is the authenticated client's, which must be the one the token was
    issued to; None where the request names no client (the seed's /refresh), which
    only a public client's token allows. `dpop_jkt` is the key the request's DPoP
    proof was signed with (None: no proof), which a bound family's token needs.
    With `bind` (a public client's request), a family bound to no key yet is bound
    to `dpop_jkt` (CONTRACT §8: a proof at /refresh binds the family as at login).

    Returns `Refused` (after committing any revocation it caused) rather than
    raising, so that a reuse detection is never rolled back with the error.
    The plain exchange is first tried as the store's one step (`rotate_active`);
    `fast_path=False` skips that, for the tests that hold the two paths equal.
    """
    if not token or len(token) > MAX_REFRESH_TOKEN_LENGTH:
        return Refused(Refusal.MALFORMED)
    token_hash = digest(token)
    new_token, new_hash = new_refresh_token()
    if requested_scope is None and fast_path:
        event = auditor.build(audit.REFRESHED, ctx)
        done = await store.rotate_active(
            token_hash=token_hash,
            successor_hash=new_hash,
            now=now,
            refresh_ttl=lifetimes.refresh_ttl,
            event=event,
            client_id=client_id,
            dpop_jkt=dpop_jkt,
            bind=bind,
        )
        if done is not None:
            auditor.emit(
                replace(event, username=done.username, details={"family_id": done.family_id})
            )
            return Issued(new_token, done.family_id, done.username, done.scope, done.client_id)
    rotation = _Rotation(
        auditor,
        ctx,
        lifetimes,
        now,
        requested_scope,
        client_id,
        new_token,
        new_hash,
        dpop_jkt,
        bind,
    )
    outcome = await store.atomic(lambda tx: rotation.decide(tx, token_hash))
    for event in rotation.events:
        auditor.emit(event)  # after the commit: a rolled-back attempt logs nothing
    if isinstance(outcome, Refused) and outcome.reason is not Refusal.REUSE:
        auditor.event(
            audit.REFRESH_FAILED,
            ctx,
            username=outcome.username,
            reason=outcome.reason,
            family_id=outcome.family_id,
        )
    return outcome


async def _within_grace(
    tx: RefreshTransaction, rec: RefreshRecord, lifetimes: Lifetimes, now: float
) -> bool:
    if lifetimes.reuse_grace <= 0 or rec.spent_at is None or rec.successor_hash is None:
        return False
    if now >= rec.spent_at + lifetimes.reuse_grace:
        return False
    successor = await tx.get_refresh(rec.successor_hash, now=now, client_id=None)
    # Only the immediately previous token: its successor must still be unused.
    return successor is not None and successor.status == "active"


async def revoke_family(
    store: Store,
    auditor: Auditor,
    ctx: RequestContext,
    *,
    token: str,
    now: float,
    event: str,
    client_id: str | None,
) -> bool:
    """Revoke the family of a refresh token; False if the token is unknown, or was issued
    to another client than `client_id` (None: any public client, as at /refresh): RFC
    7009 §2.1 lets only its own client revoke a token."""
    if not token or len(token) > MAX_REFRESH_TOKEN_LENGTH:
        return False
    token_hash = digest(token)
    revoked: list[AuditEvent] = []

    async def work(tx: RefreshTransaction) -> bool:
        revoked.clear()
        rec = await tx.get_refresh(token_hash, now=now, client_id=client_id)
        if rec is None or rec.refusal == "wrong_client":
            return False
        if await tx.revoke_family(rec.family_id, at=now, reason=event):
            built = auditor.build(event, ctx, username=rec.username, family_id=rec.family_id)
            await tx.add_audit_event(built)
            revoked.append(built)
        return True

    known = await store.atomic(work)
    for built in revoked:
        auditor.emit(built)
    return known
