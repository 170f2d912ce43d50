"""Self-service sessions (GET/DELETE /sessions) and `authserver sessions`, on both databases."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from authserver import audit
from authserver.config import Settings
from authserver.store.migrate import upgrade_async
from authserver.store.schema import refresh_families, users
from authserver.store.sql import SqlStore
from tests.helpers.app import Running, StartApp, refresh, set_clock
from tests.helpers.cli import ainvoke, assert_ok, assert_operator_error, cli_env
from tests.helpers.databases import SQLITE_ONLY
from tests.helpers.factories import DEFAULT_PASSWORD, make_client, make_user
from tests.helpers.tokens import assert_invalid_grant, jwt_parts

SESSION_FIELDS = {
    "id",
    "client_id",
    "created_at",
    "last_used_at",
    "expires_at",
    "ip",
    "user_agent",
    "current",
}


async def login(server: Running, user: str = "alice", agent: str = "test-agent/1") -> Any:
    r = await server.client.post(
        "/login",
        json={"username": user, "password": DEFAULT_PASSWORD},
        headers={"User-Agent": agent},
    )
    assert r.status_code == 200, r.text
    return r.json()


def bearer(pair: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {pair['access_token']}"}


async def sessions(server: Running, pair: dict[str, Any]) -> list[dict[str, Any]]:
    r = await server.client.get("/sessions", headers=bearer(pair))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body: list[dict[str, Any]] = r.json()["sessions"]
    return body


def sid(pair: dict[str, Any]) -> str:
    value: str = jwt_parts(pair["access_token"])[1]["sid"]
    return value


async def test_list_shows_each_live_session_with_its_origin(server: Running) -> None:
    clock = set_clock(server)
    start = clock.now
    phone = await login(server, agent="phone-app/2.0")
    clock.now += 1
    laptop = await login(server, agent="x" * 1000)
    await make_user(server.store, "bob")
    await login(server, "bob")
    clock.now += 30
    used = clock.now
    phone = (await refresh(server, phone["refresh_token"])).json()

    listed = await sessions(server, laptop)
    assert [s["id"] for s in listed] == [sid(phone), sid(laptop)]  # bob's are not there
    assert all(set(s) == SESSION_FIELDS for s in listed)
    first, second = listed
    assert (first["current"], second["current"]) == (False, True)
    assert first["client_id"] == "authserver"
    assert first["ip"] == "127.0.0.1"  # the address the throttle counts
    assert first["user_agent"] == "phone-app/2.0"
    assert second["user_agent"] == "x" * 256  # bounded
    # The rotation is a use; the login was the other session's last one.
    assert first["created_at"] == int(start)
    assert first["last_used_at"] == int(used)
    assert second["last_used_at"] == second["created_at"] == int(start + 1)
    assert first["expires_at"] == int(used + server.settings.refresh_token_ttl)
    # From the refreshed session's new token, it is that one that is current.
    assert [s["current"] for s in await sessions(server, phone)] == [True, False]
    # A narrowed scope takes the general rotation path, which marks the use too.
    clock.now += 5
    laptop = (await refresh(server, laptop["refresh_token"], scope="read")).json()
    assert (await sessions(server, phone))[1]["last_used_at"] == int(clock.now)


async def test_ending_one_session_refuses_its_refresh_token_everywhere(
    server: Running, start_app: StartApp
) -> None:
    # A second app on the same database: another process, as far as the store goes.
    other_process = await start_app()
    mine, stolen = await login(server), await login(server)
    r = await other_process.client.delete(f"/sessions/{sid(stolen)}", headers=bearer(mine))
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert_invalid_grant(await refresh(server, stolen["refresh_token"]), stolen["refresh_token"])
    # Introspection calls its access token inactive at once (it checks the sid).
    _, secret = await make_client(server.store, "api")
    assert secret is not None
    for token, active in ((stolen["access_token"], False), (mine["access_token"], True)):
        r = await server.client.post("/introspect", data={"token": token}, auth=("api", secret))
        assert r.json()["active"] is active, r.text
    assert [s["id"] for s in await sessions(server, mine)] == [sid(mine)]
    # Ended once: the same id again is a session that is not live.
    again = await server.client.delete(f"/sessions/{sid(stolen)}", headers=bearer(mine))
    assert again.status_code == 404
    (event,) = await server.store.list_audit_events(event=audit.SESSION_ENDED)
    assert event.username == "alice"
    assert event.details["family_id"] == sid(stolen)
    assert event.details["by"] == "user"
    assert event.details["from_session"] == sid(mine)
    # The ended session's access token still verifies, but may not manage what is left.
    r = await server.client.get("/sessions", headers=bearer(stolen))
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    r = await server.client.delete("/sessions", headers=bearer(stolen))
    assert r.status_code == 401
    assert (await refresh(server, mine["refresh_token"])).status_code == 200


async def test_another_users_session_is_404_and_stays(server: Running) -> None:
    await make_user(server.store, "bob")
    alice, bob = await login(server), await login(server, "bob")
    for session_id in (sid(bob), "00000000-0000-0000-0000-000000000000", "x" * 300):
        r = await server.client.delete(f"/sessions/{session_id}", headers=bearer(alice))
        assert r.status_code == 404, r.text
        assert r.json()["error"] == "invalid_request"
    assert (await refresh(server, bob["refresh_token"])).status_code == 200
    assert await server.store.list_audit_events(event=audit.SESSION_ENDED) == []


async def test_end_every_other_session(server: Running) -> None:
    current, others = await login(server), [await login(server) for _ in range(3)]
    await make_user(server.store, "bob")
    bob = await login(server, "bob")
    r = await server.client.delete("/sessions", headers=bearer(current))
    assert r.status_code == 204, r.text
    for pair in others:
        assert_invalid_grant(await refresh(server, pair["refresh_token"]), pair["refresh_token"])
    events = await server.store.list_audit_events(event=audit.SESSION_ENDED)
    assert sorted(e.details["family_id"] for e in events) == sorted(sid(p) for p in others)
    assert (await refresh(server, bob["refresh_token"])).status_code == 200
    current = (await refresh(server, current["refresh_token"])).json()
    assert [s["current"] for s in await sessions(server, current)] == [True]
    # Nothing left to end: still 204, and no event.
    r = await server.client.delete("/sessions", headers=bearer(current))
    assert r.status_code == 204
    assert len(await server.store.list_audit_events(event=audit.SESSION_ENDED)) == 3


async def test_only_a_users_token_may_call(server: Running) -> None:
    _, secret = await make_client(server.store, "worker")
    assert secret is not None
    token = await server.client.post(
        "/token", data={"grant_type": "client_credentials"}, auth=("worker", secret)
    )
    assert token.status_code == 200, token.text
    for method, path in (("GET", "/sessions"), ("DELETE", "/sessions"), ("DELETE", "/sessions/x")):
        r = await server.client.request(method, path, headers=bearer(token.json()))
        assert r.status_code == 403, r.text
        assert r.json()["error"] == "insufficient_scope"
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        none = await server.client.request(method, path)
        assert none.status_code == 401
        assert none.headers["www-authenticate"] == "Bearer"
        bad = await server.client.request(method, path, headers={"Authorization": "Bearer x.y.z"})
        assert bad.status_code == 401
        assert 'error="invalid_token"' in bad.headers["www-authenticate"]


async def test_cli_lists_and_ends_sessions(server: Running, database_url: str) -> None:
    env = cli_env(database_url, server.settings.keys_dir)
    await make_user(server.store, "bob")
    first, second, bob = await login(server), await login(server), await login(server, "bob")

    listed = await ainvoke(env, "sessions", "list", "Alice")
    assert_ok(listed)
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "CLIENT", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == [sid(first), sid(second)]
    assert "127.0.0.1" in lines[1] and "test-agent/1" in lines[1]

    ended = await ainvoke(env, "sessions", "revoke", sid(first))
    assert_ok(ended)
    assert ended.stdout == f"ended session {sid(first)} of alice\n"
    assert_invalid_grant(await refresh(server, first["refresh_token"]), first["refresh_token"])
    assert_operator_error(await ainvoke(env, "sessions", "revoke", sid(first)), "no live session")

    all_of_alice = await ainvoke(env, "sessions", "revoke", "--user", "alice")
    assert_ok(all_of_alice)
    assert all_of_alice.stdout == "ended 1 session of alice\n"
    assert_invalid_grant(await refresh(server, second["refresh_token"]), second["refresh_token"])
    assert (await refresh(server, bob["refresh_token"])).status_code == 200
    events = await server.store.list_audit_events(event=audit.SESSION_ENDED)
    assert [(e.details["by"], e.client_addr) for e in events] == [("operator", "cli")] * 2

    assert_operator_error(await ainvoke(env, "sessions", "list", "nobody"), "unknown user")
    assert_operator_error(await ainvoke(env, "sessions", "revoke", "--user", "nobody"), "unknown")
    assert_operator_error(await ainvoke(env, "sessions", "revoke"), "--user")
    both = await ainvoke(env, "sessions", "revoke", sid(second), "--user", "alice")
    assert_operator_error(both, "one of them")


@SQLITE_ONLY
async def test_sessions_from_before_the_migration_are_listed(database_url: str) -> None:
    store = SqlStore.from_settings(Settings(database_url=database_url))
    try:
        await upgrade_async(store.engine, "0003")
        now = time.time()
        async with store.engine.begin() as conn:
            await conn.execute(
                users.insert().values(
                    id=1,
                    username="alice",
                    password_hash="x",
                    disabled=False,
                    created_at=now,
                    updated_at=now,
                )
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO refresh_families (id, user_id, client_id, created_at, expires_at)"
                    " VALUES ('old', 1, 'authserver', :now, :end)"
                ),
                {"now": now, "end": now + 3600},
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO refresh_tokens (token_hash, family_id, status, scope, created_at,"
                    " expires_at) VALUES ('h', 'old', 'active', 'read', :now, :end)"
                ),
                {"now": now, "end": now + 60},
            )
        await upgrade_async(store.engine)
        (old,) = await store.live_sessions(now=time.time(), username="alice")
        assert (old.id, old.ip, old.user_agent, old.last_used_at) == ("old", None, None, now)
        async with store.engine.connect() as conn:
            columns = (await conn.execute(sa.select(refresh_families))).keys()
        assert {"ip", "user_agent"} <= set(columns)
    finally:
        await store.close()
