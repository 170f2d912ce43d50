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
CODE_EXCHANGED = "code_exchanged"
CODE_REUSE_DETECTED = "code_reuse_detected"
CONSENT_GRANTED = "consent_granted"
CONSENT_DENIED = "consent_denied"
BROWSER_SIGNED_OUT = "browser_signed_out"

_WARNINGS = {REUSE_DETECTED, LOGIN_THROTTLED, CLIENT_AUTH_FAILED, CODE_REUSE_DETECTED}


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who is asking: for the audit trail and the throttle, never for authorization."""

    client_addr: str | None = None
    request_id: str | None = None


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
        """Write the event's log line (once the change it describes has happened)."""
        level = logging.WARNING if event.event in _WARNINGS else logging.INFO
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
    ) -> AuditEvent:
        """Build and log an event that is not stored."""
        event = self.build(name, ctx, username=username, **details)
        self.emit(event)
        return event

    async def record(
        self, name: str, ctx: RequestContext, *, username: str | None = None, **details: Any
    ) -> None:
        """Log and store an event on its own; a store failure is logged, not raised."""
        event = self.event(name, ctx, username=username, **details)
        try:
            await self._store.add_audit_event(event)
        except StoreError:
            log.exception("audit event not stored", extra={"event": name})
