"""The `authserver` command, run in-process with typer's CliRunner against real databases.

Commands that need a running server alongside (passwd, disable, keys retire) run
the CLI in a worker thread: it starts its own event loop there, as it does in a shell.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from authserver.config import Settings
from authserver.keys import KeyRing, generate_key, key_files, load_key
from authserver.store.sql import create_engine
from tests.helpers.app import StartApp
from tests.helpers.cli import ainvoke, assert_ok, assert_operator_error, cli_env, invoke
from tests.helpers.databases import SQLITE_ONLY
from tests.helpers.factories import hash_password
from tests.helpers.procs import free_port
from tests.helpers.tokens import jwt_header, wait_for_kids

UNREACHABLE_DB = "postgresql://postgres@127.0.0.1:1/x"
PASSWORD = "a fine passphrase"
TABLES = {
    "users",
    "refresh_families",
    "refresh_tokens",
    "login_failures",
    "audit_events",
    "alembic_version",
}


async def table_names(database_url: str) -> set[str]:
    engine = create_engine(Settings(database_url=database_url))
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
    finally:
        await engine.dispose()


@pytest.fixture
def env(database_url: str, keys_dir: Path) -> dict[str, str]:
    """For commands whose work is in the database: SQLite and PostgreSQL."""
    return cli_env(database_url, keys_dir)


@pytest.fixture
def sqlite_env(tmp_path: Path, keys_dir: Path) -> dict[str, str]:
    """For commands whose work is not in the database."""
    return cli_env(f"sqlite:///{tmp_path / 'db.sqlite'}", keys_dir)


def usernames(env: Mapping[str, str]) -> dict[str, str]:
    """`users list` as {name: status}."""
    result = invoke(env, "users", "list")
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["USERNAME", "STATUS", "CREATED"]
    return {line.split()[0]: line.split()[1] for line in lines[1:]}


# -- users ---------------------------------------------------------------------------


async def test_users_add_prompts_twice_and_the_password_logs_in(
    env: dict[str, str], start_app: StartApp
) -> None:
    result = await ainvoke(env, "users", "add", "carol", input=f"{PASSWORD}\n{PASSWORD}\n")
    assert_ok(result)
    assert result.output.count("Password") == 1
    assert "Repeat for confirmation" in result.output
    assert PASSWORD not in result.output
    running = await start_app()
    r = await running.client.post("/login", json={"username": "carol", "password": PASSWORD})
    assert r.status_code == 200, r.text
    r = await running.client.post("/login", json={"username": "carol", "password": "nope"})
    assert r.status_code == 401


def test_users_add_refuses_mismatched_passwords(env: dict[str, str]) -> None:
    result = invoke(env, "users", "add", "carol", input="first one\nsecond one\n")
    assert result.exit_code != 0
    assert "do not match" in result.output
    assert "carol" not in usernames(env)


def test_users_add_password_stdin(env: dict[str, str]) -> None:
    result = invoke(env, "users", "add", "dave", "--password-stdin", input=f"{PASSWORD}\n")
    assert_ok(result)
    assert "Password" not in result.output
    assert usernames(env) == {"dave": "active"}


async def test_password_stdin_takes_the_line_without_its_crlf(
    env: dict[str, str], start_app: StartApp
) -> None:
    assert_ok(await ainvoke(env, "users", "add", "erin", "--password-stdin", input="pw pw pw\r\n"))
    running = await start_app()
    r = await running.client.post("/login", json={"username": "erin", "password": "pw pw pw"})
    assert r.status_code == 200, r.text


def test_users_add_duplicate_is_one_line_error(env: dict[str, str]) -> None:
    assert_ok(invoke(env, "users", "add", "erin", "--password-stdin", input="pw one one\n"))
    result = invoke(env, "users", "add", "erin", "--password-stdin", input="pw two two\n")
    assert_operator_error(result, "erin", "already exists")
    assert "pw two" not in result.output


def test_users_add_refuses_bad_username(sqlite_env: dict[str, str]) -> None:
    result = invoke(sqlite_env, "users", "add", "bad name/../", "--password-stdin", input="pw\n")
    assert_operator_error(result, "invalid username")
    assert usernames(sqlite_env) == {}


def test_users_list_shows_status(env: dict[str, str]) -> None:
    for name in ("zed", "amy"):
        assert_ok(invoke(env, "users", "add", name, "--password-stdin", input="pw pw pw\n"))
    assert_ok(invoke(env, "users", "disable", "zed"))
    result = invoke(env, "users", "list")
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert names == ["amy", "zed"]
    assert usernames(env) == {"amy": "active", "zed": "disabled"}


async def test_users_passwd_changes_password_and_revokes_sessions(
    env: dict[str, str], start_app: StartApp
) -> None:
    assert_ok(await ainvoke(env, "users", "add", "fred", "--password-stdin", input="old pass\n"))
    running = await start_app()
    tokens = await running.login("fred", "old pass")

    result = await ainvoke(env, "users", "passwd", "fred", "--password-stdin", input="new pass\n")
    assert_ok(result)
    assert "new pass" not in result.output

    r = await running.client.post("/login", json={"username": "fred", "password": "old pass"})
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_grant"
    await running.login("fred", "new pass")
    r = await running.client.post("/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_grant"


async def test_users_passwd_prompts_twice(env: dict[str, str], start_app: StartApp) -> None:
    assert_ok(await ainvoke(env, "users", "add", "gina", "--password-stdin", input="old pass\n"))
    result = await ainvoke(env, "users", "passwd", "gina", input="new pass\nnew pass\n")
    assert_ok(result)
    running = await start_app()
    await running.login("gina", "new pass")


async def test_users_disable_refuses_login_and_revokes_refresh_tokens_enable_restores(
    env: dict[str, str], start_app: StartApp
) -> None:
    assert_ok(await ainvoke(env, "users", "add", "hank", "--password-stdin", input=f"{PASSWORD}\n"))
    running = await start_app()
    first = await running.login("hank", PASSWORD)
    second = await running.login("hank", PASSWORD)

    assert_ok(await ainvoke(env, "users", "disable", "hank"))
    r = await running.client.post("/login", json={"username": "hank", "password": PASSWORD})
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_grant"
    for tokens in (first, second):
        r = await running.client.post("/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert r.status_code == 401

    assert_ok(await ainvoke(env, "users", "enable", "hank"))
    await running.login("hank", PASSWORD)
    # Enabling does not bring revoked sessions back.
    r = await running.client.post("/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("args", "input"),
    [
        (("users", "passwd", "ghost", "--password-stdin"), "whatever pw\n"),
        (("users", "disable", "ghost"), None),
        (("users", "enable", "ghost"), None),
    ],
)
def test_unknown_user_is_one_line_error(
    env: dict[str, str], args: tuple[str, ...], input: str | None
) -> None:
    assert_operator_error(invoke(env, *args, input=input), "unknown user", "ghost")


# -- keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "alg", "kty"), [((), "RS256", "RSA"), (("--alg", "ES256"), "ES256", "EC")]
)
@SQLITE_ONLY
async def test_keys_generate_writes_0600_key_that_signs(
    env: dict[str, str],
    keys_dir: Path,
    start_app: StartApp,
    option: tuple[str, ...],
    alg: str,
    kty: str,
) -> None:
    running = await start_app(keys_reload_interval=0.2)
    await running.store.add_user("ivy", hash_password(PASSWORD), at=time.time())
    before = set(key_files(keys_dir))

    result = await ainvoke(env, "keys", "generate", *option)
    assert_ok(result)
    new = set(key_files(keys_dir)) - before
    assert len(new) == 1
    path = new.pop()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_files(keys_dir)[-1] == path  # the newest file name sorts last
    kid = result.stdout.split()[3]
    assert alg in result.stdout and str(path) in result.stdout

    kids = await wait_for_kids(running.client, lambda kids: kid in kids)
    assert len(kids) == 2
    jwk = next(
        k
        for k in (await running.client.get("/.well-known/jwks.json")).json()["keys"]
        if k["kid"] == kid
    )
    assert (jwk["alg"], jwk["kty"]) == (alg, kty)
    tokens = await running.login("ivy", PASSWORD)
    assert jwt_header(tokens["access_token"])["kid"] == kid
    assert jwt_header(tokens["access_token"])["alg"] == alg
    r = await running.client.get(
        "/protected", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert r.status_code == 200


def test_keys_generate_creates_missing_directory(tmp_path: Path) -> None:
    keys = tmp_path / "fresh" / "keys"
    result = invoke(cli_env(f"sqlite:///{tmp_path / 'db.sqlite'}", keys), "keys", "generate")
    assert_ok(result)
    (path,) = key_files(keys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) & 0o077 == 0


def test_keys_generate_refuses_unknown_algorithm(
    sqlite_env: dict[str, str], keys_dir: Path
) -> None:
    before = key_files(keys_dir)
    assert_operator_error(invoke(sqlite_env, "keys", "generate", "--alg", "HS256"), "HS256")
    assert key_files(keys_dir) == before


def test_keys_list_shows_kid_alg_created_and_signing(
    sqlite_env: dict[str, str], keys_dir: Path
) -> None:
    (first,) = [generate_key(keys_dir, "ES256")]  # keys_dir already holds an RS256 key
    result = invoke(sqlite_env, "keys", "generate")
    assert_ok(result)
    newest = result.stdout.split()[3]
    listing = invoke(sqlite_env, "keys", "list")
    assert_ok(listing)
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["KID", "ALG", "CREATED", "SIGNING"]
    rows = [line.split() for line in lines[1:]]
    assert len(rows) == 3
    by_kid = {row[0]: row for row in rows}
    assert by_kid[first.kid][1] == "ES256"
    assert by_kid[newest][1:] == ["RS256", by_kid[newest][2], "yes"]
    assert [row for row in rows if "yes" in row[3:]] == [by_kid[newest]]
    assert all(row[2].endswith("Z") and row[2][:2] == "20" for row in rows)


@SQLITE_ONLY
async def test_keys_retire_stops_its_tokens_after_reload(
    env: dict[str, str], keys_dir: Path, start_app: StartApp
) -> None:
    running = await start_app(keys_reload_interval=0.2)
    await running.store.add_user("jack", hash_password(PASSWORD), at=time.time())
    old = await running.login("jack", PASSWORD)
    old_kid = jwt_header(old["access_token"])["kid"]
    auth = {"Authorization": f"Bearer {old['access_token']}"}
    assert (await running.client.get("/protected", headers=auth)).status_code == 200

    assert_ok(await ainvoke(env, "keys", "generate", "--alg", "ES256"))
    await wait_for_kids(running.client, lambda kids: len(kids) == 2)
    # A previous key still verifies until it is retired.
    assert (await running.client.get("/protected", headers=auth)).status_code == 200

    result = await ainvoke(env, "keys", "retire", old_kid)
    assert_ok(result)
    assert old_kid in result.stdout
    await wait_for_kids(running.client, lambda kids: old_kid not in kids)
    r = await running.client.get("/protected", headers=auth)
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    new = await running.login("jack", PASSWORD)
    r = await running.client.get(
        "/protected", headers={"Authorization": f"Bearer {new['access_token']}"}
    )
    assert r.status_code == 200


def test_keys_retire_refuses_unknown_kid_and_the_only_key(
    sqlite_env: dict[str, str], keys_dir: Path
) -> None:
    (only,) = key_files(keys_dir)
    assert_operator_error(invoke(sqlite_env, "keys", "retire", "no-such-kid"), "no-such-kid")
    listing = invoke(sqlite_env, "keys", "list").stdout.splitlines()
    kid = listing[1].split()[0]
    assert_operator_error(invoke(sqlite_env, "keys", "retire", kid), "only key")
    assert key_files(keys_dir) == [only]


def test_a_key_copied_into_two_files_is_one_key(sqlite_env: dict[str, str], keys_dir: Path) -> None:
    (original,) = key_files(keys_dir)
    copy = keys_dir / "zz-copy.pem"
    copy.write_bytes(original.read_bytes())
    copy.chmod(0o600)
    ring = KeyRing(keys_dir)
    ring.load()
    (published,) = ring.jwks()["keys"]  # one kid, published once
    # Retiring it would leave nothing to sign with, however many copies there are.
    assert_operator_error(invoke(sqlite_env, "keys", "retire", published["kid"]), "only key")
    new = generate_key(keys_dir)
    assert_ok(invoke(sqlite_env, "keys", "retire", published["kid"]))
    assert key_files(keys_dir) == [new.path]


# -- db ---------------------------------------------------------------------------------


@pytest.mark.empty_database
async def test_db_upgrade_creates_tables_and_is_idempotent(
    env: dict[str, str], database_url: str
) -> None:
    assert not (await table_names(database_url)) & TABLES
    for _ in range(2):
        result = await ainvoke(env, "db", "upgrade")
        assert_ok(result)
        assert TABLES <= await table_names(database_url)


async def test_db_purge_removes_dead_families(env: dict[str, str], start_app: StartApp) -> None:
    running = await start_app()
    await running.store.add_user("kate", hash_password(PASSWORD), at=time.time())
    dead = await running.login("kate", PASSWORD)
    live = await running.login("kate", PASSWORD)
    r = await running.client.post("/logout", json={"refresh_token": dead["refresh_token"]})
    assert r.status_code == 204

    result = await ainvoke(env, "db", "purge")
    assert_ok(result)
    assert "purged 1 refresh famil" in result.stdout
    # Every kind of row it deletes is reported, each on its own line.
    assert [line.split()[2:4] for line in result.stdout.splitlines()] == [
        ["refresh", "families"],
        ["login", "failures"],
        ["known", "login"],
        ["client-assertion", "ids"],
        ["authorization", "codes"],
        ["browser", "sessions"],
    ]
    r = await running.client.post("/refresh", json={"refresh_token": live["refresh_token"]})
    assert r.status_code == 200
    result = await ainvoke(env, "db", "purge")
    assert "purged 0 refresh famil" in result.stdout


# -- audit -------------------------------------------------------------------------------


def audit_rows(env: Mapping[str, str], *args: str) -> list[dict[str, Any]]:
    result = invoke(env, "audit", "--json", *args)
    assert_ok(result)
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_audit_filters_and_lists_newest_last(env: dict[str, str]) -> None:
    for name in ("lena", "mike"):
        assert_ok(invoke(env, "users", "add", name, "--password-stdin", input="pw pw pw\n"))
    assert_ok(invoke(env, "users", "disable", "mike"))
    assert_ok(invoke(env, "users", "enable", "mike"))

    rows = audit_rows(env, "--user", "mike")
    assert [r["event"] for r in rows] == ["user_created", "user_disabled", "user_enabled"]
    assert {r["username"] for r in rows} == {"mike"}
    assert [r["at"] for r in rows] == sorted(r["at"] for r in rows)

    rows = audit_rows(env, "--event", "user_created")
    assert [r["username"] for r in rows] == ["lena", "mike"]

    assert len(audit_rows(env, "--since", "1h")) == 4
    assert audit_rows(env, "--since", "2100-01-01") == []
    assert len(audit_rows(env, "--since", "2000-01-01T00:00:00Z", "--user", "lena")) == 1

    text = invoke(env, "audit", "--event", "user_disabled")
    assert_ok(text)
    assert len(text.stdout.splitlines()) == 1
    assert "user_disabled" in text.stdout and "user=mike" in text.stdout
    for row in audit_rows(env):
        assert "pw pw pw" not in json.dumps(row)


@pytest.mark.parametrize("since", ["last tuesday", "nan", "inf"])
def test_audit_refuses_unreadable_since(sqlite_env: dict[str, str], since: str) -> None:
    assert_operator_error(invoke(sqlite_env, "audit", "--since", since), "--since")


# -- operator errors ----------------------------------------------------------------------


def _unreadable(path: Path) -> None:
    if os.geteuid() != 0:
        path.write_text("unreadable\n")
        path.chmod(0)
    else:
        # root reads any mode: point the key file at something whose read fails (EIO).
        path.symlink_to("/proc/self/mem")


@pytest.mark.parametrize("problem", ["garbage", "unreadable"])
@pytest.mark.parametrize(
    "args", [("keys", "list"), ("keys", "retire", "x"), ("serve", "--port", "1")]
)
def test_bad_key_file_is_one_line_error_naming_it(
    tmp_path: Path, keys_dir: Path, problem: str, args: tuple[str, ...]
) -> None:
    bad = keys_dir / "zz-bad.pem"
    if problem == "garbage":
        bad.write_text(
            "-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n"
        )
        bad.chmod(0o600)
    else:
        _unreadable(bad)
    env = cli_env(f"sqlite:///{tmp_path / 'db.sqlite'}", keys_dir)
    line = assert_operator_error(invoke(env, *args), str(bad))
    assert "PRIVATE KEY" not in line


@pytest.mark.parametrize(
    "args",
    [
        ("users", "list"),
        ("users", "add", "nina", "--password-stdin"),
        ("users", "disable", "nina"),
        ("db", "upgrade"),
        ("db", "purge"),
        ("audit",),
        ("serve", "--port", "0"),
    ],
)
def test_unreachable_database_is_one_line_error(keys_dir: Path, args: tuple[str, ...]) -> None:
    env = cli_env(UNREACHABLE_DB, keys_dir)
    assert_operator_error(invoke(env, *args, input="pw pw pw\n"), "database")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AUTHSERVER_BCRYPT_ROUNDS", "lots"),
        ("AUTHSERVER_BCRYPT_ROUNDS", "3"),
        ("AUTHSERVER_DATABASE_URL", "mysql://root@localhost/x"),
        ("AUTHSERVER_LOG_FORMAT", "xml"),
        ("AUTHSERVER_SCOPES", ""),
        ("AUTHSERVER_TRUSTED_PROXIES", "not-an-address"),
        ("AUTHSERVER_ACCESS_TOKEN_TTL", "0"),
        ("AUTHSERVER_DATABASE_URL", "sqlite://"),
        ("AUTHSERVER_DATABASE_URL", "sqlite:"),
        ("AUTHSERVER_DATABASE_URL", "postgresql://postgres@127.0.0.1:notaport/x"),
        ("AUTHSERVER_DATABASE_URL", "postgresql://[::1"),
    ],
)
@pytest.mark.parametrize("args", [("users", "list"), ("keys", "list"), ("serve", "--port", "1")])
def test_invalid_configuration_is_one_line_error(
    tmp_path: Path, keys_dir: Path, variable: str, value: str, args: tuple[str, ...]
) -> None:
    env = cli_env(f"sqlite:///{tmp_path / 'db.sqlite'}", keys_dir)
    env[variable] = value
    assert_operator_error(invoke(env, *args), "invalid configuration", variable)


def test_env_file_that_is_not_utf8_is_one_line_error(
    sqlite_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_bytes(b"\xff\xfe=bad\n")
    monkeypatch.chdir(tmp_path)
    for args in (("users", "list"), ("keys", "list")):
        assert_operator_error(invoke(sqlite_env, *args), ".env")


def test_keys_dir_that_is_a_file_is_one_line_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "keys"
    not_a_dir.write_text("")
    env = cli_env(f"sqlite:///{tmp_path / 'db.sqlite'}", not_a_dir)
    for args in (("keys", "list"), ("keys", "generate"), ("serve", "--port", "1")):
        line = assert_operator_error(invoke(env, *args), str(not_a_dir))
        assert "database" not in line


def test_python_m_authserver_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "authserver", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for command in ("serve", "users", "keys", "db", "audit"):
        assert command in result.stdout


# -- serve as a real process ---------------------------------------------------------------


@contextlib.contextmanager
def serve_process(
    cwd: Path, log_path: Path, *args: str, env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """`authserver serve` on a free port; yields its base URL once /health answers 200."""
    port = free_port()
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUTHSERVER_")},
        "AUTHSERVER_DATABASE_URL": f"sqlite:///{cwd / 'authserver.db'}",
        "AUTHSERVER_KEYS_DIR": str(cwd / "keys"),
        "AUTHSERVER_BCRYPT_ROUNDS": "4",
        "AUTHSERVER_ISSUER": f"http://127.0.0.1:{port}",
        **(env or {}),
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authserver", "serve", "--port", str(port), *args],
            cwd=cwd,
            env=full_env,
            stdout=log,
            stderr=log,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield base
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down gracefully.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), log_path.read_text()
        assert "Application shutdown complete" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_generates_key_creates_demo_user_and_answers(tmp_path: Path) -> None:
    cwd = tmp_path / "run"
    cwd.mkdir()
    log_path = tmp_path / "stderr.log"
    with serve_process(cwd, log_path, "--demo") as base:
        (key,) = key_files(cwd / "keys")
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

        r = httpx.get(f"{base}/health", timeout=10)
        assert r.json() == {"status": "ok"}
        r = httpx.post(
            f"{base}/login", json={"username": "testuser", "password": "testpassword"}, timeout=10
        )
        assert r.status_code == 200, r.text
        r = httpx.get(
            f"{base}/protected",
            headers={"Authorization": f"Bearer {r.json()['access_token']}"},
            timeout=10,
        )
        assert r.json()["username"] == "testuser"
        r = httpx.post(
            f"{base}/login", json={"username": "testuser", "password": "testpassword!"}, timeout=10
        )
        assert r.status_code == 401

    text = log_path.read_text()
    # One JSON object per line, every line.
    records = [json.loads(line) for line in text.splitlines()]
    generated = [r for r in records if "generated" in r["message"] and "key" in r["message"]]
    assert len(generated) == 1
    assert generated[0]["kid"] == load_key(key).kid
    assert generated[0]["level"] == "WARNING"
    demo = [r for r in records if "DEMO" in r["message"]]
    assert len(demo) == 1
    assert demo[0]["level"] == "WARNING"
    assert "testuser" in demo[0]["message"]
    assert "testpassword" not in text
    assert "PRIVATE KEY" not in text


def test_serve_demo_twice_keeps_key_and_user(tmp_path: Path) -> None:
    cwd = tmp_path / "run"
    cwd.mkdir()
    with serve_process(cwd, tmp_path / "first.log", "--demo"):
        first = key_files(cwd / "keys")
    with serve_process(cwd, tmp_path / "second.log", "--demo") as base:
        assert key_files(cwd / "keys") == first
        r = httpx.post(
            f"{base}/login", json={"username": "testuser", "password": "testpassword"}, timeout=10
        )
        assert r.status_code == 200
    second = (tmp_path / "second.log").read_text()
    assert "generated" not in second


def test_the_sqlite_database_and_its_wal_files_are_private(
    sqlite_env: dict[str, str], tmp_path: Path
) -> None:
    result = invoke(sqlite_env, "users", "add", "olga", "--password-stdin", input="pw pw pw\n")
    assert result.exit_code == 0, result.output
    database = Path(sqlite_env["AUTHSERVER_DATABASE_URL"].removeprefix("sqlite:///"))
    # WAL mode keeps -wal and -shm beside the file while a connection is open.
    with sqlite3.connect(database) as conn:
        conn.execute("SELECT count(*) FROM users").fetchone()
        files = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
        for path in files:
            assert path.exists(), path
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    conn.close()


def test_a_world_readable_database_is_warned_about(
    sqlite_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    database = Path(sqlite_env["AUTHSERVER_DATABASE_URL"].removeprefix("sqlite:///"))
    assert invoke(sqlite_env, "users", "list").exit_code == 0
    database.chmod(0o644)
    caplog.set_level(logging.WARNING, logger="authserver.store")
    assert invoke(sqlite_env, "users", "list").exit_code == 0
    assert any(f"chmod 600 {database}" in r.getMessage() for r in caplog.records)


# -- output for people, one line per operator mistake ---------------------------------------


def test_commands_print_only_their_answer(sqlite_env: dict[str, str]) -> None:
    """No log lines at the default level (stderr is empty); `--verbose` brings them back."""
    generated = invoke(sqlite_env, "keys", "generate")
    assert_ok(generated)
    assert generated.stdout.startswith("generated RS256 key ") and generated.stderr == ""
    listed = invoke(sqlite_env, "keys", "list")
    assert listed.stdout.splitlines()[0].split() == ["KID", "ALG", "CREATED", "SIGNING"]
    assert listed.stderr == ""
    added = invoke(sqlite_env, "users", "add", "quinn", "--password-stdin", input=f"{PASSWORD}\n")
    assert (added.stdout, added.stderr) == ("created user quinn\n", "")
    verbose = invoke(sqlite_env, "--verbose", "keys", "list")
    assert verbose.stdout == listed.stdout
    logged = [json.loads(line)["message"] for line in verbose.stderr.splitlines()]
    assert logged == ["key loaded"] * (len(listed.stdout.splitlines()) - 1)


def _one_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # no log records around it either
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _cli(tmp_path: Path, env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSERVER_")}
    return subprocess.run(
        [sys.executable, "-m", "authserver", *args],
        env={**full, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_operator_mistakes_are_one_line_naming_the_fix(tmp_path: Path, keys_dir: Path) -> None:
    """Real processes, as an operator meets them: a busy port, a missing database
    directory, an unreachable PostgreSQL."""
    env = cli_env(f"sqlite:///{tmp_path / 'db.sqlite'}", keys_dir)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _cli(tmp_path, env, "serve", "--demo", "--port", str(port))
    _one_line(result, f"port {port} on 127.0.0.1 is already in use", "--port")

    missing = tmp_path / "no" / "such" / "dir"
    env_missing = {**env, "AUTHSERVER_DATABASE_URL": f"sqlite:///{missing}/a.db"}
    for args in (("serve", "--port", "0"), ("users", "list")):
        _one_line(_cli(tmp_path, env_missing, *args), str(missing), "AUTHSERVER_DATABASE_URL")
    assert not missing.exists()

    env_pg = {**env, "AUTHSERVER_DATABASE_URL": UNREACHABLE_DB}
    _one_line(
        _cli(tmp_path, env_pg, "users", "list"),
        "cannot connect to the PostgreSQL database at 127.0.0.1:1: connection refused",
        "AUTHSERVER_DATABASE_CONNECT_TIMEOUT",
    )


@pytest.mark.parametrize(
    "args", [("serve",), ("users", "add"), ("clients", "add"), ("audit",), ("keys", "generate")]
)
def test_help_names_values_without_type_placeholders(
    sqlite_env: dict[str, str], args: tuple[str, ...]
) -> None:
    result = invoke(sqlite_env, *args, "--help")
    assert_ok(result)
    assert not re.search(r"<(str|bool|int|path|float)[^>]*>|\{[a-z_]+\}", result.stdout), (
        result.stdout
    )
    if args == ("serve",):
        assert re.search(r"--port\s+PORT", result.stdout), result.stdout
    if args == ("users", "add"):
        assert "users add [OPTIONS] NAME" in result.stdout
