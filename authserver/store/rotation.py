"""The rotation's rules as SQL, built once from the schema for both refresh paths.

The general path (`SqlTransaction`, driven by `refresh.py`) and the one-step
fast path (`fastpath.py`) run these same expressions, so when a stored token may
be exchanged, how it is spent and how long its successor lives are stated here
alone, and the two paths cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from authserver.store.schema import (
    BUILTIN_CLIENT_ID,
    Time,
    clients,
    refresh_families,
    refresh_tokens,
    users,
)

_t, _f, _u, _c = refresh_tokens.c, refresh_families.c, users.c, clients.c

# A token with its family and its user: what every rule below reads.
TOKEN_FAMILY_USER = refresh_tokens.join(refresh_families, _f.id == _t.family_id).join(
    users, _u.id == _f.user_id
)


def _client_may_present(client: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """RFC 6749 §6: only the client a token was issued to may exchange it. `client` is
    the authenticated client's id, or NULL where a request names none (the seed's
    /refresh), which any public client may send: the built-in one, or a registered,
    enabled public client."""
    public = sa.exists().where(_c.client_id == _f.client_id, _c.public)
    return sa.or_(
        sa.and_(client.is_not(None), _f.client_id == client),
        sa.and_(client.is_(None), sa.or_(_f.client_id == BUILTIN_CLIENT_ID, public)),
    )


def _issued_to_a_live_client() -> sa.ColumnElement[bool]:
    """The token's client still exists and is enabled (the built-in one always is): a
    disabled or removed client's refresh tokens are refused, whoever presents them."""
    enabled = sa.exists().where(_c.client_id == _f.client_id, sa.not_(_c.disabled))
    return sa.or_(_f.client_id == BUILTIN_CLIENT_ID, enabled)


def _proves_the_family_key(jkt: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """RFC 9449 §5: a family bound to a DPoP key may be refreshed only with a proof signed
    by that key; `jkt` is the thumbprint of the request's proof key, NULL without one.

    A token the family issued before it was bound (at a refresh) is not bound: replayed
    spent, by whoever holds a copy, it must meet reuse detection, not a refusal that
    leaves the session to a thief who bound it to their own key first."""
    return sa.or_(
        _f.dpop_jkt.is_(None),
        # Not NULL: a family bound by a release before `dpop_bound_at` is bound throughout.
        sa.and_(_f.dpop_bound_at.is_not(None), _t.created_at < _f.dpop_bound_at),
        sa.and_(jkt.is_not(None), _f.dpop_jkt == jkt),
    )


def binds_nothing(bind: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """The exchange leaves the family's binding as it is: `bind` (the key a public
    client's proof would bind an unbound family to, NULL for none) is NULL, or the family
    is bound already. Binding is the general path's (`refresh._Rotation`), in the
    rotation's own transaction; the one step declines such an exchange."""
    return sa.or_(bind.is_(None), _f.dpop_jkt.is_not(None))


def refusal(
    now: sa.ColumnElement[float],
    client: sa.ColumnElement[Any],
    jkt: sa.ColumnElement[Any],
) -> sa.ColumnElement[str | None]:
    """Why the token (over `TOKEN_FAMILY_USER`) cannot be exchanged at `now` by `client`
    (see `_client_may_present`) proving possession of the DPoP key `jkt`: one of
    `protocol.TokenRefusal`, in this order of precedence. Another client's request comes
    first, then a request without the family's DPoP key: neither learns anything of the
    token, and neither spends nor revokes anything (a thief holding a copy of a bound
    token, spent or not, cannot even end the session).

    NULL for an active token that can, and for a spent one, whose fate (the grace
    window or reuse detection, RFC 6819 §5.2.2.3) depends on more than its own row.
    """
    return sa.case(
        (sa.not_(_client_may_present(client)), "wrong_client"),
        (sa.not_(_proves_the_family_key(jkt)), "dpop_key"),
        (sa.not_(_issued_to_a_live_client()), "client_disabled"),
        (_f.revoked_at.is_not(None), "revoked"),
        (_u.disabled, "user_disabled"),
        (_f.expires_at <= now, "session_expired"),  # the session's maximum age
        (sa.and_(_t.status == "active", _t.expires_at <= now), "expired"),  # idle too long
        (_t.status == "revoked", "revoked"),
        else_=sa.null(),
    )


# The requesting client: see `_client_may_present`.
CLIENT = sa.bindparam("b_client", type_=sa.String)
# The thumbprint of the request's DPoP proof key: see `_proves_the_family_key`.
DPOP_KEY = sa.bindparam("b_jkt", type_=sa.String)
# The key an unbound family would be bound to: see `binds_nothing`.
BIND_KEY = sa.bindparam("b_bind", type_=sa.String)


def spend(
    *,
    token_hash: sa.ColumnElement[str],
    expected: sa.ColumnElement[str],
    successor_hash: sa.ColumnElement[str],
    at: sa.ColumnElement[float],
) -> sa.Update:
    """Compare-and-set: spend the token only if it is still in the `expected` state, so
    of concurrent exchanges of one token exactly one wins."""
    return (
        refresh_tokens.update()
        .where(_t.token_hash == token_hash, _t.status == expected)
        .values(status="spent", successor_hash=successor_hash, spent_at=at)
    )


# `spend` with every value a parameter.
SPEND = spend(
    token_hash=sa.bindparam("b_hash", type_=sa.String),
    expected=sa.bindparam("b_expected", type_=sa.String),
    successor_hash=sa.bindparam("b_successor", type_=sa.String),
    at=sa.bindparam("b_at", type_=Time),
)


def issue(
    *,
    token_hash: sa.ColumnElement[str],
    family_id: sa.ColumnElement[str],
    parent_hash: sa.ColumnElement[str | None],
    scope: sa.ColumnElement[str],
    now: sa.ColumnElement[float],
    refresh_ttl: sa.ColumnElement[int],
) -> sa.Insert:
    """INSERT ... SELECT of an active token into the family `family_id`.

    It lives `refresh_ttl` seconds (the idle lifetime, renewed by each rotation) but
    never past the family's end (the session's maximum age), read from the family row.
    """
    idle_end = now + refresh_ttl
    expires_at = sa.case((idle_end < _f.expires_at, idle_end), else_=_f.expires_at)
    rows = sa.select(
        token_hash, _f.id, parent_hash, sa.literal("active"), scope, now, expires_at
    ).where(_f.id == family_id)
    columns = ["token_hash", "family_id", "parent_hash", "status", "scope"]
    return refresh_tokens.insert().from_select([*columns, "created_at", "expires_at"], rows)


# `issue` with every value a parameter: a family's first token, and a successor on the
# general path.
ISSUE = issue(
    token_hash=sa.bindparam("b_token", type_=sa.String),
    family_id=sa.bindparam("b_family", type_=sa.String),
    parent_hash=sa.bindparam("b_parent", type_=sa.String),
    scope=sa.bindparam("b_scope", type_=sa.Text),
    now=sa.bindparam("b_now", type_=Time),
    refresh_ttl=sa.bindparam("b_ttl", type_=sa.Integer),
)
