"""The two refresh paths, held equal: every outcome of a rotation, on SQLite and PostgreSQL.

A plain exchange runs as the store's one step on the raw driver (`store/fastpath.py`);
everything else is decided by the general path (`refresh._Rotation.decide`). Each case
below arranges the same stored state on an empty database three times and presents a
token: through `refresh.rotate` as the server calls it (the one step first), through the
general path alone (`fast_path=False`), and to the store's one step itself
(`Store.rotate_active`). The first two must give the same outcome and leave exactly the
same rows behind; the one step must take exactly the plain cases, and change nothing
when it declines.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa

from authserver import audit
from authserver.audit import Auditor, RequestContext
from authserver.refresh import (
    Issued,
    Lifetimes,
    Refusal,
    Refused,
    digest,
    revoke_family,
    rotate,
    start_family,
)
from authserver.store.protocol import Rotated
from authserver.store.schema import (
    audit_events,
    clients,
    refresh_families,
    refresh_tokens,
    users,
)
from authserver.store.sql import SqlStore
from tests.helpers.app import StartApp
from tests.helpers.factories import make_client, make_user

CTX = RequestContext(client_addr="203.0.113.7", request_id="rotation-request")
GRANTED = "read write"
TTL = 600
PLAIN = Lifetimes(refresh_ttl=TTL, session_max_age=86_400, reuse_grace=0)
SHORT_SESSION = Lifetimes(refresh_ttl=TTL, session_max_age=100, reuse_grace=0)
GRACE = Lifetimes(refresh_ttl=TTL, session_max_age=86_400, reuse_grace=5)
# RFC 7638 thumbprints of two DPoP keys (any distinct values do for the store).
KEY = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
OTHER_KEY = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    """One arrangement: a store, a clock the audit trail shares, and what was handed out."""

    store: SqlStore
    lifetimes: Lifetimes
    clock: Clock
    client: str | None  # the client presenting the token (None: the request names none)
    issued_to: str  # the client of every family it logs in
    bound_to: str | None = None  # the DPoP key of every family it logs in
    proof_key: str | None = None  # the DPoP key the presenting request proves
    bind: bool = False  # the presenting request may bind an unbound family to its key
    tokens: list[str] = field(default_factory=list)  # in the order they were issued
    families: list[str] = field(default_factory=list)
    user_ids: dict[int, str] = field(default_factory=dict)

    @property
    def auditor(self) -> Auditor:
        return Auditor(self.store, clock=self.clock)

    async def login(self) -> str:
        user = await self.store.get_user("alice")
        assert user is not None
        issued = await start_family(
            self.store,
            self.auditor,
            CTX,
            user=user,
            scope=GRANTED,
            client_id=self.issued_to,
            lifetimes=self.lifetimes,
            now=self.clock.now,
            dpop_jkt=self.bound_to,
        )
        assert issued is not None
        self.families.append(issued.family_id)
        self.tokens.append(issued.refresh_token)
        return issued.refresh_token

    async def rotate(
        self,
        token: str,
        *,
        fast_path: bool = True,
        owner: bool = False,
        binding: str | None = None,
        **kw: Any,
    ) -> Issued | Refused:
        """Present `token` as the case's client with its proof, or (`owner`) as the one it
        was issued to, with the key its family is bound to, or `binding` (a public
        client's proof, which binds an unbound family)."""
        outcome = await rotate(
            self.store,
            self.auditor,
            CTX,
            token=token,
            lifetimes=self.lifetimes,
            now=self.clock.now,
            fast_path=fast_path,
            client_id=self.issued_to if owner else self.client,
            dpop_jkt=binding or (self.bound_to if owner else self.proof_key),
            bind=binding is not None if owner else self.bind,
            **kw,
        )
        if isinstance(outcome, Issued):
            self.tokens.append(outcome.refresh_token)
        return outcome

    async def rotated(self, token: str) -> str:
        outcome = await self.rotate(token, owner=True)
        assert isinstance(outcome, Issued), outcome
        return outcome.refresh_token

    def label(self, value: Any) -> Any:
        """A random value (token digest, family id) named by when it was handed out."""
        names = {digest(t): f"token{i}" for i, t in enumerate(self.tokens)}
        names.update({f: f"family{i}" for i, f in enumerate(self.families)})
        return names.get(value, value)

    def outcome(self, outcome: Issued | Refused | Rotated) -> tuple[Any, ...]:
        if isinstance(outcome, Refused):
            return ("refused", outcome.reason, outcome.username, self.label(outcome.family_id))
        issued = (self.label(outcome.family_id), outcome.username, outcome.client_id)
        if isinstance(outcome, Rotated):
            return ("issued", *issued, outcome.scope)
        token = self.label(digest(outcome.refresh_token))
        return ("issued", *issued, outcome.granted_scope, token)

    async def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every stored token, family and audit event, random values named by `label`."""
        async with self.store.engine.connect() as conn:
            tokens = (await conn.execute(sa.select(refresh_tokens))).all()
            families = (await conn.execute(sa.select(refresh_families))).all()
            events = (await conn.execute(sa.select(audit_events).order_by(audit_events.c.id))).all()
        label = self.label

        def details(text: str) -> str:
            for i, family_id in enumerate(self.families):
                text = text.replace(family_id, f"family{i}")
            return text

        return {
            "tokens": sorted(
                (
                    label(t.token_hash),
                    label(t.family_id),
                    label(t.parent_hash),
                    label(t.successor_hash),
                    t.status,
                    t.scope,
                    t.created_at,
                    t.expires_at,
                    t.spent_at,
                )
                for t in tokens
            ),
            "families": sorted(
                (
                    label(f.id),
                    self.user_ids[f.user_id],
                    f.client_id,
                    f.created_at,
                    f.expires_at,
                    f.revoked_at,
                    f.revoked_reason,
                    f.dpop_jkt,
                    f.dpop_bound_at,
                )
                for f in families
            ),
            # In the order written; the autoincrement id itself differs per database.
            "events": [
                (e.at, e.event, e.username, e.client_addr, e.request_id, details(e.details))
                for e in events
            ],
        }


Arrange = Callable[[World], Awaitable[str]]


@dataclass(frozen=True)
class Case:
    arrange: Arrange  # builds the state and returns the token to present, at the clock's time
    expected: Refusal | None  # None: a successor is issued
    lifetimes: Lifetimes = PLAIN
    scope: frozenset[str] | None = None  # the scope the exchange asks for
    one_step: bool = False  # the store's one step takes this state
    successor_expires_in: float | None = None  # after the exchange, when one is issued
    client: str | None = "app"  # the client presenting the token; None: none is named
    issued_to: str = "app"  # the client the token's family was issued to
    # The registered clients, (id, public, disabled): by default the confidential "app".
    registered: tuple[tuple[str, bool, bool], ...] = (("app", False, False),)
    bound_to: str | None = None  # the DPoP key (thumbprint) the family is bound to
    proof_key: str | None = None  # the DPoP key the presenting request proves; None: no proof
    bind: bool = False  # a public client's request: its proof binds an unbound family


async def plain(world: World) -> str:
    token = await world.login()
    world.clock.now += 10
    return token


async def spent_then(world: World, later: float) -> str:
    first = await world.login()
    world.clock.now += 1
    await world.rotated(first)
    world.clock.now += later
    return first


async def revoked_family(world: World) -> str:
    token = await world.login()
    world.clock.now += 1
    await revoke_family(
        world.store,
        world.auditor,
        CTX,
        token=token,
        now=world.clock.now,
        event=audit.LOGGED_OUT,
        client_id=world.issued_to,
    )
    world.clock.now += 1
    return token


async def replaced_successor(world: World) -> str:
    """The successor a grace-window retry replaced: revoked, its family alive."""
    first = await world.login()
    world.clock.now += 1
    lost = await world.rotated(first)
    world.clock.now += 1
    await world.rotated(first)
    world.clock.now += 1
    return lost


async def idle(world: World) -> str:
    token = await world.login()
    world.clock.now += TTL
    return token


async def session_over(world: World) -> str:
    token = await world.login()
    world.clock.now += 50
    token = await world.rotated(token)
    world.clock.now += 50  # used 50 s ago, but the session is 100 s old
    return token


async def _set(world: World, statement: sa.Update) -> None:
    """Change one stored fact alone, so that a rule is tested by itself: the services
    that revoke or disable change more at once, and other rules would refuse too."""
    async with world.store.engine.begin() as conn:
        await conn.execute(statement)


async def disabled_user(world: World) -> str:
    token = await world.login()
    await _set(world, users.update().values(disabled=True))
    world.clock.now += 1
    return token


async def revoked_family_only(world: World) -> str:
    token = await world.login()
    await _set(
        world,
        refresh_families.update().values(revoked_at=world.clock.now, revoked_reason="logged_out"),
    )
    world.clock.now += 1
    return token


async def session_over_only(world: World) -> str:
    """A session that ends before its token's idle lifetime does."""
    token = await world.login()
    await _set(world, refresh_families.update().values(expires_at=world.clock.now + 5))
    world.clock.now += 10
    return token


async def bound_at_a_refresh(world: World, *, present_successor: bool = False) -> str:
    """A family begun without a proof, bound to KEY by its first refresh (a public
    client's, proved by KEY): its first token, spent before the binding, or the successor."""
    first = await world.login()
    world.clock.now += 1
    outcome = await world.rotate(first, owner=True, binding=KEY)
    assert isinstance(outcome, Issued), outcome
    world.clock.now += 1
    return outcome.refresh_token if present_successor else first


async def bound_by_an_older_release(world: World) -> str:
    """A bound family whose binding time was never written: bound throughout."""
    token = await world.login()
    await _set(world, refresh_families.update().values(dpop_bound_at=None))
    world.clock.now += 1
    return token


async def unknown(world: World) -> str:
    await world.login()
    world.tokens.append("never-issued")
    return "never-issued"


async def malformed(world: World) -> str:
    await world.login()
    return ""


CASES = {
    "active": Case(plain, None, one_step=True, successor_expires_in=TTL),
    "active, successor capped at the session's end": Case(
        plain, None, SHORT_SESSION, one_step=True, successor_expires_in=90
    ),
    "narrowed scope": Case(
        plain, None, scope=frozenset({"read"}), one_step=True, successor_expires_in=TTL
    ),
    "widened scope": Case(
        plain, Refusal.INVALID_SCOPE, scope=frozenset({"read", "admin"}), one_step=True
    ),
    "spent within the grace window": Case(
        lambda w: spent_then(w, 2), None, GRACE, successor_expires_in=TTL
    ),
    "spent within the grace window, widened scope": Case(
        lambda w: spent_then(w, 2), Refusal.INVALID_SCOPE, GRACE, scope=frozenset({"admin"})
    ),
    "spent after the grace window": Case(lambda w: spent_then(w, 5), Refusal.REUSE, GRACE),
    "spent, no grace window": Case(lambda w: spent_then(w, 1), Refusal.REUSE),
    "spent, past its idle lifetime": Case(lambda w: spent_then(w, TTL + 1), Refusal.REUSE),
    "revoked family": Case(revoked_family, Refusal.REVOKED),
    "revoked family, its token still active": Case(revoked_family_only, Refusal.REVOKED),
    "revoked token of a live family": Case(replaced_successor, Refusal.REVOKED, GRACE),
    "idle-expired": Case(idle, Refusal.EXPIRED),
    "session max age reached": Case(session_over, Refusal.SESSION_EXPIRED, SHORT_SESSION),
    "session max age reached, token unexpired": Case(session_over_only, Refusal.SESSION_EXPIRED),
    "disabled user": Case(disabled_user, Refusal.USER_DISABLED),
    "unknown token": Case(unknown, Refusal.UNKNOWN),
    "another client": Case(plain, Refusal.WRONG_CLIENT, client="other"),
    "another client, a spent token: no reuse detection": Case(
        lambda w: spent_then(w, 1), Refusal.WRONG_CLIENT, client="other"
    ),
    "another client, the token of a disabled user": Case(
        disabled_user, Refusal.WRONG_CLIENT, client="other"
    ),
    "no client named, the built-in client's token": Case(
        plain, None, one_step=True, successor_expires_in=TTL, client=None, issued_to="authserver"
    ),
    "no client named, a public client's token": Case(
        plain,
        None,
        one_step=True,
        successor_expires_in=TTL,
        client=None,
        registered=(("app", True, False),),
    ),
    "no client named, a confidential client's token": Case(
        plain, Refusal.WRONG_CLIENT, client=None, registered=(("app", False, False),)
    ),
    "no client named, a disabled public client's token": Case(
        plain, Refusal.CLIENT_DISABLED, client=None, registered=(("app", True, True),)
    ),
    "its own client, disabled": Case(
        plain, Refusal.CLIENT_DISABLED, registered=(("app", False, True),)
    ),
    "no client named, an unregistered client's token": Case(
        plain, Refusal.WRONG_CLIENT, client=None, registered=()
    ),
    "its own client, since removed": Case(plain, Refusal.CLIENT_DISABLED, registered=()),
    "malformed token": Case(malformed, Refusal.MALFORMED),
    # RFC 9449 §5: a family bound to a DPoP key; a request without it spends nothing.
    "DPoP-bound, proved by its key": Case(
        plain, None, one_step=True, successor_expires_in=TTL, bound_to=KEY, proof_key=KEY
    ),
    "DPoP-bound, no proof": Case(plain, Refusal.DPOP_KEY, bound_to=KEY),
    "DPoP-bound, proved by another key": Case(
        plain, Refusal.DPOP_KEY, bound_to=KEY, proof_key=OTHER_KEY
    ),
    "DPoP-bound, a spent token without the key: no reuse detection": Case(
        lambda w: spent_then(w, 1), Refusal.DPOP_KEY, bound_to=KEY
    ),
    "DPoP-bound, a spent token with the key: reuse": Case(
        lambda w: spent_then(w, 1), Refusal.REUSE, bound_to=KEY, proof_key=KEY
    ),
    "DPoP-bound, another client": Case(
        plain, Refusal.WRONG_CLIENT, client="other", bound_to=KEY, proof_key=KEY
    ),
    "DPoP-bound, revoked family, with the key": Case(
        revoked_family_only, Refusal.REVOKED, bound_to=KEY, proof_key=KEY
    ),
    "DPoP-bound, revoked family, without the key": Case(
        revoked_family_only, Refusal.DPOP_KEY, bound_to=KEY
    ),
    "unbound, with a proof": Case(
        plain, None, one_step=True, successor_expires_in=TTL, proof_key=KEY
    ),
    "DPoP-bound, no client named, a public client's token, no proof": Case(
        plain, Refusal.DPOP_KEY, client=None, registered=(("app", True, False),), bound_to=KEY
    ),
    "DPoP-bound by an older release, no proof": Case(
        bound_by_an_older_release, Refusal.DPOP_KEY, bound_to=KEY
    ),
    # A proof binds an unbound family (the general path's work: the one step declines).
    "unbound, with a proof that binds": Case(
        plain, None, successor_expires_in=TTL, proof_key=KEY, bind=True
    ),
    "bound, with a proof of its key that would bind": Case(
        plain,
        None,
        one_step=True,
        successor_expires_in=TTL,
        bound_to=KEY,
        proof_key=KEY,
        bind=True,
    ),
    "bound at a refresh, its successor without the key": Case(
        lambda w: bound_at_a_refresh(w, present_successor=True), Refusal.DPOP_KEY
    ),
    "bound at a refresh, a token from before, without the key: reuse": Case(
        bound_at_a_refresh, Refusal.REUSE
    ),
    "bound at a refresh, a token from before, with another key: reuse": Case(
        bound_at_a_refresh, Refusal.REUSE, proof_key=OTHER_KEY, bind=True
    ),
    "bound at a refresh, a token from before, within the grace window, without the key": Case(
        bound_at_a_refresh, Refusal.REUSE, GRACE
    ),
    "bound at a refresh, a token from before, within the grace window, with the key": Case(
        bound_at_a_refresh, None, GRACE, successor_expires_in=TTL, proof_key=KEY
    ),
}


async def _empty(store: SqlStore) -> None:
    async with store.engine.begin() as conn:
        for table in (audit_events, refresh_tokens, refresh_families, users, clients):
            await conn.execute(table.delete())


async def _arrange(store: SqlStore, case: Case, t0: float) -> tuple[World, str]:
    await _empty(store)
    world = World(
        store,
        case.lifetimes,
        Clock(t0),
        case.client,
        case.issued_to,
        bound_to=case.bound_to,
        proof_key=case.proof_key,
        bind=case.bind,
    )
    for client_id, public, disabled in case.registered:
        await make_client(store, client_id, public=public, disabled=disabled)
    user = await make_user(store, "alice")
    world.user_ids[user.id] = "alice"
    return world, await case.arrange(world)


@pytest.mark.parametrize("name", list(CASES))
async def test_both_paths_store_the_same(start_app: StartApp, name: str) -> None:
    case = CASES[name]
    running = await start_app()
    store = running.store
    assert isinstance(store, SqlStore)
    t0 = float(int(time.time()))

    general = await _exchange(store, case, t0, fast_path=False)
    fast_first = await _exchange(store, case, t0, fast_path=True)
    assert fast_first == general

    # No scope asked for, so that the one step may take it.
    world, token = await _arrange(store, case, t0)
    plain = await world.rotate(token, fast_path=False)
    expected = world.outcome(plain), await world.rows()
    await _one_step(store, case, t0, expected)


async def _exchange(
    store: SqlStore, case: Case, t0: float, *, fast_path: bool
) -> tuple[tuple[Any, ...], dict[str, list[tuple[Any, ...]]]]:
    """Arrange the case and present its token as the server does: the outcome and rows."""
    world, token = await _arrange(store, case, t0)
    outcome = await world.rotate(token, fast_path=fast_path, requested_scope=case.scope)
    rows = await world.rows()
    if case.expected is not None:
        assert isinstance(outcome, Refused), outcome
        assert outcome.reason is case.expected
        return world.outcome(outcome), rows
    assert isinstance(outcome, Issued), outcome
    assert outcome.granted_scope == GRANTED  # RFC 6749 §6: the token keeps its scope
    assert case.successor_expires_in is not None
    new = world.label(digest(outcome.refresh_token))
    (successor,) = (t for t in rows["tokens"] if t[0] == new)
    now = world.clock.now
    assert successor[2:] == (
        world.label(digest(token)),
        None,
        "active",
        GRANTED,
        now,
        now + case.successor_expires_in,
        None,
    )
    (family,) = (f for f in rows["families"] if f[0] == world.label(outcome.family_id))
    if case.bind and case.proof_key is not None and case.bound_to is None:
        # Bound from the successor on: the key, and the successor's `created_at`.
        assert family[-2:] == (case.proof_key, now)
    assert rows["events"][-1] == (
        now,
        audit.REFRESHED,
        "alice",
        CTX.client_addr,
        CTX.request_id,
        f'{{"family_id":"{world.label(outcome.family_id)}"}}',
    )
    return world.outcome(outcome), rows


async def _one_step(
    store: SqlStore,
    case: Case,
    t0: float,
    expected: tuple[tuple[Any, ...], dict[str, list[tuple[Any, ...]]]],
) -> None:
    """The store's one step takes the case if it is plain, as the general path would;
    anything else it declines, changing nothing."""
    world, token = await _arrange(store, case, t0)
    before = await world.rows()
    successor = "successor-of-" + token
    done = await store.rotate_active(
        token_hash=digest(token),
        successor_hash=digest(successor),
        now=world.clock.now,
        refresh_ttl=world.lifetimes.refresh_ttl,
        event=world.auditor.build(audit.REFRESHED, CTX),
        client_id=case.client,
        dpop_jkt=case.proof_key,
        bind=case.bind,
    )
    if not case.one_step:
        assert done is None
        assert await world.rows() == before
        return
    assert done is not None
    world.tokens.append(successor)
    outcome, rows = expected
    assert world.outcome(done) == outcome[:-1]  # all but the new token, named in `rows`
    assert await world.rows() == rows
