"""What the domain modules need from storage. `sql.py` implements all of it."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

T = TypeVar("T")

TokenStatus = Literal["active", "spent", "revoked"]
# Why a stored token cannot be exchanged, whatever the request (`rotation.refusal`).
TokenRefusal = Literal[
    "wrong_client",
    "dpop_key",
    "client_disabled",
    "revoked",
    "user_disabled",
    "session_expired",
    "expired",
]


class StoreError(Exception):
    """Base of the store's own exceptions; never shown to a client as-is."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class UpgradeRefused(StoreError):
    """A schema migration that would lose or merge data stopped, changing nothing;
    the message is one line naming what to fix."""


class StoreUnavailable(StoreError):
    """The database did not answer, or stayed too contended to finish the work."""


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    password_hash: str
    disabled: bool
    created_at: float
    updated_at: float  # the last password change, disable or enable


@dataclass(frozen=True, slots=True)
class RefreshRecord:
    """One stored refresh token, with its family's client and its user, as of `now`."""

    token_hash: str
    family_id: str
    parent_hash: str | None
    successor_hash: str | None
    status: TokenStatus
    scope: str
    created_at: float
    expires_at: float
    spent_at: float | None
    client_id: str
    user_id: int
    username: str
    # None when the token is active and exchangeable, or spent; decided in SQL.
    refusal: TokenRefusal | None
    dpop_jkt: str | None = None  # the DPoP key its family is bound to


@dataclass(frozen=True, slots=True)
class Session:
    """A live session (refresh family): one that can still be refreshed."""

    id: str
    username: str
    client_id: str
    created_at: float
    last_used_at: float  # the login, or the last rotation
    expires_at: float  # when it ends unless used again (never after its maximum age)
    ip: str | None  # of the login that began it
    user_agent: str | None


@dataclass(frozen=True, slots=True)
class Rotated:
    """What a one-step rotation spent: enough to answer and to log it."""

    family_id: str
    username: str
    scope: str
    client_id: str


@dataclass(frozen=True, slots=True)
class Client:
    """A registered client (RFC 6749 §2), as stored."""

    client_id: str
    name: str
    public: bool
    secret_digest: str | None
    previous_secret_digest: str | None
    previous_secret_expires_at: float | None
    jwks: str | None
    grants: tuple[str, ...]
    scopes: tuple[str, ...] | None  # None: every configured scope
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...]
    audience: str | None  # None: the server's default audience
    third_party: bool
    require_dpop: bool
    disabled: bool
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class BrowserSession:
    """A live signed-in browser: its user is enabled and unchanged since the sign-in."""

    id: str
    user_id: int
    username: str
    auth_time: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class AuthorizationCode:
    """An authorization code as stored (by digest), with everything it is bound to."""

    code_hash: str
    client_id: str
    user_id: int
    browser_session_id: str
    redirect_uri: str
    code_challenge: str
    scope: str
    nonce: str | None
    auth_time: float
    created_at: float
    expires_at: float
    used_at: float | None = None
    family_id: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: float
    event: str
    username: str | None
    client_addr: str | None
    request_id: str | None
    details: dict[str, Any]


