"""Security events: one structured log line each, and a row in `audit_events`.

Nothing secret is ever passed here: no password, token or key material; a
refresh family is named by its id, a key by its kid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from authserver import metrics
from authserver.store.protocol import AuditEvent, Store, StoreError

log = logging.getLogger("authserver.audit")

LOGIN_SUCCEEDED = "login_succeeded"
LOGIN_FAILED = "login_failed"
LOGIN_THROTTLED = "login_throttled"
REFRESHED = "refreshed"
REFRESH_FAILED = "refresh_failed"
REUSE_DETECTED = "refresh_reuse_detected"
REVOKED = "revoked"
LOGGED_OUT = "logged_out"
USER_CREATED = "user_created"
PASSWORD_CHANGED = "password_changed"
USER_DISABLED = "user_disabled"
USER_ENABLED = "user_enabled"
KEY_ADDED = "key_added"
KEY_RETIRED = "key_retired"
CLIENT_ADDED = "client_added"
CLIENT_SECRET_ROTATED = "client_secret_rotated"
CLIENT_DISABLED = "client_disabled"
CLIENT_ENABLED = "client_enabled"
CLIENT_REMOVED = "client_removed"
CLIENT_AUTH_FAILED = "client_auth_failed"
CLIENT_TOKEN_ISSUED = "client_token_issued"
SESSION_ENDED = "session_ended"
CODE_EXCHANGED = "code_exchanged"
CODE_REUSE_DETECTED = "code_reuse_detected"
CONSENT_GRANTED = "consent_granted"
CONSENT_DENIED = "consent_denied"
BROWSER_SIGNED_OUT = "browser_signed_out"

# The closed set of event names, each with what triggers it. The README's "Audit events"
# table is checked against this (tests/test_readme.py), and `authserver audit --event`
# refuses any other name. A new event goes here, beside the others.
EVENTS: dict[str, str] = {
    LOGIN_SUCCEEDED: "a password login (`/login`, `/token` with the password grant, or the "
    "browser sign-in page) succeeded",
    LOGIN_FAILED: "a password login was refused: unknown user, wrong password, disabled "
    "user, or the user changed while the password was checked (`reason` says which)",
    LOGIN_THROTTLED: "a login was refused with 429 because of too many recent failures",
    REFRESHED: "a refresh token was exchanged for a new pair",
    REFRESH_FAILED: "a refresh token was refused: unknown, expired, revoked or another "
    "client's (`reason` says which)",
    REUSE_DETECTED: "a spent refresh token was presented again: its whole session was revoked",
    REVOKED: "a refresh token's session was revoked through `/revoke` (RFC 7009)",
    LOGGED_OUT: "a refresh token's session was ended through `/logout`",
    USER_CREATED: "`authserver users add` created a user (or `serve --demo` the demo user)",
    PASSWORD_CHANGED: "`authserver users passwd` set a new password; the user's sessions "
    "were revoked",
    USER_DISABLED: "`authserver users disable`: the user's sessions were revoked",
    USER_ENABLED: "`authserver users enable`",
    KEY_ADDED: "`authserver keys generate` wrote a new signing key",
    KEY_RETIRED: "`authserver keys retire` deleted a key",
    CLIENT_ADDED: "`authserver clients add` registered a client",
    CLIENT_SECRET_ROTATED: "`authserver clients rotate-secret` issued a new client secret",
    CLIENT_DISABLED: "`authserver clients disable`",
    CLIENT_ENABLED: "`authserver clients enable`",
    CLIENT_REMOVED: "`authserver clients remove`: the client's sessions were revoked",
    CLIENT_AUTH_FAILED: "a client failed to authenticate (wrong secret, bad assertion, "
    "unknown or disabled client)",
    CLIENT_TOKEN_ISSUED: "a client was issued a token for itself (client-credentials grant); "
    "a log line at DEBUG only, never stored: routine, and `authserver_tokens_issued_total` "
    "counts it",
    SESSION_ENDED: "a session was ended by its user (`DELETE /sessions/{id}`, `DELETE "
    "/sessions`: `by=user`) or `authserver sessions revoke` (`by=operator`)",
    CODE_EXCHANGED: "an authorization code became tokens: a new session (refresh family)",
    CODE_REUSE_DETECTED: "an authorization code was presented again: what it issued is revoked",
    CONSENT_GRANTED: "a user allowed a third-party app the scopes on its consent page",
    CONSENT_DENIED: "a user refused a third-party app on its consent page",
    BROWSER_SIGNED_OUT: "`/end-session` ended a browser session and the sessions begun from it",
}
# Every other event logs at INFO. A client's token issued is routine and changes nothing:
# at DEBUG (AUTHSERVER_LOG_LEVEL=DEBUG shows it), since a service asks every few minutes,
# a log line per issuance cost more than the issuance, and authserver_tokens_issued_total
# counts them per client and grant.
_LEVELS = {
    REUSE_DETECTED: logging.WARNING,
    LOGIN_THROTTLED: logging.WARNING,
    CLIENT_AUTH_FAILED: logging.WARNING,
    CODE_REUSE_DETECTED: logging.WARNING,
    CLIENT_TOKEN_ISSUED: logging.DEBUG,
}

# The events the Prometheus metrics count (metrics.py), each once it is true: `emit` runs
# after the change it describes has committed.
_COUNTED: dict[str, tuple[metrics.BatchedCounter, tuple[str, ...]]] = {
    LOGIN_SUCCEEDED: (metrics.LOGINS_BATCH, ("ok",)),
    LOGIN_FAILED: (metrics.LOGINS_BATCH, ("bad_credentials",)),
    LOGIN_THROTTLED: (metrics.LOGINS_BATCH, ("throttled",)),
    REFRESHED: (metrics.REFRESH_ROTATIONS_BATCH, ()),
    REUSE_DETECTED: (metrics.REUSE_DETECTIONS_BATCH, ()),
}


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who is asking: for the audit trail and the throttle, never for authorization."""

    client_addr: str | None = None
    request_id: str | None = None
    user_agent: str | None = None  # kept with a session begun by this request


