"""Passwords: the 72-byte and NUL policy, bcrypt off the event loop, the timing guard, rehashing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from authserver import metrics
from authserver.config import Settings
from authserver.password_policy import PasswordPolicy
from authserver.passwords import (
    MAX_PASSWORD_BYTES,
    PasswordHasher,
    PasswordPolicyError,
    hash_rounds,
    validate_new_password,
)
from tests.helpers.app import Running, StartApp
from tests.helpers.cli import assert_ok, assert_operator_error, cli_env, invoke
from tests.helpers.databases import SQLITE_ONLY
from tests.helpers.factories import DEFAULT_PASSWORD, make_user

LONG_ASCII = "x" * 73
LONG_UTF8 = "é" * 37  # 37 characters, 74 bytes


@pytest.mark.parametrize("password", ["x" * 72, "é" * 36, "€" * 24, "a", "pässwörd with spaces"])
def test_passwords_up_to_72_bytes_are_accepted(password: str) -> None:
    assert validate_new_password(password) == password.encode()


@pytest.mark.parametrize(
    ("password", "words"),
    [
        (LONG_ASCII, ("73 bytes", "72")),
        (LONG_UTF8, ("74 bytes", "72")),
        ("x" * 100_000, ("72",)),
        ("pass\x00word", ("NUL",)),
        ("", ("empty",)),
    ],
)
def test_unacceptable_passwords_are_refused_with_a_clear_message(
    password: str, words: tuple[str, ...]
) -> None:
    with pytest.raises(PasswordPolicyError) as info:
        validate_new_password(password)
    for word in words:
        assert word in str(info.value)
    if password:
        assert password not in str(info.value)


async def test_hasher_refuses_to_hash_what_bcrypt_would_truncate() -> None:
    hasher = PasswordHasher(rounds=4)
    try:
        with pytest.raises(PasswordPolicyError):
            await hasher.hash(LONG_ASCII)
        with pytest.raises(PasswordPolicyError):
            await hasher.hash(LONG_UTF8)
        hashed = await hasher.hash("x" * MAX_PASSWORD_BYTES)
        assert hash_rounds(hashed) == 4
        assert await hasher.verify("x" * MAX_PASSWORD_BYTES, hashed)
        # bcrypt < 5 would have compared only the first 72 bytes.
        assert not await hasher.verify("x" * MAX_PASSWORD_BYTES + "y", hashed)
        assert not await hasher.verify("anything", "not a bcrypt hash")
    finally:
        hasher.close()


@pytest.mark.parametrize(
    ("password", "words"),
    [(LONG_ASCII, ("72 bytes",)), (LONG_UTF8, ("72 bytes",)), ("nul\x00inside", ("NUL",))],
)
@pytest.mark.parametrize("command", ["add", "passwd"])
def test_cli_refuses_unacceptable_password_in_one_line(
    tmp_path: Path, keys_dir: Path, password: str, words: tuple[str, ...], command: str
) -> None:
    env = cli_env(f"sqlite:///{tmp_path / 'db.sqlite'}", keys_dir)
    if command == "passwd":
        assert_ok(invoke(env, "users", "add", "olga", "--password-stdin", input="first pw\n"))
    result = invoke(env, "users", command, "olga", "--password-stdin", input=f"{password}\n")
    line = assert_operator_error(result, "password refused", *words)
    assert password not in result.output
    users = invoke(env, "users", "list").stdout
    assert ("olga" in users) == (command == "passwd")
    events = invoke(env, "audit", "--user", "olga").stdout
    assert "password_changed" not in events
    assert "refused" in line


# -- login -----------------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    "password", [LONG_ASCII, LONG_UTF8, "y" * 1000, DEFAULT_PASSWORD + "x" * 60]
)
@pytest.mark.parametrize("username", ["alice", "nobody"])
async def test_login_with_over_72_bytes_is_401_never_500(
    server: Running, username: str, password: str
) -> None:
    r = await server.client.post("/login", json={"username": username, "password": password})
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_grant"
    assert password not in r.text
    r = await server.client.post(
        "/token", data={"grant_type": "password", "username": username, "password": password}
    )
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"


@SQLITE_ONLY
async def test_72_byte_password_logs_in_and_longer_ones_do_not(start_app: StartApp) -> None:
    running = await start_app()
    password = "k" * MAX_PASSWORD_BYTES
    await make_user(running.store, "max", password=password)
    await running.login("max", password)
    for longer in (password + "k", password + "anything"):
        r = await running.client.post("/login", json={"username": "max", "password": longer})
        assert r.status_code == 401


async def test_lower_cost_hash_is_upgraded_at_next_successful_login(start_app: StartApp) -> None:
    running = await start_app(bcrypt_rounds=5)
    await make_user(running.store, "alice", rounds=4)
    original = await running.store.get_user("alice")
    assert original is not None and hash_rounds(original.password_hash) == 4

    r = await running.client.post("/login", json={"username": "alice", "password": "wrong"})
    assert r.status_code == 401
    user = await running.store.get_user("alice")
    assert user is not None and user.password_hash == original.password_hash

    await running.login("alice", DEFAULT_PASSWORD)
    upgraded = await running.store.get_user("alice")
    assert upgraded is not None
    assert hash_rounds(upgraded.password_hash) == 5
    assert bcrypt.checkpw(DEFAULT_PASSWORD.encode(), upgraded.password_hash.encode())

    await running.login("alice", DEFAULT_PASSWORD)
    again = await running.store.get_user("alice")
    assert again is not None and again.password_hash == upgraded.password_hash


@SQLITE_ONLY
async def test_higher_cost_hash_is_left_alone(start_app: StartApp) -> None:
    running = await start_app(bcrypt_rounds=4)
    await make_user(running.store, "alice", rounds=5)
    before = await running.store.get_user("alice")
    await running.login("alice", DEFAULT_PASSWORD)
    after = await running.store.get_user("alice")
    assert before is not None and after is not None
    assert after.password_hash == before.password_hash


# -- the timing guard --------------------------------------------------------------------------


def bcrypt_check_seconds(rounds: int, tries: int = 5) -> float:
    hashed = bcrypt.hashpw(b"calibration", bcrypt.gensalt(rounds))
    times = []
    for _ in range(tries):
        started = time.perf_counter()
        bcrypt.checkpw(b"other", hashed)
        times.append(time.perf_counter() - started)
    return min(times)


def hash_checks() -> float:
    """How many hashes and checks this process's hasher has timed (its metric's count)."""
    for metric in metrics.PASSWORD_HASH_SECONDS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    raise AssertionError("authserver_password_hash_seconds has no _count")


@SQLITE_ONLY
async def test_failed_login_always_spends_a_bcrypt_check(start_app: StartApp) -> None:
    """Each failed login runs a check (the hasher's own count says so), and a
    full-cost one: slower than a cost-4 check by far more than any load explains (the
    two costs are 2**6 apart; a shortcut would answer in about the cheap check's time)."""
    running = await start_app(bcrypt_rounds=10, login_max_failures=100)
    await make_user(running.store, "alice", rounds=10)
    cheap_check = bcrypt_check_seconds(4)
    cases = [
        ("nobody", "whatever"),
        ("nobody", LONG_ASCII),
        ("alice", LONG_ASCII),
        ("alice", "wrong password"),
        ("alice", ""),
    ]
    for username, password in cases:
        elapsed = []
        for _ in range(2):
            checks = hash_checks()
            started = time.perf_counter()
            r = await running.client.post(
                "/login", json={"username": username, "password": password}
            )
            elapsed.append(time.perf_counter() - started)
            assert r.status_code == 401
            # At least: the server may be hashing something of its own meanwhile (the
            # timing guard's dummy hash, made once).
            assert hash_checks() >= checks + 1, (username, len(password))
        assert max(elapsed) >= 8 * cheap_check, (username, len(password), elapsed, cheap_check)


# -- bcrypt off the event loop --------------------------------------------------------------


async def loop_turns_until_done(tasks: list[asyncio.Task[Any]]) -> int:
    """How many times this loop got to run another coroutine while `tasks` were pending.

    Counts turns, not time: bcrypt run on the loop itself would let only a
    handful through (one between each hash), a thread pool lets hundreds.
    """
    turns = 0
    while not all(task.done() for task in tasks):
        await asyncio.sleep(0.001)
        turns += 1
    return turns


async def test_hasher_runs_bcrypt_off_the_event_loop() -> None:
    hasher = PasswordHasher(rounds=12, threads=1)
    try:
        hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(12)).decode()
        tasks = [asyncio.create_task(hasher.verify("pw", hashed)) for _ in range(2)]
        assert await loop_turns_until_done(tasks) >= 50
        assert [task.result() for task in tasks] == [True, True]
    finally:
        hasher.close()


@SQLITE_ONLY
async def test_protected_and_health_answer_while_logins_are_in_flight(
    start_app: StartApp,
) -> None:
    # In-flight attempts count against the throttle until they succeed: allow all eight.
    running = await start_app(bcrypt_rounds=12, login_max_failures=50)
    await make_user(running.store, "alice", rounds=12)
    tokens = await running.login()
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}

    logins = [
        asyncio.create_task(
            running.client.post("/login", json={"username": "alice", "password": DEFAULT_PASSWORD})
        )
        for _ in range(8)
    ]
    await asyncio.sleep(0.05)  # let them reach the bcrypt pool
    for _ in range(3):
        health = await running.client.get("/health")
        protected = await running.client.get("/protected", headers=bearer)
        assert health.status_code == 200
        assert protected.status_code == 200
        assert protected.json()["username"] == "alice"
        assert not all(task.done() for task in logins)
    responses = await asyncio.gather(*logins)
    assert [r.status_code for r in responses] == [200] * 8