class RefreshTransaction(Protocol):
    """The refresh-token operations that must run together in one transaction."""

    async def get_refresh(
        self, token_hash: str, *, now: float, client_id: str | None, dpop_jkt: str | None = None
    ) -> RefreshRecord | None:
        """Read a token and lock it against concurrent writers until commit; its
        `refusal` is the one it has at `now` for the client `client_id` (None: a request
        that names no client, which only a public client's token allows) proving the
        DPoP key `dpop_jkt` (None: no proof)."""

    async def get_user(self, username: str) -> User | None: ...

    async def lock_user(self, user_id: int) -> User | None:
        """Read a user and hold it against a concurrent password change or disable."""

    async def create_family(
        self,
        *,
        family_id: str,
        user_id: int,
        client_id: str,
        created_at: float,
        expires_at: float,
        ip: str | None = None,
        user_agent: str | None = None,
        dpop_jkt: str | None = None,
    ) -> None:
        """Begin a session; `ip` and `user_agent` are those of the login that began it,
        `dpop_jkt` binds it to a DPoP key (RFC 9449 §5)."""

    async def add_refresh(
        self,
        *,
        token_hash: str,
        family_id: str,
        parent_hash: str | None,
        scope: str,
        created_at: float,
        refresh_ttl: int,
    ) -> None:
        """Issue an active token that expires `refresh_ttl` seconds after `created_at`,
        or at its family's end if that comes first."""

    async def spend_refresh(
        self, token_hash: str, *, expected: TokenStatus, successor_hash: str, at: float
    ) -> bool:
        """Compare-and-set: mark the token spent if it is still `expected`."""

    async def revoke_token(self, token_hash: str) -> None: ...

    async def bind_family(self, family_id: str, dpop_jkt: str, *, at: float) -> None:
        """Bind a family that is bound to no DPoP key yet to `dpop_jkt` from `at` on (the
        tokens it issued before stay unbound); a bound family is left as it is."""

    async def revoke_family(self, family_id: str, *, at: float, reason: str) -> bool:
        """Revoke the family and every token in it; False if it already was."""

    async def live_sessions(
        self, *, now: float, username: str | None = None, session_id: str | None = None
    ) -> Sequence[Session]:
        """The live sessions of `username`, or the one with id `session_id`, oldest first."""

    async def add_audit_event(self, event: AuditEvent) -> None:
        """Record an event in the same transaction as the change it describes."""

    async def add_user(self, username: str, password_hash: str, *, at: float) -> User:
        """Insert a user; `Conflict` (from `Store.atomic`) if the name is taken."""

    async def update_user(
        self,
        user_id: int,
        *,
        at: float,
        password_hash: str | None = None,
        disabled: bool | None = None,
    ) -> None:
        """Set what is given, and `updated_at`: the mark a login in flight checks."""

    async def revoke_user_families(self, user_id: int, *, at: float, reason: str) -> int:
        """Revoke every live family of the user (and their tokens); how many there were."""

    async def get_client(self, client_id: str) -> Client | None: ...

    async def add_client(self, client: Client) -> None:
        """Insert a client; `Conflict` (from `Store.atomic`) if the id is taken."""

    async def update_client(self, client: Client) -> bool:
        """Store every field of `client` over the row of its id; False if there is none."""

    async def delete_client(self, client_id: str) -> bool: ...

    async def revoke_client_families(self, client_id: str, *, at: float, reason: str) -> int:
        """Revoke every live family issued to the client; how many there were."""

    async def use_code(self, code_hash: str, *, family_id: str, now: float) -> bool:
        """Compare-and-set: mark an unused, unexpired code used, for `family_id`."""