CLI = RequestContext(client_addr="cli")


class Auditor:
    """Builds events, logs them, and (via `record`) stores them."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def build(
        self, name: str, ctx: RequestContext, *, username: str | None = None, **details: Any
    ) -> AuditEvent:
        """Build an event without logging it: for a transaction that may still roll back."""
        if name not in EVENTS:
            raise ValueError(f"unknown audit event {name!r}: add it to audit.EVENTS")
        return AuditEvent(
            at=self._clock(),
            event=name,
            username=username,
            client_addr=ctx.client_addr,
            request_id=ctx.request_id,
            details=details,
        )

    def emit(self, event: AuditEvent) -> None:
        """Write the event's log line and count it (once the change it describes has happened)."""
        counted = _COUNTED.get(event.event)
        if counted is not None:
            counted[0].inc(*counted[1])
        level = _LEVELS.get(event.event, logging.INFO)
        if not log.isEnabledFor(level):
            return
        log.log(
            level,
            event.event,
            extra={
                "event": event.event,
                "username": event.username,
                "client_addr": event.client_addr,
                "request_id": event.request_id,
                **event.details,
            },
        )

    def event(
        self, name: str, ctx: RequestContext, *, username: str | None = None, **details: Any
    ) -> None:
        """Log an event that is not stored; not even built if nothing would see it."""
        if name in _COUNTED or log.isEnabledFor(_LEVELS.get(name, logging.INFO)):
            self.emit(self.build(name, ctx, username=username, **details))

    async def record(
        self, name: str, ctx: RequestContext, *, username: str | None = None, **details: Any
    ) -> None:
        """Log and store an event on its own; a store failure is logged, not raised."""
        event = self.build(name, ctx, username=username, **details)
        self.emit(event)
        try:
            await self._store.add_audit_event(event)
        except StoreError:
            log.exception("audit event not stored", extra={"event": name})
