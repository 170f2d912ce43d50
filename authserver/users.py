"""Users: who may have an account, and every change to one.

The CLI (and any later HTTP route) calls `UserService`; the store only stores.
Each change is one transaction with its audit event, and one rule holds for all
of them: **a password change or a disable ends every session of the user**, the
ones already open (their refresh families are revoked in the same transaction)
and one whose login is in flight (`may_begin_session` refuses a family begun
from a user row that has changed since the password was checked against it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import precis_i18n

from authserver import audit
from authserver.audit import Auditor, RequestContext
from authserver.password_policy import PasswordPolicy
from authserver.passwords import PasswordHasher
from authserver.store.protocol import Conflict, RefreshTransaction, Store, User

MAX_USERNAME_LENGTH = 150
USERNAME_RULE = (
    "1-150 characters, no spaces, letters of any script (RFC 8265 UsernameCaseMapped); "
    "case does not matter"
)
_USERNAMES = precis_i18n.get_profile("UsernameCaseMapped")

# The changes that end a user's sessions, and the reason their families record.
_ENDS_SESSIONS: dict[str, str] = {
    audit.PASSWORD_CHANGED: "password_changed",
    audit.USER_DISABLED: "user_disabled",
}


class UserError(Exception):
    """A user change that cannot be made; the message is one line for an operator."""


class InvalidUsernameError(UserError):
    pass


class UnknownUserError(UserError):
    pass


class UserExistsError(UserError):
    pass


def normalize_username(username: str) -> str | None:
    """The one spelling of a username (RFC 8265 §3.3 UsernameCaseMapped: NFC, then
    case-mapped, so `Alice` and `alice` are one account); None for a name the profile
    disallows or that is too long, which no account can have.

    https://www.rfc-editor.org/rfc/rfc8265#section-3.3
    """
    # A cheap bound first: the profile's work grows with the input.
    if not username or len(username) > 4 * MAX_USERNAME_LENGTH:
        return None
    try:
        name: str = _USERNAMES.enforce(username)
    except UnicodeError:
        return None
    return name if len(name) <= MAX_USERNAME_LENGTH else None


def validate_username(username: str) -> str:
    """The normalised name a new account gets, or `InvalidUsernameError`."""
    name = normalize_username(username)
    if name is None:
        raise InvalidUsernameError(f"invalid username {username[:40]!r}: use {USERNAME_RULE}")
    return name


def may_begin_session(checked: User, current: User | None) -> bool:
    """Whether a login whose password was checked against `checked` may begin a session,
    `current` being the same user's row as read (and held) in the session's transaction.

    Not if the user is gone or disabled, nor if the row changed at all in between:
    a password change or disable that ran meanwhile has already revoked every family
    there was, and one begun now from the old row would survive it.
    """
    return current is not None and not current.disabled and current.updated_at == checked.updated_at


class UserService:
    """Creates users, sets passwords, disables and enables; one instance per process."""

    def __init__(
        self,
        *,
        store: Store,
        hasher: PasswordHasher,
        auditor: Auditor,
        policy: PasswordPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.policy = policy or PasswordPolicy()
        self.hasher = hasher
        self.auditor = auditor
        self.clock = clock

    async def get(self, username: str) -> User | None:
        name = normalize_username(username)
        return await self.store.get_user(name) if name is not None else None

    async def list(self) -> Sequence[User]:
        return await self.store.list_users()

    async def create(
        self, ctx: RequestContext, username: str, password: str, **details: object
    ) -> User:
        """Add a user; `UserExistsError` if the name is taken, `PasswordPolicyError`
        if the password breaks the policy."""
        username = validate_username(username)
        self.policy.check(password, username=username)
        password_hash = await self.hasher.hash(password)
        now = self.clock()
        event = self.auditor.build(audit.USER_CREATED, ctx, username=username, **details)

        async def work(tx: RefreshTransaction) -> User:
            user = await tx.add_user(username, password_hash, at=now)
            await tx.add_audit_event(event)
            return user

        try:
            user = await self.store.atomic(work)
        except Conflict as exc:
            raise UserExistsError(f"user {username!r} already exists") from exc
        self.auditor.emit(event)
        return user

    async def set_password(self, ctx: RequestContext, username: str, password: str) -> None:
        """Give a user a new password, ending every session begun with the old one."""
        self.policy.check(password, username=normalize_username(username) or username)
        password_hash = await self.hasher.hash(password)
        await self._change(ctx, username, audit.PASSWORD_CHANGED, password_hash=password_hash)

    async def set_disabled(self, ctx: RequestContext, username: str, disabled: bool) -> None:
        """Disable a user (ending every session) or enable one."""
        await self._change(
            ctx,
            username,
            audit.USER_DISABLED if disabled else audit.USER_ENABLED,
            disabled=disabled,
        )

    async def _change(
        self,
        ctx: RequestContext,
        username: str,
        event_name: str,
        *,
        password_hash: str | None = None,
        disabled: bool | None = None,
    ) -> None:
        now = self.clock()
        name = normalize_username(username)
        event = self.auditor.build(event_name, ctx, username=name)
        ends_sessions = _ENDS_SESSIONS.get(event_name)

        async def work(tx: RefreshTransaction) -> bool:
            user = await tx.get_user(name) if name is not None else None
            if user is None:
                return False
            # The row is updated first: a login holding it (see `may_begin_session`)
            # finishes before this goes on, and its family is revoked below with the rest.
            await tx.update_user(user.id, at=now, password_hash=password_hash, disabled=disabled)
            if ends_sessions is not None:
                await tx.revoke_user_families(user.id, at=now, reason=ends_sessions)
            await tx.add_audit_event(event)
            return True

        if not await self.store.atomic(work):
            raise UnknownUserError(f"unknown user {username!r}")
        self.auditor.emit(event)
