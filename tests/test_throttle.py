"""Login throttling (CONTRACT §1, §2 /login): counts in the store, 429 slow_down, Retry-After,
at three levels (pair, username, address) that never lock a user out of a known address.

In-process, the ASGI peer is 127.0.0.1. With `trusted_proxies=("127.0.0.1",)`
uvicorn's ProxyHeadersMiddleware takes the client address from the rightmost
untrusted entry of X-Forwarded-For, which lets a test log in "from" many
addresses; without it, X-Forwarded-For is ignored.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from authserver.store.protocol import Store
from authserver.throttle import FailureKeys, network_of
from tests.helpers.app import Running, StartApp
from tests.helpers.factories import DEFAULT_PASSWORD, make_user
from tests.helpers.procs import ServerPool, base_env, run_cli, server_errors

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


async def counts(store: Store, username: str, addr: str) -> tuple[int, int, int]:
    """How many failures the store holds for the (username, address) pair, the username
    and the address."""
    keys = FailureKeys.of(username, addr)
    assert keys.network is not None
    return (
        (await store.login_failures(keys.pair, since=0))[0],
        (await store.login_failures(keys.user, since=0))[0],
        (await store.login_failures(keys.network, since=0))[0],
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


PER_USER = 6
PER_ADDRESS = 10


@pytest.fixture
async def app(start_app: StartApp) -> Running:
    running = await start_app(
        login_max_failures=MAX,
        login_max_failures_per_user=PER_USER,
        login_max_failures_per_address=PER_ADDRESS,
        trusted_proxies=(PEER,),
    )
    await make_user(running.store, "alice")
    return running


@pytest.mark.parametrize(
    ("addr", "network"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb:cccc:dddd:eeee", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("not an address", "not an address"),
    ],
)
def test_a_client_is_counted_by_the_network_it_owns(addr: str, network: str) -> None:
    assert network_of(addr) == network


async def test_failures_are_counted_per_pair_username_and_address_in_the_store(
    app: Running,
) -> None:
    assert (await login(app, "wrong", addr="203.0.113.5")).status_code == 401
    assert await counts(app.store, "alice", "203.0.113.5") == (1, 1, 1)
    assert (await login(app, "wrong", username="nobody", addr="203.0.113.5")).status_code == 401
    assert await counts(app.store, "nobody", "203.0.113.5") == (1, 1, 2)
    # Nothing is stored under the username itself.
    rows = await app.store.list_audit_events(event="login_failed")
    assert len(rows) == 2


async def test_the_pair_limit_holds_even_for_the_right_password(app: Running) -> None:
    for _ in range(MAX):
        assert (await login(app, "wrong", addr="203.0.113.5")).status_code == 401
    assert_slow_down(await login(app, DEFAULT_PASSWORD, addr="203.0.113.5"), 900)
    # The same user from elsewhere is below every other limit.
    assert (await login(app, DEFAULT_PASSWORD, addr="203.0.113.6")).status_code == 200


async def test_throttled_at_login_and_token_even_with_the_right_password(app: Running) -> None:
    for _ in range(MAX):
        assert (await login(app, "wrong")).status_code == 401
    assert_slow_down(await login(app, DEFAULT_PASSWORD), app.settings.login_window)
    assert_slow_down(await token_login(app, DEFAULT_PASSWORD), app.settings.login_window)


async def test_throttled_answer_is_the_same_for_a_user_that_does_not_exist(
    app: Running,
) -> None:
    for username in ("ghost", "alice"):
        for _ in range(MAX):
            assert (await login(app, "wrong", username=username)).status_code == 401
    ghost = await login(app, "whatever", username="ghost")
    alice = await login(app, DEFAULT_PASSWORD)
    assert_slow_down(ghost, app.settings.login_window)
    assert_slow_down(alice, app.settings.login_window)
    assert ghost.json() == alice.json()


async def test_token_endpoint_failures_count_too(app: Running) -> None:
    for _ in range(MAX):
        assert (await token_login(app, "wrong")).status_code == 400
    assert_slow_down(await login(app, DEFAULT_PASSWORD), app.settings.login_window)


async def test_success_resets_the_pair_count_but_not_the_username_count(app: Running) -> None:
    addr = "203.0.113.40"
    for _ in range(MAX - 1):
        assert (await login(app, "wrong", addr=addr)).status_code == 401
    assert (await login(app, DEFAULT_PASSWORD, addr=addr)).status_code == 200
    pair, user, network = await counts(app.store, "alice", addr)
    assert (pair, user, network) == (0, MAX - 1, MAX - 1)
    for _ in range(MAX - 1):
        assert (await login(app, "wrong", addr=addr)).status_code == 401
    assert (await login(app, DEFAULT_PASSWORD, addr=addr)).status_code == 200


async def test_the_window_ends(start_app: StartApp) -> None:
    running = await start_app(login_max_failures=2, login_window=2)
    await make_user(running.store, "alice")
    for _ in range(2):
        assert (await login(running, "wrong")).status_code == 401
    retry_after = assert_slow_down(await login(running, DEFAULT_PASSWORD), 2)
    await asyncio.sleep(retry_after + 0.1)
    assert (await login(running, DEFAULT_PASSWORD)).status_code == 200


async def test_failures_from_other_addresses_never_lock_a_user_out_of_a_known_one(
    app: Running,
) -> None:
    home = "198.51.100.20"
    assert (await login(app, DEFAULT_PASSWORD, addr=home)).status_code == 200
    # Guesses at alice from many addresses, each below the pair limit: past the username's.
    for index in range(3 * PER_USER):
        r = await login(app, "guess", addr=f"203.0.113.{index + 1}")
        assert r.status_code in (401, 429), r.text
    # From anywhere new, alice's name is throttled, the right password included ...
    assert_slow_down(await login(app, DEFAULT_PASSWORD, addr="192.0.2.200"), 900)
    # ... but not from home, at /login or /token.
    assert (await login(app, DEFAULT_PASSWORD, addr=home)).status_code == 200
    r = await app.client.post(
        "/token",
        data={"grant_type": "password", "username": "alice", "password": DEFAULT_PASSWORD},
        headers={"X-Forwarded-For": home},
    )
    assert r.status_code == 200, r.text


async def test_a_known_address_is_forgotten_after_its_ttl(start_app: StartApp) -> None:
    running = await start_app(
        login_max_failures=MAX,
        login_max_failures_per_user=PER_USER,
        login_known_address_ttl=1,
        trusted_proxies=(PEER,),
    )
    await make_user(running.store, "alice")
    home = "198.51.100.20"
    assert (await login(running, DEFAULT_PASSWORD, addr=home)).status_code == 200
    await asyncio.sleep(1.1)
    for index in range(PER_USER):
        await login(running, "guess", addr=f"203.0.113.{index + 1}")
    assert_slow_down(await login(running, DEFAULT_PASSWORD, addr=home), 900)


async def test_the_address_limit_spares_only_a_right_password_at_a_known_address(
    app: Running,
) -> None:
    office = "198.51.100.30"
    await make_user(app.store, "bob")
    assert (await login(app, DEFAULT_PASSWORD, addr=office)).status_code == 200  # alice's
    # Someone behind the same address sprays other usernames past the address limit.
    for index in range(PER_ADDRESS):
        r = await login(app, "guess", username=f"user{index}", addr=office)
        assert r.status_code == 401, r.text
    assert_slow_down(await login(app, "guess", username="carol", addr=office), 900)
    # bob has never logged in from there: throttled, right password and all.
    assert_slow_down(await login(app, DEFAULT_PASSWORD, username="bob", addr=office), 900)
    # alice has: her right password goes through, a wrong one is not even answered 401.
    assert (await login(app, DEFAULT_PASSWORD, addr=office)).status_code == 200
    assert_slow_down(await login(app, "wrong", addr=office), 900)
    # Elsewhere, bob is fine.
    r = await login(app, DEFAULT_PASSWORD, username="bob", addr="198.51.100.31")
    assert r.status_code == 200


async def test_an_ipv6_host_is_one_network_and_a_mapped_ipv4_address_is_the_ipv4_one(
    app: Running,
) -> None:
    for host in ("2001:db8:5:6::1", "2001:db8:5:6::2", "2001:db8:5:6:ffff::3"):
        assert (await login(app, "wrong", addr=host)).status_code == 401
    # Another address of the same /64 is the same pair: throttled.
    assert_slow_down(await login(app, DEFAULT_PASSWORD, addr="2001:db8:5:6::99"), 900)
    # Another /64 is another network.
    assert (await login(app, DEFAULT_PASSWORD, addr="2001:db8:5:7::1")).status_code == 200
    for _ in range(MAX):
        assert (await login(app, "wrong", username="bob", addr="203.0.113.9")).status_code == 401
    r = await login(app, "wrong", username="bob", addr="::ffff:203.0.113.9")
    assert_slow_down(r, 900)


@pytest.mark.parametrize("trusted", [(), ("10.0.0.1",)], ids=["no proxies", "other proxy"])
async def test_forwarded_for_is_ignored_unless_the_peer_is_trusted(
    start_app: StartApp, trusted: tuple[str, ...]
) -> None:
    running = await start_app(
        login_max_failures=MAX, login_max_failures_per_address=MAX, trusted_proxies=trusted
    )
    await make_user(running.store, "alice")
    # Each failure claims another address; the server sees the peer every time.
    for index in range(MAX):
        addr = f"203.0.113.{index}"
        r = await login(running, "wrong", username=f"user{index}", addr=addr)
        assert r.status_code == 401
        assert await counts(running.store, f"user{index}", addr) == (0, 1, 0)
    assert (await counts(running.store, "nobody", PEER))[2] == MAX
    assert_slow_down(
        await login(running, DEFAULT_PASSWORD, addr="203.0.113.200"),
        running.settings.login_window,
    )
    events = await running.store.list_audit_events(event="login_failed")
    assert {e.client_addr for e in events} == {PEER}


async def test_forwarded_for_from_a_trusted_proxy_names_the_client(app: Running) -> None:
    assert (await login(app, "wrong", addr="203.0.113.50")).status_code == 401
    assert await counts(app.store, "alice", "203.0.113.50") == (1, 1, 1)
    assert (await counts(app.store, "alice", PEER))[2] == 0
    # A client cannot pick its address by prepending to the header: the proxy
    # appends the real peer, and the rightmost untrusted entry is the client.
    r = await login(app, "wrong", addr="192.0.2.1, 203.0.113.51")
    assert r.status_code == 401
    assert (await counts(app.store, "alice", "203.0.113.51"))[2] == 1
    assert (await counts(app.store, "alice", "192.0.2.1"))[2] == 0
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
    # Concurrent guesses must not all slip through before the first failure is counted:
    # from many addresses, the username's limit holds; from one, the pair's.
    responses = await asyncio.gather(
        *(login(app, f"guess{i}", addr=f"203.0.113.{100 + i}") for i in range(4 * PER_USER))
    )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {401, 429}
    assert statuses.count(401) <= PER_USER, statuses
    responses = await asyncio.gather(
        *(login(app, f"guess{i}", username="bob", addr="192.0.2.9") for i in range(4 * MAX))
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
    assert await counts(app.store, "alice", PEER) == (0, 0, 0)


async def test_a_right_password_in_a_burst_of_guesses_is_refused_once_the_limit_is_hit(
    app: Running,
) -> None:
    # Failures recorded while this attempt's password was checked still stop it.
    guesses = [login(app, f"guess{i}") for i in range(4 * MAX)]
    responses = await asyncio.gather(*guesses, login(app, DEFAULT_PASSWORD))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {401, 429, 200}
    if statuses[-1] == 429:
        assert statuses.count(401) <= MAX, statuses
        assert statuses.count(429) >= 3 * MAX + 1, statuses
    else:
        # It got through before the limit was reached; a success forgets the pair's
        # failures (they were the user's own typos), so the guesses after it count anew.
        assert statuses[-1] == 200, statuses
        assert statuses.count(401) <= 2 * MAX, statuses
        assert statuses.count(429) >= 2 * MAX, statuses


@pytest.mark.slow
def test_a_server_process_never_locks_a_user_out_of_her_address(
    database_url: str, keys_dir: Path, tmp_path: Path
) -> None:
    """The whole point, against a real server: whatever a stranger does, from other
    addresses at alice's name or from alice's own address at other names, her right
    password from where she logs in keeps working."""
    env = base_env(
        AUTHSERVER_DATABASE_URL=database_url,
        AUTHSERVER_KEYS_DIR=str(keys_dir),
        AUTHSERVER_TRUSTED_PROXIES=PEER,
        AUTHSERVER_LOGIN_MAX_FAILURES=str(MAX),
        AUTHSERVER_LOGIN_MAX_FAILURES_PER_USER=str(PER_USER),
        AUTHSERVER_LOGIN_MAX_FAILURES_PER_ADDRESS=str(PER_ADDRESS),
    )
    added = run_cli(
        ["users", "add", "alice", "--password-stdin"], env, cwd=tmp_path, stdin=DEFAULT_PASSWORD
    )
    assert added.returncode == 0, added.stderr
    home = "198.51.100.20"

    def attempt(client: httpx.Client, username: str, password: str, addr: str) -> int:
        body = {"username": username, "password": password}
        r = client.post("/login", json=body, headers={"X-Forwarded-For": addr})
        assert r.status_code in (200, 401, 429), r.text
        return r.status_code

    with ServerPool(tmp_path) as pool:
        server = pool.start(env)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert attempt(client, "alice", DEFAULT_PASSWORD, home) == 200
            for index in range(3 * PER_USER):
                attempt(client, "alice", f"guess{index}", f"203.0.113.{index + 1}")
            for index in range(2 * PER_ADDRESS):
                attempt(client, f"someone{index}", "guess", home)
            assert attempt(client, "alice", DEFAULT_PASSWORD, "192.0.2.1") == 429
            assert attempt(client, "alice", DEFAULT_PASSWORD, home) == 200
        assert not server_errors(server.log())


async def test_a_login_hands_the_event_loop_back_between_the_throttles_reads(
    app: Running,
) -> None:
    """On SQLite each read runs inline on the event loop: the throttle lets other tasks
    run between its reads, so a stream of logins does not hold other requests back."""
    services = app.app.state.services
    throttle, user = services.auth.throttle, await app.store.get_user("alice")
    assert user is not None
    ticks = 0
    running = True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        before = ticks
        attempt = await throttle.begin("alice", "203.0.113.9", user_id=user.id, now=time.time())
        during_begin = ticks - before
        before = ticks
        await throttle.succeeded(attempt, now=time.time())
        during_success = ticks - before
    finally:
        running = False
        await task
    # begin reads the pair's, the user's and the network's counts; succeeded reads them
    # again (the pair's tells it whether there are failures to clear).
    assert during_begin >= 3
    assert during_success >= 3
