"""The audit trail: a JSON log line and an `audit_events` row per security event.

Nothing secret may reach either: no password, no access or refresh token, no
line of a private key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from typer.testing import CliRunner

from authserver import audit
from authserver.cli import app as cli_app
from authserver.keys import generate_key, key_files
from authserver.store.protocol import AuditEvent
from tests.helpers.app import Running, StartApp
from tests.helpers.factories import DEFAULT_PASSWORD, make_client, make_user
from tests.helpers.procs import ServerPool, base_env, run_cli

WRONG_PASSWORD = "wrong-Pa55word-x9q"
REQUEST_ID = "req-audit-0001"


def cli(env: Mapping[str, str], *args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(cli_app, list(args), env=dict(env))
    assert result.exit_code == 0, (result.output, result.exception)
    rows: list[dict[str, Any]] = [json.loads(line) for line in result.stdout.splitlines()]
    return rows


def private_key_lines(keys_dir: Path) -> list[str]:
    lines = []
    for path in key_files(keys_dir):
        lines += [
            line for line in path.read_text().splitlines() if line and not line.startswith("-----")
        ]
    assert lines
    return lines


def assert_no_secret(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"a secret leaked: {secret[:12]}..."


async def _flow(running: Running) -> tuple[list[str], str]:
    """Login, failures, refresh, reuse, revoke, logout, throttling.

    Returns the secrets that went over the wire and the first login's family id.
    """
    client = running.client
    headers = {"X-Request-ID": REQUEST_ID}
    login = (
        await client.post(
            "/login", json={"username": "alice", "password": DEFAULT_PASSWORD}, headers=headers
        )
    ).json()
    assert (
        await client.post("/login", json={"username": "alice", "password": WRONG_PASSWORD})
    ).status_code == 401
    assert (
        await client.post("/login", json={"username": WRONG_PASSWORD, "password": "x"})
    ).status_code == 401
    second = (await client.post("/refresh", json={"refresh_token": login["refresh_token"]})).json()
    r = await client.post("/refresh", json={"refresh_token": login["refresh_token"]})
    assert r.status_code == 401  # reuse: the family is revoked
    other = await running.login()
    assert (await client.post("/revoke", data={"token": other["refresh_token"]})).status_code == 200
    third = await running.login()
    r = await client.post("/logout", json={"refresh_token": third["refresh_token"]})
    assert r.status_code == 204
    for _ in range(running.settings.login_max_failures):
        await client.post("/login", json={"username": "alice", "password": WRONG_PASSWORD})
    r = await client.post("/login", json={"username": "alice", "password": DEFAULT_PASSWORD})
    assert r.status_code == 429
    secrets = [DEFAULT_PASSWORD, WRONG_PASSWORD]
    for tokens in (login, second, other, third):
        secrets += [tokens["access_token"], tokens["refresh_token"]]
    return secrets, _family(await running.store.list_audit_events(event="login_succeeded"))


def _family(events: Any) -> str:
    family: str = events[0].details["family_id"]
    return family


async def test_security_events_are_stored_and_logged(
    start_app: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_app(login_max_failures=3)
    await make_user(running.store, "alice")
    caplog.set_level(logging.INFO, logger="authserver")
    secrets, family = await _flow(running)
    events = await running.store.list_audit_events()
    by_name: dict[str, list[AuditEvent]] = {}
    for event in events:
        by_name.setdefault(event.event, []).append(event)

    first = by_name["login_succeeded"][0]
    assert (first.username, first.client_addr, first.request_id) == (
        "alice",
        "127.0.0.1",
        REQUEST_ID,
    )
    reasons = [(e.username, e.details["reason"]) for e in by_name["login_failed"]]
    assert reasons[:2] == [("alice", "bad_password"), (None, "unknown_user")]
    assert [e.details["family_id"] for e in by_name["refreshed"]] == [family]
    (reuse,) = by_name["refresh_reuse_detected"]
    assert reuse.details["family_id"] == family and reuse.username == "alice"
    assert len(by_name["revoked"]) == 1 and len(by_name["logged_out"]) == 1
    throttled = by_name["login_throttled"][-1]
    assert throttled.username == "alice" and throttled.client_addr == "127.0.0.1"
    for event in events:
        assert event.at > 0 and event.request_id, event
    assert_no_secret(repr(events), secrets)

    audit_records = [vars(r) for r in caplog.records if r.name == "authserver.audit"]
    assert [r["event"] for r in audit_records] == [e.event for e in events]
    warnings = {"refresh_reuse_detected", "login_throttled"}
    for record in audit_records:
        assert record["client_addr"] == "127.0.0.1"
        assert record["request_id"]
        expected = logging.WARNING if record["event"] in warnings else logging.INFO
        assert record["levelno"] == expected, record["event"]
    reuse_record = next(r for r in audit_records if r["event"] == "refresh_reuse_detected")
    assert reuse_record["family_id"] == family
    everything = "\n".join(f"{r.getMessage()} {r.__dict__!r}" for r in caplog.records)
    assert_no_secret(everything, secrets)


async def test_audit_command_lists_and_filters(
    start_app: StartApp, database_url: str, keys_dir: Path
) -> None:
    running = await start_app(login_max_failures=3)
    await make_user(running.store, "alice")
    await make_user(running.store, "bob")
    secrets, family = await _flow(running)
    env = {"AUTHSERVER_DATABASE_URL": database_url, "AUTHSERVER_KEYS_DIR": str(keys_dir)}

    def operator(*args: str) -> None:
        result = CliRunner().invoke(cli_app, list(args), env=env)
        assert result.exit_code == 0, (result.output, result.exception)

    # The operator's own events: a user disabled, a key added and retired.
    await asyncio.to_thread(operator, "users", "disable", "bob")
    await asyncio.to_thread(operator, "keys", "generate")
    old_kid = (await running.client.get("/.well-known/jwks.json")).json()["keys"][0]["kid"]
    await asyncio.to_thread(operator, "keys", "retire", old_kid)

    rows = await asyncio.to_thread(cli, env, "audit", "--json")
    names = [row["event"] for row in rows]
    for expected in (
        "login_succeeded",
        "login_failed",
        "login_throttled",
        "refreshed",
        "refresh_reuse_detected",
        "revoked",
        "logged_out",
        "user_disabled",
        "key_added",
        "key_retired",
    ):
        assert expected in names, expected
    assert [row["at"] for row in rows] == sorted(row["at"] for row in rows)  # newest last
    retired = next(row for row in rows if row["event"] == "key_retired")
    assert retired["kid"] == old_kid
    assert next(row for row in rows if row["event"] == "user_disabled")["username"] == "bob"

    reuse = await asyncio.to_thread(
        cli, env, "audit", "--event", "refresh_reuse_detected", "--json"
    )
    assert [row["family_id"] for row in reuse] == [family]
    alice = await asyncio.to_thread(cli, env, "audit", "--user", "alice", "--json")
    assert alice and {row["username"] for row in alice} == {"alice"}
    # Usernames are case-insensitive here too.
    assert await asyncio.to_thread(cli, env, "audit", "--user", "ALICE", "--json") == alice
    bob_failures = await asyncio.to_thread(
        cli, env, "audit", "--user", "bob", "--event", "login_failed", "--json"
    )
    assert bob_failures == []
    assert await asyncio.to_thread(cli, env, "audit", "--since", "1h", "--json") == rows
    assert await asyncio.to_thread(cli, env, "audit", "--since", "2999-01-01", "--json") == []
    text = await asyncio.to_thread(CliRunner().invoke, cli_app, ["audit"], env=env)
    assert text.exit_code == 0
    assert "refresh_reuse_detected" in text.stdout and family in text.stdout
    assert_no_secret(text.stdout + json.dumps(rows), secrets)


def test_a_real_server_logs_json_lines_and_no_secret(tmp_path: Path) -> None:
    """`authserver serve`'s own stderr over a login/refresh/reuse flow."""
    keys = tmp_path / "keys"
    generate_key(keys)
    db = tmp_path / "audit.db"
    env = base_env(
        AUTHSERVER_DATABASE_URL=f"sqlite:///{db}",
        AUTHSERVER_KEYS_DIR=str(keys),
        AUTHSERVER_LOGIN_MAX_FAILURES="2",
    )
    added = run_cli(
        ["users", "add", "alice", "--password-stdin"],
        env,
        cwd=tmp_path,
        stdin=DEFAULT_PASSWORD + "\n",
    )
    assert added.returncode == 0, added.stderr
    secrets = [DEFAULT_PASSWORD, WRONG_PASSWORD, *private_key_lines(keys)]
    with ServerPool(tmp_path) as pool:
        server = pool.start(env)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            creds = {"username": "alice", "password": DEFAULT_PASSWORD}
            first = client.post("/login", json=creds, headers={"X-Request-ID": REQUEST_ID}).json()
            second = client.post("/refresh", json={"refresh_token": first["refresh_token"]}).json()
            reuse = client.post("/refresh", json={"refresh_token": first["refresh_token"]})
            assert reuse.status_code == 401
            protected = client.get(
                "/protected", headers={"Authorization": f"Bearer {second['access_token']}"}
            )
            assert protected.status_code == 200
            # A careless client puts a token in the URL: it must not reach the log either.
            client.get("/protected", params={"access_token": second["access_token"]})
            for _ in range(2):
                client.post("/login", json={"username": "alice", "password": WRONG_PASSWORD})
            assert client.post("/login", json=creds).status_code == 429
            secrets += [first[k] for k in ("access_token", "refresh_token")]
            secrets += [second[k] for k in ("access_token", "refresh_token")]
        server.stop()
        log = server.log()

    records = []
    for line in log.splitlines():
        record = json.loads(line)  # one JSON object per line, nothing else
        assert isinstance(record, dict), line
        records.append(record)
    events = {r["event"]: r for r in records if "event" in r}
    for name in (
        "login_succeeded",
        "refreshed",
        "refresh_reuse_detected",
        "login_failed",
        "login_throttled",
    ):
        record = events[name]
        assert record["time"] and record["client_addr"] == "127.0.0.1", record
        assert record["request_id"], record
    assert events["login_succeeded"]["username"] == "alice"
    assert events["login_succeeded"]["request_id"] == REQUEST_ID
    assert events["refresh_reuse_detected"]["level"] == "WARNING"
    assert events["refresh_reuse_detected"]["family_id"] == events["login_succeeded"]["family_id"]
    assert events["login_failed"]["reason"] == "bad_password"
    assert_no_secret(log, secrets)

    # Nothing secret in the database either: not in audit rows, not anywhere in the file.
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT * FROM audit_events").fetchall()
    assert len(rows) >= 6
    assert_no_secret(repr(rows), secrets)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("audit.db*"))
    assert_no_secret(raw.decode("latin-1"), secrets)


