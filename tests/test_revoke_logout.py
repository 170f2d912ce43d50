"""POST /revoke (RFC 7009) and POST /logout: both end a refresh family."""

from __future__ import annotations

import asyncio
import secrets
import time

import httpx

from authserver import audit
from authserver.audit import RequestContext
from authserver.refresh import Issued, start_family
from authserver.store.protocol import User
from tests.helpers.app import Running, StartApp, family_of, refresh, rotate
from tests.helpers.factories import DEFAULT_PASSWORD, make_user
from tests.helpers.tokens import assert_invalid_grant


async def revoke(server: Running, **form: str) -> None:
    r = await server.client.post("/revoke", data=form)
    assert r.status_code == 200, r.text
    assert r.content == b""
    assert r.headers["cache-control"] == "no-store"


async def test_revoke_a_refresh_token_ends_its_family(server: Running) -> None:
    other = (await server.login())["refresh_token"]
    token = (await server.login())["refresh_token"]
    await revoke(server, token=token)
    assert_invalid_grant(await refresh(server, token), token)
    family = await family_of(server, token)
    assert family["revoked_reason"] == audit.REVOKED
    assert family["statuses"]["active"] == 0
    events = await server.store.list_audit_events(event=audit.REVOKED)
    assert [e.details["family_id"] for e in events] == [family["id"]]
    # Another session is untouched.
    assert (await refresh(server, other)).status_code == 200


async def test_revoke_an_older_token_ends_the_newest_too(server: Running) -> None:
    first = (await server.login())["refresh_token"]
    second = await rotate(server, first)
    third = await rotate(server, second)
    await revoke(server, token=first, token_type_hint="refresh_token")
    assert_invalid_grant(await refresh(server, third), third)
    # Revoking is not reuse: the audit trail says which it was.
    assert (await family_of(server, third))["revoked_reason"] == audit.REVOKED
    assert await server.store.list_audit_events(event=audit.REUSE_DETECTED) == []


async def test_revoke_is_200_for_tokens_it_does_not_know(server: Running) -> None:
    login = await server.login()
    for token in (
        secrets.token_urlsafe(32),
        "garbage",
        "x" * 5000,
        login["access_token"],
    ):
        await revoke(server, token=token)
        await revoke(server, token=token, token_type_hint="access_token")
    await revoke(server, token="whatever", token_type_hint="unknown_hint")
    # Revoking twice is as fine as once.
    await revoke(server, token=login["refresh_token"])
    await revoke(server, token=login["refresh_token"])
    assert_invalid_grant(await refresh(server, login["refresh_token"]), login["refresh_token"])


