"""POST /refresh: rotation, reuse detection, lifetimes and the grace window (RFC 9700 §4.14.2)."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from authserver import audit
from authserver.audit import RequestContext
from authserver.refresh import digest
from authserver.store.schema import refresh_families, refresh_tokens
from authserver.store.sql import SqlStore
from tests.helpers.app import Running, StartApp, family_of, refresh, rotate, set_clock
from tests.helpers.factories import make_user
from tests.helpers.tokens import TOKEN_FIELDS, assert_invalid_grant, assert_no_store, jwt_parts


async def test_rotation_issues_a_new_pair_and_spends_the_old_token(server: Running) -> None:
    login = await server.login()
    r = await refresh(server, login["refresh_token"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == TOKEN_FIELDS
    assert body["token_type"] == "bearer"
    assert body["scope"] == "read write"
    assert body["refresh_token"] != login["refresh_token"]
    assert jwt_parts(body["access_token"])[1]["jti"] != jwt_parts(login["access_token"])[1]["jti"]
    assert_no_store(r)
    protected = await server.client.get(
        "/protected", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert protected.status_code == 200

    family = await family_of(server, login["refresh_token"])
    assert family["statuses"] == Counter({"spent": 1, "active": 1})
    assert family["revoked_reason"] is None
    # Chained rotations keep working.
    token = body["refresh_token"]
    for _ in range(3):
        token = await rotate(server, token)
    assert (await family_of(server, token))["statuses"] == Counter({"spent": 4, "active": 1})


async def test_reuse_of_a_spent_token_revokes_the_whole_family(server: Running) -> None:
    other = await server.login()
    first = (await server.login())["refresh_token"]
    second = await rotate(server, first)

    assert_invalid_grant(await refresh(server, first), first)
    # The newest token, never used, died with the family.
    assert_invalid_grant(await refresh(server, second), second)
    family = await family_of(server, second)
    assert family["revoked_reason"] == "reuse"
    assert family["statuses"]["active"] == 0
    events = await server.store.list_audit_events(event=audit.REUSE_DETECTED)
    assert [e.details.get("family_id") for e in events] == [family["id"]]
    # Other sessions of the same user are not touched.
    assert (await refresh(server, other["refresh_token"])).status_code == 200


async def test_reuse_deep_in_a_chain(server: Running) -> None:
    chain = [(await server.login())["refresh_token"]]
    for _ in range(4):
        chain.append(await rotate(server, chain[-1]))
    assert_invalid_grant(await refresh(server, chain[1]), chain[1])
    for token in chain:
        assert_invalid_grant(await refresh(server, token), token)
    family = await family_of(server, chain[-1])
    assert family["revoked_reason"] == "reuse"
    assert family["statuses"]["active"] == 0


async def test_invalid_tokens_are_401_invalid_grant(server: Running) -> None:
    login = await server.login()
    candidates = [
        secrets.token_urlsafe(32),  # well-formed but never issued
        "garbage",
        "x" * 5000,
        login["access_token"],
        login["refresh_token"] + "x",
        login["refresh_token"][:-1],
        " " + login["refresh_token"],
    ]
    for token in candidates:
        assert_invalid_grant(await refresh(server, token), token)
    # None of that spent or revoked the real token.
    assert (await family_of(server, login["refresh_token"]))["statuses"] == Counter({"active": 1})
    assert (await refresh(server, login["refresh_token"])).status_code == 200


async def test_disabled_user_cannot_refresh(server: Running) -> None:
    token = (await server.login())["refresh_token"]
    users = server.app.state.services.users
    await users.set_disabled(RequestContext(), "alice", True)
    assert_invalid_grant(await refresh(server, token), token)
    await users.set_disabled(RequestContext(), "alice", False)


async def test_refresh_may_narrow_the_scope(server: Running) -> None:
    login = await server.login()
    r = await refresh(server, login["refresh_token"], scope="read")
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == "read"
    assert jwt_parts(r.json()["access_token"])[1]["scope"] == "read"
    # RFC 6749 §6: the new refresh token keeps the scope of the one presented.
    r = await refresh(server, r.json()["refresh_token"])
    assert r.status_code == 200
    assert r.json()["scope"] == "read write"


async def test_refresh_may_not_widen_the_scope_and_the_token_survives(server: Running) -> None:
    login = await server.login(scope="read")
    token = login["refresh_token"]
    for scope in ("read write", "write", "admin", "read admin"):
        r = await refresh(server, token, scope=scope)
        assert r.status_code == 400, scope
        assert r.json()["error"] == "invalid_scope"
        assert token not in r.text
    family = await family_of(server, token)
    assert family["statuses"] == Counter({"active": 1})
    assert family["revoked_reason"] is None
    r = await refresh(server, token)
    assert r.status_code == 200
    assert r.json()["scope"] == "read"


async def test_idle_lifetime_from_the_environment(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTHSERVER_REFRESH_TOKEN_TTL", "60")
    running = await start_app()
    assert running.settings.refresh_token_ttl == 60
    await make_user(running.store, "alice")
    clock = set_clock(running)
    t0 = clock.now
    token = (await running.login())["refresh_token"]
    clock.now = t0 + 50
    token = await rotate(running, token)
    # Idle, not absolute: each rotation starts a new 60 s.
    clock.now = t0 + 100
    token = await rotate(running, token)
    clock.now = t0 + 161
    assert_invalid_grant(await refresh(running, token), token)
    assert "expired" in (await refresh(running, token)).json()["error_description"]


async def test_session_max_age_from_the_environment(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTHSERVER_REFRESH_TOKEN_TTL", "60")
    monkeypatch.setenv("AUTHSERVER_SESSION_MAX_AGE", "100")
    running = await start_app()
    assert running.settings.session_max_age == 100
    await make_user(running.store, "alice")
    clock = set_clock(running)
    t0 = clock.now
    token = (await running.login())["refresh_token"]
    clock.now = t0 + 50
    token = await rotate(running, token)
    clock.now = t0 + 99
    token = await rotate(running, token)
    # Used one second ago, but the session is 100 s old.
    clock.now = t0 + 100
    assert_invalid_grant(await refresh(running, token), token)
    # A new login starts a new session.
    assert (await running.login())["refresh_token"]


async def test_grace_window_lets_the_previous_token_be_retried(start_app: StartApp) -> None:
    running = await start_app(refresh_reuse_grace=5)
    await make_user(running.store, "alice")
    clock = set_clock(running)
    t0 = clock.now
    first = (await running.login())["refresh_token"]
    lost = await rotate(running, first)  # the client never saw this response

    clock.now = t0 + 2
    retry = await refresh(running, first)
    assert retry.status_code == 200, retry.text
    fresh = retry.json()["refresh_token"]
    assert fresh not in (first, lost)
    family = await family_of(running, fresh)
    assert family["statuses"]["active"] == 1
    assert family["revoked_reason"] is None

    # The successor it was first exchanged for is gone, without killing the family.
    assert_invalid_grant(await refresh(running, lost), lost)
    assert (await family_of(running, fresh))["revoked_reason"] is None

    # Still within the window, a second retry replaces the fresh token in turn.
    clock.now = t0 + 4
    again = await rotate(running, first)
    assert (await family_of(running, again))["statuses"]["active"] == 1
    assert_invalid_grant(await refresh(running, fresh), fresh)
    assert (await refresh(running, again)).status_code == 200


async def test_grace_window_does_not_cover_older_tokens(start_app: StartApp) -> None:
    running = await start_app(refresh_reuse_grace=5)
    await make_user(running.store, "alice")
    clock = set_clock(running)
    first = (await running.login())["refresh_token"]
    second = await rotate(running, first)
    third = await rotate(running, second)
    clock.now += 1
    # Two back is reuse, even within the window.
    assert_invalid_grant(await refresh(running, first), first)
    assert_invalid_grant(await refresh(running, third), third)
    assert (await family_of(running, third))["revoked_reason"] == "reuse"


async def test_after_the_grace_window_a_retry_is_reuse(start_app: StartApp) -> None:
    running = await start_app(refresh_reuse_grace=5)
    await make_user(running.store, "alice")
    clock = set_clock(running)
    first = (await running.login())["refresh_token"]
    second = await rotate(running, first)
    clock.now += 5
    assert_invalid_grant(await refresh(running, first), first)
    assert_invalid_grant(await refresh(running, second), second)
    assert (await family_of(running, second))["revoked_reason"] == "reuse"


async def test_without_grace_an_immediate_retry_is_reuse(server: Running) -> None:
    first = (await server.login())["refresh_token"]
    second = await rotate(server, first)
    assert_invalid_grant(await refresh(server, first), first)
    assert (await family_of(server, second))["revoked_reason"] == "reuse"


async def test_concurrent_refreshes_with_one_token_have_one_winner(server: Running) -> None:
    token = (await server.login())["refresh_token"]
    responses = await asyncio.gather(*(refresh(server, token) for _ in range(50)))
    statuses = Counter(r.status_code for r in responses)
    assert statuses[200] == 1, statuses
    assert all(r.status_code < 500 for r in responses), statuses
    for r in responses:
        if r.status_code != 200:
            assert r.status_code == 401, r.text
            assert r.json()["error"] == "invalid_grant"
    # Exactly one successor was ever minted: no double spend.
    family = await family_of(server, token)
    assert sum(family["statuses"].values()) == 2


async def _rotation_rows(running: Running, old: str, new: str) -> dict[str, Any]:
    """What one exchange stored, with the values that differ per exchange normalised."""
    store = running.store
    assert isinstance(store, SqlStore)
    async with store.engine.connect() as conn:
        spent = (
            await conn.execute(
                sa.select(refresh_tokens).where(refresh_tokens.c.token_hash == digest(old))
            )
        ).one()
        issued = (
            await conn.execute(
                sa.select(refresh_tokens).where(refresh_tokens.c.token_hash == digest(new))
            )
        ).one()
        family = (
            await conn.execute(
                sa.select(refresh_families).where(refresh_families.c.id == spent.family_id)
            )
        ).one()
    events = [
        e
        for e in await store.list_audit_events(event=audit.REFRESHED)
        if e.details.get("family_id") == family.id
    ]
    assert len(events) == 1, events
    (event,) = events
    return {
        "spent": (spent.status, spent.successor_hash == issued.token_hash),
        "issued": (
            issued.status,
            issued.family_id == family.id,
            issued.parent_hash == spent.token_hash,
            issued.successor_hash,
            issued.spent_at,
            issued.scope,
            issued.created_at == spent.spent_at,
            round(issued.expires_at - issued.created_at, 3),
        ),
        "event": (
            event.username,
            event.client_addr,
            event.request_id,
            event.details == {"family_id": family.id},
        ),
    }


@pytest.mark.parametrize("max_age", [1_000_000, 100])
async def test_one_step_and_general_rotation_store_the_same_rows(
    start_app: StartApp, max_age: int
) -> None:
    """The plain exchange runs as one step on the driver; asking for a scope takes the
    general path. Both must leave exactly the same rows behind (the successor's life
    capped by the session's end when that comes first)."""
    running = await start_app(refresh_token_ttl=600, session_max_age=max_age)
    await make_user(running.store, "alice")
    clock = set_clock(running)
    rows = []
    for extra in ({}, {"scope": "read write"}):
        clock.now += 1
        old = (await running.login())["refresh_token"]
        clock.now += 10
        r = await running.client.post(
            "/refresh",
            json={"refresh_token": old, **extra},
            headers={"X-Request-ID": "same-request-id"},
        )
        assert r.status_code == 200, r.text
        rows.append(await _rotation_rows(running, old, r.json()["refresh_token"]))
    assert rows[0] == rows[1]
    expected_life = 600 if max_age > 600 else max_age - 10
    assert rows[0]["issued"][-1] == expected_life
    assert rows[0]["issued"][:6] == ("active", True, True, None, None, "read write")