def test_the_text_log_format_keeps_the_fields(tmp_path: Path) -> None:
    """AUTHSERVER_LOG_FORMAT=text is for people, but says as much as the JSON lines."""
    keys = tmp_path / "keys"
    generate_key(keys)
    env = base_env(
        AUTHSERVER_DATABASE_URL=f"sqlite:///{tmp_path / 'text.db'}",
        AUTHSERVER_KEYS_DIR=str(keys),
        AUTHSERVER_LOG_FORMAT="text",
    )
    with ServerPool(tmp_path) as pool:
        server = pool.start(env)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            r = client.post("/login", json={"username": "nobody", "password": WRONG_PASSWORD})
            assert r.status_code == 401
        server.stop()
        log = server.log()
    (line,) = [line for line in log.splitlines() if "login_failed" in line]
    assert not line.startswith("{"), line
    for field in ("event=login_failed", "reason=unknown_user", "client_addr=127.0.0.1"):
        assert field in line, line
    assert_no_secret(log, [WRONG_PASSWORD])


def test_audit_event_names_are_a_closed_set(tmp_path: Path) -> None:
    """A typo in --event is refused with the list, not answered with silence; and code
    cannot emit a name the set (and so the README) does not have."""
    env = base_env(
        AUTHSERVER_DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}",
        AUTHSERVER_KEYS_DIR=str(tmp_path / "keys"),
    )
    result = CliRunner().invoke(cli_app, ["audit", "--event", "reuse_detected"], env=env)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "unknown event 'reuse_detected'" in lines[0]
    assert all(name in lines[0] for name in audit.EVENTS)
    assert not (tmp_path / "a.db").exists()  # refused before touching the database
    with pytest.raises(ValueError, match="audit.EVENTS"):
        audit.Auditor(cast(Any, None)).build("made_up", audit.CLI)


async def test_a_client_token_issued_is_logged_at_debug_only(
    start_app: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_app()
    _, secret = await make_client(running.store, "svc")
    assert secret is not None

    async def issued() -> list[logging.LogRecord]:
        caplog.clear()
        r = await running.client.post(
            "/token", data={"grant_type": "client_credentials"}, auth=("svc", secret)
        )
        assert r.status_code == 200, r.text
        return [r for r in caplog.records if r.getMessage() == "client_token_issued"]

    caplog.set_level(logging.INFO, logger="authserver")
    assert await issued() == []
    caplog.set_level(logging.DEBUG, logger="authserver")
    (record,) = await issued()
    assert record.levelno == logging.DEBUG
    assert vars(record)["client_id"] == "svc"
    assert await running.store.list_audit_events(event="client_token_issued") == []