class Store(Protocol):
    async def atomic(self, work: Callable[[RefreshTransaction], Awaitable[T]]) -> T:
        """Run `work` in one transaction, retried on serialization failures.

        A unique constraint violated inside `work` leaves as `Conflict`."""

    async def rotate_active(
        self,
        *,
        token_hash: str,
        successor_hash: str,
        now: float,
        refresh_ttl: int,
        event: AuditEvent,
        client_id: str | None,
        dpop_jkt: str | None = None,
        bind: bool = False,
    ) -> Rotated | None:
        """The common exchange as one atomic step, where the backend has one.

        Spends `token_hash` if it is active, unexpired, of a live family and an
        enabled user, issues `successor_hash` in its family and stores `event`
        (its username and family id filled in). None means nothing was done and
        the caller takes the general path (`atomic`), which decides the rest:
        with `bind`, an unbound family (which `dpop_jkt` would bind) too.
        """

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    async def get_user(self, username: str) -> User | None: ...

    async def add_user(self, username: str, password_hash: str, *, at: float) -> User: ...

    async def upgrade_password_hash(self, user_id: int, old_hash: str, new_hash: str) -> None: ...

    async def set_disabled(self, username: str, disabled: bool, *, at: float) -> User:
        """Only the flag: ending the user's sessions is `users.UserService`'s rule."""

    async def list_users(self) -> Sequence[User]: ...

    async def purge_expired(self, *, now: float) -> int: ...

    async def add_login_failure(self, keys: Sequence[str], *, at: float) -> None: ...

    async def login_failures(self, key: str, *, since: float) -> tuple[int, float | None]:
        """How many failures `key` has since `since`, and when the oldest was."""

    async def clear_login_failures(self, key: str) -> None: ...

    async def purge_login_failures(self, *, before: float) -> int: ...

    async def remember_login_address(self, user_id: int, network_key: str, *, at: float) -> None:
        """Record (or refresh) a network the user has logged in from."""

    async def is_login_address(self, user_id: int, network_key: str, *, since: float) -> bool:
        """Whether the user has logged in from the network since `since`."""

    async def purge_login_addresses(self, *, before: float) -> int: ...

    async def add_audit_event(self, event: AuditEvent) -> None: ...

    async def get_client(self, client_id: str) -> Client | None: ...

    async def list_clients(self) -> Sequence[Client]: ...

    async def find_refresh(self, token_hash: str, *, now: float) -> RefreshRecord | None:
        """Read a token without locking it; its `refusal` as for the client it was issued
        to (for introspection)."""

    async def session_live(self, family_id: str) -> bool:
        """Whether the session (refresh family) exists and has not been revoked."""

    async def get_client_and_session(
        self, client_id: str, family_id: str
    ) -> tuple[Client | None, bool]:
        """`get_client` and `session_live` read together (one round trip); (None, False)
        if the client does not exist."""

    async def live_sessions(
        self, *, now: float, username: str | None = None, session_id: str | None = None
    ) -> Sequence[Session]:
        """As `RefreshTransaction.live_sessions`, outside a transaction."""

    async def use_jti(self, key: str, *, expires_at: float, now: float) -> bool:
        """Record a single-use id (a `used_id` key) until `expires_at`; False if it is
        already recorded (and not yet expired): a replay."""

    async def purge_used_jtis(self, *, before: float) -> int:
        """Forget the ids that expired by `before`; how many went."""

    async def add_code(self, code: AuthorizationCode) -> None: ...

    async def find_code(self, code_hash: str) -> tuple[AuthorizationCode, str] | None:
        """A stored code, and its user's name."""

    async def start_browser_session(
        self,
        *,
        session_id: str,
        token_hash: str,
        user_id: int,
        auth_time: float,
        expires_at: float,
        event: AuditEvent,
    ) -> None:
        """Store a new browser session and its audit event, in one transaction."""

    async def get_browser_session(self, token_hash: str, *, now: float) -> BrowserSession | None:
        """The live session of this cookie digest: not ended or expired, its user enabled
        and not changed (password, disable) since it signed in; else None."""

    async def end_browser_session(self, session_id: str, *, at: float, event: AuditEvent) -> int:
        """End a browser session and revoke every refresh family exchanged from its codes
        (with `event`, in one transaction); how many families were live."""

    async def has_consent(self, user_id: int, client_id: str, scope: str) -> bool: ...

    async def add_consent(
        self, user_id: int, client_id: str, scope: str, *, at: float, event: AuditEvent
    ) -> None:
        """Remember a consent (again: its time is refreshed), with its audit event."""

    async def purge_browser_sign_in(self, *, now: float) -> tuple[int, int]:
        """Delete expired codes no session needs, and ended or expired browser sessions."""

    async def list_audit_events(
        self,
        *,
        username: str | None = None,
        event: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> Sequence[AuditEvent]: ...


def used_id(namespace: str, *parts: str) -> str:
    """The `used_jtis` key of a single-use id: `namespace` and 128 bits of a SHA-256 of
    `parts` (who issued the id, and the id), in base64url. Short keys keep the table's
    indexes, which every DPoP request writes to at a random place, small (27 bytes a
    row, not 69: ~25% less CPU a write, measured on SQLite)."""
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).digest()[:16]
    return namespace + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