async def test_revoke_without_a_token_is_invalid_request(server: Running) -> None:
    token = (await server.login())["refresh_token"]
    cases = [
        await server.client.post("/revoke", data={}),
        await server.client.post("/revoke", data={"token": ""}),
        await server.client.post("/revoke", data={"token_type_hint": "refresh_token"}),
        # RFC 7009 §2.1: form encoding only.
        await server.client.post("/revoke", json={"token": token}),
        await server.client.post(
            "/revoke",
            content=f"token={token}&token={token}".encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
    ]
    for r in cases:
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "invalid_request"
        assert token not in r.text
    # None of those revoked anything.
    assert (await refresh(server, token)).status_code == 200


async def test_revoke_checks_client_credentials_as_the_token_endpoint_does(
    server: Running,
) -> None:
    token = (await server.login())["refresh_token"]
    cases = {
        "malformed Basic": ({"Authorization": "Basic !!"}, {}, 401),
        "a client secret": ({"Authorization": "Basic YXBwOnNlY3JldA=="}, {}, 401),  # app:secret
        "a form secret": ({}, {"client_id": "app", "client_secret": "secret"}, 401),
    }
    for name, (headers, extra, status) in cases.items():
        r = await server.client.post("/revoke", data={"token": token, **extra}, headers=headers)
        assert r.status_code == status, name
        assert r.json()["error"] == "invalid_client", name
    assert (await refresh(server, token)).status_code == 200, "a refused request revoked"
    # A public client's id, as the Swagger UI sends it, is fine.
    r = await server.client.post(
        "/revoke", data={"token": token}, headers={"Authorization": "Basic Og=="}
    )
    assert r.status_code == 200


async def test_logout_ends_the_family(server: Running) -> None:
    other = (await server.login())["refresh_token"]
    first = (await server.login())["refresh_token"]
    second = await rotate(server, first)
    r = await server.client.post("/logout", json={"refresh_token": second})
    assert r.status_code == 204
    assert r.content == b""
    assert_invalid_grant(await refresh(server, second), second)
    family = await family_of(server, second)
    assert family["revoked_reason"] == audit.LOGGED_OUT
    assert family["statuses"]["active"] == 0
    assert (await refresh(server, other)).status_code == 200


async def test_logout_with_an_older_token_of_the_family(server: Running) -> None:
    first = (await server.login())["refresh_token"]
    second = await rotate(server, first)
    assert (await server.client.post("/logout", json={"refresh_token": first})).status_code == 204
    assert_invalid_grant(await refresh(server, second), second)


async def test_logout_with_an_unknown_token_changes_nothing(server: Running) -> None:
    token = (await server.login())["refresh_token"]
    for unknown in (secrets.token_urlsafe(32), "garbage", "y" * 5000):
        r = await server.client.post("/logout", json={"refresh_token": unknown})
        assert r.status_code == 204
    assert (await refresh(server, token)).status_code == 200


async def test_logout_bad_requests(server: Running) -> None:
    token = (await server.login())["refresh_token"]
    for r in (
        await server.client.post("/logout", json={}),
        await server.client.post("/logout", json={"refresh_token": ""}),
        await server.client.post("/logout", json={"refresh_token": 123}),
        await server.client.post("/logout", json=[token]),
        await server.client.post(
            "/logout", content=b"{", headers={"Content-Type": "application/json"}
        ),
    ):
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "invalid_request"
        assert token not in r.text
    assert (await refresh(server, token)).status_code == 200


async def test_a_login_cannot_outlive_a_password_change_or_disable_it_overlapped(
    server: Running,
) -> None:
    """The password is checked against the user row as read before the (slow) hash;
    a family begun after that row changed would survive the revocation that came with
    the change. Deterministically: the row changes between the check and the family."""
    store, auth = server.store, server.app.state.services.auth
    ctx = RequestContext(client_addr="test")

    async def begin(user: User) -> Issued | None:
        return await start_family(
            store,
            auth.auditor,
            ctx,
            user=user,
            scope="read",
            client_id="authserver",
            lifetimes=auth.policy.lifetimes,
            now=time.time(),
        )

    users = server.app.state.services.users
    checked = await store.get_user("alice")
    assert checked is not None
    assert await begin(checked) is not None  # unchanged: the family begins
    await users.set_password(ctx, "alice", "new password")
    assert await begin(checked) is None
    checked = await store.get_user("alice")
    assert checked is not None
    await users.set_disabled(ctx, "alice", True)
    assert await begin(checked) is None
    await users.set_disabled(ctx, "alice", False)
    assert await begin(checked) is None  # enabled again, but still not the row it checked


async def test_every_session_from_logins_racing_a_disable_is_dead(start_app: StartApp) -> None:
    # Cost 10: the eight hashes take a few hundred milliseconds on two threads, so the
    # disable lands while most logins are hashing, after every one has read the user.
    running = await start_app(bcrypt_rounds=10, login_max_failures=1000)
    await make_user(running.store, "alice", rounds=10)

    async def login() -> httpx.Response:
        return await running.client.post(
            "/login", json={"username": "alice", "password": DEFAULT_PASSWORD}
        )

    logins = [asyncio.create_task(login()) for _ in range(8)]
    await asyncio.sleep(0.05)  # all have read the user; most are hashing
    users, ctx = running.app.state.services.users, RequestContext(client_addr="test")
    await users.set_disabled(ctx, "alice", True)
    await users.set_disabled(ctx, "alice", False)
    for response in await asyncio.gather(*logins):
        if response.status_code == 200:
            token = response.json()["refresh_token"]
            r = await running.client.post("/refresh", json={"refresh_token": token})
            assert r.status_code == 401, "a session begun before the disable survived it"
        else:
            assert response.status_code == 401, response.text