async def test_a_lower_cost_hash_takes_as_much_work_to_check_as_the_current_cost() -> None:
    """A user whose hash predates a raised cost must not answer faster than an unknown
    user (whose dummy hash has the current cost): that would tell an attacker who exists.
    Measured in CPU time, which the machine's other load hardly disturbs; unpadded, the
    cost-4 check would take about 1/16 of the cost-8 one."""
    hasher = PasswordHasher(rounds=8, threads=1)
    try:
        old = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()
        current = bcrypt.hashpw(b"secret", bcrypt.gensalt(8)).decode()

        async def cpu(password: str, password_hash: str | None) -> float:
            began = time.process_time()
            for _ in range(3):
                await hasher.verify(password, password_hash)
            return time.process_time() - began

        await hasher.warm_up()
        assert await hasher.verify("secret", old) is True
        assert await hasher.verify("wrong", old) is False
        baseline = await cpu("wrong", current)
        for password, password_hash in (("wrong", old), ("secret", old), ("wrong", None)):
            ratio = await cpu(password, password_hash) / baseline
            assert 0.5 < ratio < 2, (password, password_hash is None, ratio)
    finally:
        hasher.close()


# -- the policy (NIST SP 800-63B §5.1.1.2) --------------------------------------------


@pytest.mark.parametrize(
    ("password", "username", "words"),
    [
        ("pass12!", "olga", ("7 characters", "at least 8")),
        ("password1", "olga", ("most common passwords", "zxcvbn")),
        ("Dragon", "olga", ("6 characters",)),
        ("QWERTYUIOP", "olga", ("most common passwords",)),  # case does not hide it
        ("Olga.Petrova", "olga.petrova", ("is the username",)),
    ],
)
def test_policy_refuses_short_common_and_username_passwords(
    password: str, username: str, words: tuple[str, ...]
) -> None:
    with pytest.raises(PasswordPolicyError) as info:
        PasswordPolicy().check(password, username=username)
    for word in words:
        assert word in str(info.value)
    assert password not in str(info.value)


