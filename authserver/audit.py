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

# Every other event logs at INFO. A client's token issued is routine and changes nothing:
# at DEBUG (AUTHSERVER_LOG_LEVEL=DEBUG shows it), since a service asks every few minutes,
# a log line per issuance cost more than the issuance, and authserver_tokens_issued_total
# counts them per client and grant.
_LEVELS = {
    REUSE_DETECTED: logging.WARNING,
    LOGIN_THROTTLED: logging.WARNING,
    CLIENT_AUTH_FAILED: logging.WARNING,
    CLIENT_TOKEN_ISSUED: logging.DEBUG,
}

# The events the Prometheus metrics count (metrics.py), each once it is true: `emit` runs
# after the change it describes has committed.
_COUNTED = {
    LOGIN_SUCCEEDED: metrics.LOGINS.labels("ok"),
    LOGIN_FAILED: metrics.LOGINS.labels("bad_credentials"),
    LOGIN_THROTTLED: metrics.LOGINS.labels("throttled"),
    REFRESHED: metrics.REFRESH_ROTATIONS,
    REUSE_DETECTED: metrics.REUSE_DETECTIONS,
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
        counter = _COUNTED.get(event.event)
        if counter is not None:
            counter.inc()
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
