"""Login throttling (CONTRACT §1, §2 /login): counts in the store, 429 slow_down, Retry-After.

In-process, the ASGI peer is 127.0.0.1. With `trusted_proxies=("127.0.0.1",)`
uvicorn's ProxyHeadersMiddleware takes the client address from the rightmost
untrusted entry of X-Forwarded-For, which lets a test log in "from" many
addresses; without it, X-Forwarded-For is ignored.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from authserver.store.protocol import Store
from authserver.throttle import LoginThrottle
from tests.helpers.app import Running, StartApp
from tests.helpers.factories import DEFAULT_PASSWORD, make_user

PEER = "127.0.0.1"
MAX = 3


async def login(
    running: Running, password: str, *, username: str = "alice", addr: str | None = None
) -> httpx.Response:
    headers = {"X-Forwarded-For": addr} if addr else {}
    return await running.client.post(
        "/login", json={"username": username, "password": password}, headers=headers
    )


async def token_login(
    running: Running, password: str, *, username: str = "alice"
) -> httpx.Response:
    return await running.client.post(
        "/token", data={"grant_type": "password", "username": username, "password": password}
    )


async def counts(store: Store, username: str, addr: str) -> tuple[int, int]:
    """How many failures the store holds for the username and for the address."""
    user_key, addr_key = LoginThrottle(store, max_failures=MAX, window=900).keys(username, addr)
    return (
        (await store.login_failures(user_key, since=0))[0],
        (await store.login_failures(addr_key, since=0))[0],
    )


def assert_slow_down(r: httpx.Response, window: int) -> int:
    assert r.status_code == 429, r.text
    assert set(r.json()) == {"error", "error_description"}
    assert r.json()["error"] == "slow_down"
    retry_after = r.headers["retry-after"]
    assert retry_after.isdigit(), retry_after
    assert 1 <= int(retry_after) <= window
    assert r.headers["cache-control"] == "no-store"
    return int(retry_after)


@pytest.fixture
async def app(start_app: StartApp) -> Running:
    running = await start_app(login_max_failures=MAX, trusted_proxies=(PEER,))
    await make_user(running.store, "alice")
    return running


async def test_failures_are_counted_per_username_and_address_in_the_store(
    app: Running,
) -> None:
    assert await counts(app.store, "alice", "198.51.100.7") == (0, 0)
    assert (await login(app, "wrong", addr="198.51.100.7")).status_code == 401
    assert (await login(app, "wrong", addr="198.51.100.7")).status_code == 401
    assert await counts(app.store, "alice", "198.51.100.7") == (2, 2)
    # A non-existent user counts too, under its own name.
    assert (await login(app, "wrong", username="ghost", addr="198.51.100.8")).status_code == 401
    assert await counts(app.store, "ghost", "198.51.100.8") == (1, 1)


async def test_throttled_at_login_and_token_even_with_the_right_password(app: Running) -> None:
    for _ in range(MAX):
        assert (await login(app, "wrong")).status_code == 401
    window = app.settings.login_window
    assert_slow_down(await login(app, DEFAULT_PASSWORD), window)
    assert_slow_down(await token_login(app, DEFAULT_PASSWORD), window)
    form = await app.client.post("/login", data={"username": "alice", "password": DEFAULT_PASSWORD})
    assert_slow_down(form, window)
    # Throttled attempts are not failures: they do not extend the lockout.
    assert (await counts(app.store, "alice", PEER))[0] == MAX


async def test_throttled_answer_is_the_same_for_a_user_that_does_not_exist(
    app: Running,
) -> None:
    answers: dict[str, Any] = {}
    for username, addr in (("alice", "198.51.100.1"), ("ghost", "198.51.100.2")):
        first = await login(app, "wrong", username=username, addr=addr)
        for _ in range(MAX - 1):
            await login(app, "wrong", username=username, addr=addr)
        throttled = await login(app, DEFAULT_PASSWORD, username=username, addr=addr)
        assert_slow_down(throttled, app.settings.login_window)
        answers[username] = (first.status_code, first.json(), throttled.json())
    assert answers["alice"] == answers["ghost"]
    assert answers["alice"][0] == 401


async def test_token_endpoint_failures_count_too(app: Running) -> None:
    for _ in range(MAX):
        r = await token_login(app, "wrong")
        assert r.status_code == 400
        assert r.json()["error"] == "invalid_grant"
    assert_slow_down(await login(app, DEFAULT_PASSWORD), app.settings.login_window)


async def test_success_resets_the_username_count(app: Running) -> None:
    for addr in ("203.0.113.1", "203.0.113.2"):
        assert (await login(app, "wrong", addr=addr)).status_code == 401
    assert (await login(app, DEFAULT_PASSWORD, addr="203.0.113.3")).status_code == 200
    assert await counts(app.store, "alice", "203.0.113.1") == (0, 1)
    # Two more failures from elsewhere: under the limit again, because the count restarted.
    for addr in ("203.0.113.4", "203.0.113.5"):
        assert (await login(app, "wrong", addr=addr)).status_code == 401
    assert (await login(app, DEFAULT_PASSWORD, addr="203.0.113.6")).status_code == 200


async def test_the_window_ends(start_app: StartApp) -> None:
    running = await start_app(login_max_failures=2, login_window=2)
    await make_user(running.store, "alice")
    for _ in range(2):
        assert (await login(running, "wrong")).status_code == 401
    retry_after = assert_slow_down(await login(running, DEFAULT_PASSWORD), 2)
    await asyncio.sleep(retry_after + 0.1)
    assert (await login(running, DEFAULT_PASSWORD)).status_code == 200


async def test_a_throttled_address_does_not_throttle_the_user_elsewhere(app: Running) -> None:
    attacker, user = "192.0.2.66", "198.51.100.20"
    # The attacker sprays other accounts, then fails once on alice: its address is over.
    for name in ("bob", "carol"):
        assert (await login(app, "guess", username=name, addr=attacker)).status_code == 401
    assert (await login(app, "guess", addr=attacker)).status_code == 401
    assert_slow_down(await login(app, DEFAULT_PASSWORD, addr=attacker), app.settings.login_window)
    # alice, from her own address, is only subject to her username's count (1 of 3).
    assert (await login(app, DEFAULT_PASSWORD, addr=user)).status_code == 200
    r = await app.client.post(
        "/token",
        data={"grant_type": "password", "username": "alice", "password": DEFAULT_PASSWORD},
        headers={"X-Forwarded-For": user},
    )
    assert r.status_code == 200


async def test_the_per_username_limit_applies_across_addresses(app: Running) -> None:
    for index in range(MAX):
        assert (await login(app, "wrong", addr=f"203.0.113.{10 + index}")).status_code == 401
    assert_slow_down(
        await login(app, DEFAULT_PASSWORD, addr="203.0.113.99"), app.settings.login_window
    )
    # Other users are unaffected from that same fresh address.
    await make_user(app.store, "bob")
    assert (
        await login(app, DEFAULT_PASSWORD, username="bob", addr="203.0.113.99")
    ).status_code == 200


@pytest.mark.parametrize("trusted", [(), ("10.0.0.1",)], ids=["no proxies", "other proxy"])
async def test_forwarded_for_is_ignored_unless_the_peer_is_trusted(
    start_app: StartApp, trusted: tuple[str, ...]
) -> None:
    running = await start_app(login_max_failures=MAX, trusted_proxies=trusted)
    await make_user(running.store, "alice")
    # Each failure claims another address; the server sees the peer every time.
    for index in range(MAX):
        addr = f"203.0.113.{index}"
        r = await login(running, "wrong", username=f"user{index}", addr=addr)
        assert r.status_code == 401
        assert await counts(running.store, f"user{index}", addr) == (1, 0)
    assert (await counts(running.store, "nobody", PEER))[1] == MAX
    assert_slow_down(
        await login(running, DEFAULT_PASSWORD, addr="203.0.113.200"),
        running.settings.login_window,
    )
    events = await running.store.list_audit_events(event="login_failed")
    assert {e.client_addr for e in events} == {PEER}


async def test_forwarded_for_from_a_trusted_proxy_names_the_client(app: Running) -> None:
    assert (await login(app, "wrong", addr="203.0.113.50")).status_code == 401
    assert await counts(app.store, "alice", "203.0.113.50") == (1, 1)
    assert (await counts(app.store, "alice", PEER))[1] == 0
    # A client cannot pick its address by prepending to the header: the proxy
    # appends the real peer, and the rightmost untrusted entry is the client.
    r = await login(app, "wrong", addr="192.0.2.1, 203.0.113.51")
    assert r.status_code == 401
    assert (await counts(app.store, "alice", "203.0.113.51"))[1] == 1
    assert (await counts(app.store, "alice", "192.0.2.1"))[1] == 0
    events = await app.store.list_audit_events(event="login_failed")
    assert [e.client_addr for e in events] == ["203.0.113.50", "203.0.113.51"]


async def test_throttling_is_audited(app: Running) -> None:
    for _ in range(MAX):
        await login(app, "wrong", addr="203.0.113.70")
    assert_slow_down(await login(app, DEFAULT_PASSWORD, addr="203.0.113.70"), 900)
    events = await app.store.list_audit_events(event="login_throttled")
    assert len(events) == 1
    assert events[0].username == "alice"
    assert events[0].client_addr == "203.0.113.70"
    assert DEFAULT_PASSWORD not in repr(events)


async def test_a_burst_of_guesses_gets_no_more_than_the_limit(app: Running) -> None:
    # Concurrent guesses must not all slip through before the first failure is counted.
    responses = await asyncio.gather(
        *(login(app, f"guess{i}", addr=f"203.0.113.{100 + i}") for i in range(20))
    )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {401, 429}
    assert statuses.count(401) <= MAX, statuses


async def test_any_forwarded_value_from_a_trusted_proxy_is_handled(start_app: StartApp) -> None:
    running = await start_app(login_max_failures=MAX, trusted_proxies=("*",))
    await make_user(running.store, "alice")
    for addr in ("x" * 300, "not an address", "[::1]:99", ""):
        r = await login(running, DEFAULT_PASSWORD, addr=addr)
        assert r.status_code == 200, (addr, r.text)
    r = await login(running, "wrong", addr="y" * 300)
    assert r.status_code == 401
    events = await running.store.list_audit_events(event="login_failed")
    assert events[-1].client_addr is not None and len(events[-1].client_addr) <= 64


async def test_parallel_honest_logins_from_one_address_are_not_throttled(app: Running) -> None:
    # Only failures count: many users behind one NAT address logging in at once is normal.
    responses = await asyncio.gather(*(login(app, DEFAULT_PASSWORD) for _ in range(4 * MAX)))
    assert [r.status_code for r in responses] == [200] * (4 * MAX)
    assert await counts(app.store, "alice", PEER) == (0, 0)


async def test_a_right_password_in_a_burst_of_guesses_is_refused_once_the_limit_is_hit(
    app: Running,
) -> None:
    # Failures recorded while this attempt's password was checked still stop it.
    guesses = [login(app, f"guess{i}") for i in range(4 * MAX)]
    responses = await asyncio.gather(*guesses, login(app, DEFAULT_PASSWORD))
    statuses = [r.status_code for r in responses]
    assert statuses.count(401) <= MAX, statuses
    assert set(statuses) <= {401, 429, 200}
    assert statuses.count(429) >= 3 * MAX, statuses
