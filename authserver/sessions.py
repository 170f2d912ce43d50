"""Sessions, self-service and by the operator: list them, end them.

A session is a refresh family: everything descended from one login. It is live
while it can still be refreshed (the rotation's own rule, `store/rotation.py`),
and ending one revokes its family with the store's one revocation rule, the
rule /logout and reuse detection use too. So its refresh tokens are refused at
once by every process sharing the database, and introspection (which checks an
access token's `sid`) calls its access tokens inactive.

Every ending is a `session_ended` audit event, stored in the same transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from authserver import audit
from authserver.audit import Auditor, RequestContext
from authserver.errors import InsufficientScopeError, InvalidTokenError
from authserver.store.protocol import AuditEvent, RefreshTransaction, Session, Store
from authserver.tokens import AccessClaims
from authserver.users import UnknownUserError, normalize_username

# The family's `revoked_reason`.
ENDED = "session_ended"


@dataclass(frozen=True, slots=True)
class Caller:
    """A user acting on their own sessions, with the session of their access token."""

    username: str
    session_id: str

    @classmethod
    def of(cls, claims: AccessClaims) -> Caller:
        """The caller an access token names. Only a user's token has a session (`sid`);
        a client's own token (client_credentials, `sub` = the client) is valid but may
        not act for a user: 403 `insufficient_scope` (RFC 6750 §3.1)."""
        sid = claims.raw.get("sid")
        if not isinstance(sid, str) or not sid:
            raise InsufficientScopeError(
                description="Only a user's access token can manage sessions; this is a client's."
            )
        return cls(username=claims.sub, session_id=sid)


class SessionService:
    """Lists and ends sessions; one instance per process."""

    def __init__(
        self, *, store: Store, auditor: Auditor, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.auditor = auditor
        self.clock = clock

    async def list_of(self, username: str) -> Sequence[Session]:
        """A user's live sessions, oldest first; `UnknownUserError` for no such user."""
        name = await self._existing(username)
        return await self.store.live_sessions(now=self.clock(), username=name)

    async def list_own(self, caller: Caller) -> Sequence[Session]:
        """The caller's live sessions, the caller's own among them."""
        sessions = await self.store.live_sessions(now=self.clock(), username=caller.username)
        _require_live(caller, sessions)
        return sessions

    async def end(
        self, ctx: RequestContext, session_id: str, *, caller: Caller | None = None
    ) -> Session | None:
        """End one live session; None if there is no such live session, or (for a
        `caller`) it is not the caller's: the same answer, so ids of others' sessions
        cannot be probed."""
        now = self.clock()
        ended: list[AuditEvent] = []

        async def work(tx: RefreshTransaction) -> Session | None:
            ended.clear()
            if caller is None:
                found = await tx.live_sessions(now=now, session_id=session_id)
            else:
                found = await tx.live_sessions(now=now, username=caller.username)
                _require_live(caller, found)
            target = next((s for s in found if s.id == session_id), None)
            if target is None:
                return None
            await self._end(tx, ctx, [target], now=now, caller=caller, ended=ended)
            return target

        target = await self.store.atomic(work)
        self._emit(ended)
        return target

    async def end_others(self, ctx: RequestContext, caller: Caller) -> int:
        """End every live session of the caller but the current one; how many."""
        return await self._end_all(ctx, caller.username, caller=caller)

    async def end_all(self, ctx: RequestContext, username: str) -> int:
        """End every live session of a user (the operator's command); how many."""
        return await self._end_all(ctx, await self._existing(username), caller=None)

    async def _existing(self, username: str) -> str:
        """The stored spelling of an existing user's name, or `UnknownUserError`."""
        name = normalize_username(username)
        if name is None or await self.store.get_user(name) is None:
            raise UnknownUserError(f"unknown user {username!r}")
        return name

    async def _end_all(self, ctx: RequestContext, username: str, *, caller: Caller | None) -> int:
        now = self.clock()
        ended: list[AuditEvent] = []

        async def work(tx: RefreshTransaction) -> None:
            ended.clear()
            sessions = await tx.live_sessions(now=now, username=username)
            if caller is not None:
                _require_live(caller, sessions)
                sessions = [s for s in sessions if s.id != caller.session_id]
            await self._end(tx, ctx, sessions, now=now, caller=caller, ended=ended)

        await self.store.atomic(work)
        self._emit(ended)
        return len(ended)

    async def _end(
        self,
        tx: RefreshTransaction,
        ctx: RequestContext,
        sessions: Sequence[Session],
        *,
        now: float,
        caller: Caller | None,
        ended: list[AuditEvent],
    ) -> None:
        for session in sessions:
            if not await tx.revoke_family(session.id, at=now, reason=ENDED):
                continue  # ended meanwhile by someone else, who recorded it
            by = {"by": "operator"}
            if caller is not None:
                by = {"by": "user", "from_session": caller.session_id}
            event = self.auditor.build(
                audit.SESSION_ENDED,
                ctx,
                username=session.username,
                family_id=session.id,
                client_id=session.client_id,
                **by,
            )
            await tx.add_audit_event(event)
            ended.append(event)

    def _emit(self, events: Sequence[AuditEvent]) -> None:
        for event in events:
            self.auditor.emit(event)  # after the commit: a rolled-back attempt logs nothing


def _require_live(caller: Caller, sessions: Sequence[Session]) -> None:
    # A token of an ended session still verifies until it expires; it must not manage
    # the sessions that remain (whoever holds it may be the reason it was ended).
    if not any(s.id == caller.session_id for s in sessions):
        raise InvalidTokenError("The session of this access token has ended.")