@pytest.mark.parametrize("password", ["testpassword", "8 chars!", "Tr0ub4dor&3x", "é" * 8])
def test_policy_accepts_without_composition_rules(password: str) -> None:
    assert PasswordPolicy().check(password, username="olga") == password.encode()


def test_policy_minimum_is_configurable_upward() -> None:
    with pytest.raises(PasswordPolicyError, match="at least 12"):
        PasswordPolicy(min_length=12).check("eleven chrs", username="olga")
    PasswordPolicy(min_length=12).check("twelve chars", username="olga")
    with pytest.raises(ValueError, match="AUTHSERVER_PASSWORD_MIN_LENGTH|password_min_length"):
        Settings(password_min_length=6)


@pytest.mark.parametrize("command", ["add", "passwd"])
def test_cli_applies_the_policy(tmp_path: Path, keys_dir: Path, command: str) -> None:
    env = cli_env(
        f"sqlite:///{tmp_path / 'db.sqlite'}", keys_dir, AUTHSERVER_PASSWORD_MIN_LENGTH="10"
    )
    if command == "passwd":
        assert_ok(invoke(env, "users", "add", "olga", "--password-stdin", input="first pw ok\n"))
    for password, words in [("short pw", ("8 characters", "at least 10")), ("baseball12", ())]:
        result = invoke(env, "users", command, "olga", "--password-stdin", input=f"{password}\n")
        assert_operator_error(result, "password refused", *words)
        assert password not in result.output
    assert "password_changed" not in invoke(env, "audit", "--user", "olga").stdout
