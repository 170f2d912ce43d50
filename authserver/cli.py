"""The `authserver` command: serve, users, clients, keys, db, audit.

Operator mistakes (an unknown user, an unreadable key file, an unreachable
database) end with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from authserver import audit
from authserver.audit import CLI, Auditor
from authserver.clients import (
    BUILTIN_CLIENT_ID,
    GRANTS,
    ClientError,
    ClientService,
    Registration,
    describe,
    parse_jwks,
)
from authserver.config import Settings
from authserver.jobs import Purged, purge
from authserver.keys import (
    ALGORITHMS,
    KeyFileError,
    KeyRing,
    SigningKey,
    ensure_signing_key,
    generate_key,
    key_files,
)
from authserver.logs import configure_logging
from authserver.password_policy import PasswordPolicy
from authserver.passwords import PasswordHasher, PasswordPolicyError
from authserver.sessions import SessionService
from authserver.store.protocol import StoreError, UpgradeRefused
from authserver.store.sql import SqlStore
from authserver.users import (
    UserError,
    UserExistsError,
    UserService,
    normalize_username,
    validate_username,
)

T = TypeVar("T")


def _plain_help() -> None:
    """typer 0.2x's help puts a type placeholder after every parameter (`<str>`, `<bool>`,
    even after a flag that takes no value) and braces round a required argument (`{name}`).
    People read `--port PORT` and `NAME` better: a value's name in capitals, a flag bare."""
    from typer import core

    def option_metavar(self: core.TyperOption, ctx: object) -> str | None:
        del ctx
        if self.is_flag or self.count:
            return None
        return self.metavar or (self.name or "value").upper()

    def argument_usage(self: core.TyperArgument) -> str:
        name = self.display_name_raw.upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    core.TyperOption.display_type_rich = option_metavar  # type: ignore[method-assign]
    core.TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]
    core.TyperArgument._usage_display_name = argument_usage  # type: ignore[method-assign]


_plain_help()
app = typer.Typer(
    help="authserver: password login, rotating refresh tokens, JWT access tokens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
users_app = typer.Typer(help="Manage users.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage signing keys.", no_args_is_help=True)
db_app = typer.Typer(help="Manage the database.", no_args_is_help=True)
clients_app = typer.Typer(help="Manage the client registry.", no_args_is_help=True)
sessions_app = typer.Typer(help="List and end users' sessions.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(sessions_app, name="sessions")
app.add_typer(clients_app, name="clients")
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")


@app.callback()
def _log_to_stderr(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also log what went right (INFO lines).")
    ] = False,
) -> None:
    """Commands print their answer on stdout; the log (stderr) shows only warnings and
    errors unless --verbose. `serve` sets up its own log, at AUTHSERVER_LOG_LEVEL."""
    # A bad configuration is reported by the command itself, in one line.
    with contextlib.suppress(ValidationError, UnicodeDecodeError):
        cfg = Settings()
        level = cfg.log_level if verbose else _at_least_warning(cfg.log_level)
        configure_logging(cfg.log_format, level)


def _at_least_warning(level: str) -> str:
    return level if logging.getLevelName(level) >= logging.WARNING else "WARNING"


DEMO_USER, DEMO_PASSWORD = "testuser", "testpassword"


class OperatorError(Exception):
    """A problem to report in one line."""


def fail(message: str) -> NoReturn:
    typer.echo(f"authserver: error: {message}", err=True)
    raise typer.Exit(1)


def settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        name = "AUTHSERVER_" + "_".join(str(p) for p in err["loc"]).upper()
        raise OperatorError(f"invalid configuration: {name}: {err['msg']}") from exc
    except UnicodeDecodeError as exc:
        raise OperatorError("cannot read the .env file: it is not UTF-8 text") from exc


@contextlib.contextmanager
def operator_errors() -> Iterator[None]:
    """Turn every expected failure into one line and exit status 1."""
    try:
        yield
    except OperatorError as exc:
        fail(str(exc))
    except (KeyFileError, UpgradeRefused) as exc:
        fail(str(exc))
    except (StoreError, SQLAlchemyError, OSError) as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        fail(f"database error: {detail[0] if detail else type(exc).__name__}")


def _check_sqlite_path(cfg: Settings) -> None:
    """SQLite's own words for a missing or read-only directory ("unable to open database
    file") name no path: name it, and what to do."""
    database = make_url(cfg.database_url).database
    if not cfg.is_sqlite or not database:
        return
    path = Path(database)
    where = path.resolve().parent
    if not where.is_dir():
        raise OperatorError(
            f"the database directory {where} does not exist: create it, or point "
            "AUTHSERVER_DATABASE_URL elsewhere"
        )
    if not os.access(where, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OperatorError(
            f"cannot write the database {path.resolve()}: give this user write access to it "
            "and its directory, or point AUTHSERVER_DATABASE_URL elsewhere"
        )


async def _connect(cfg: Settings, store: SqlStore) -> None:
    """One connection first, so that an unreachable PostgreSQL is named as such."""
    try:
        async with store.engine.connect():
            pass
    except (OSError, SQLAlchemyError) as exc:
        if cfg.is_sqlite:
            raise
        url = make_url(cfg.database_url)
        cause = getattr(exc, "orig", None) or exc
        if isinstance(cause, ConnectionRefusedError):
            reason = "connection refused"
        elif isinstance(cause, TimeoutError):
            reason = "no answer"
        else:
            lines = str(cause).strip().splitlines()
            reason = lines[0] if lines else type(cause).__name__
        where = f"{url.host or 'localhost'}:{url.port or 5432}"
        raise OperatorError(
            f"cannot connect to the PostgreSQL database at {where}: "
            f"{reason}. Is it running, and is AUTHSERVER_DATABASE_URL right? (connect timeout "
            f"{cfg.database_connect_timeout:g} s: AUTHSERVER_DATABASE_CONNECT_TIMEOUT)"
        ) from exc


def run_with_store(cfg: Settings, work: Callable[[SqlStore], Awaitable[T]]) -> T:
    _check_sqlite_path(cfg)

    async def run() -> T:
        from authserver.store.migrate import upgrade_async

        store = SqlStore.from_settings(cfg)
        try:
            await _connect(cfg, store)
            await upgrade_async(store.engine)
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def run_with_users(
    cfg: Settings,
    work: Callable[[UserService], Awaitable[T]],
    *,
    policy: PasswordPolicy | None = None,
) -> T:
    """Run `work` with the users service over the configured store; its errors in one line."""

    async def with_users(store: SqlStore) -> T:
        hasher = PasswordHasher(rounds=cfg.bcrypt_rounds, threads=1)
        try:
            service = UserService(
                store=store,
                hasher=hasher,
                auditor=Auditor(store),
                policy=policy or PasswordPolicy(min_length=cfg.password_min_length),
            )
            return await work(service)
        except PasswordPolicyError as exc:
            raise OperatorError(f"password refused: {exc}") from exc
        except UserError as exc:
            raise OperatorError(str(exc)) from exc
        finally:
            hasher.close()

    return run_with_store(cfg, with_users)


def read_password(password_stdin: bool) -> str:
    if password_stdin:
        # One line, without its line ending (LF or CRLF): the rest is the password.
        return sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


# -- serve ---------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes.")] = 1,
    demo: Annotated[bool, typer.Option(help="Create the demo user testuser/testpassword.")] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve Prometheus metrics at /metrics on this port, on AUTHSERVER_METRICS_HOST "
            "(default 127.0.0.1). Default: AUTHSERVER_METRICS_PORT, else off.",
        ),
    ] = None,
) -> None:
    """Run the server (uvicorn), after applying migrations and loading the keys."""
    from authserver import serving

    if metrics_port is not None:
        # The workers read their settings from the environment, as this process does.
        os.environ["AUTHSERVER_METRICS_PORT"] = str(metrics_port)
    with operator_errors():
        cfg = settings()
        try:
            serving.check_port(host, port)
        except serving.PortInUse as exc:
            raise OperatorError(str(exc)) from exc
        # The database first, at the commands' log level: a mistake there is one line.
        run_with_store(cfg, lambda store: store.ping())
        configure_logging(cfg.log_format, cfg.log_level)
        logging.getLogger("authserver").info(
            "database ready",
            extra={"database": make_url(cfg.database_url).render_as_string(hide_password=True)},
        )
        ensure_signing_key(cfg.keys_dir)
        KeyRing(cfg.keys_dir, allow_insecure=cfg.allow_insecure_key_files).load()
        if demo:
            # The demo user keeps the README's password under a raised minimum length too
            # (it is never a production account: serve --demo says so on every start).
            run_with_users(cfg, _create_demo_user, policy=PasswordPolicy())
    metrics = (
        serving.MetricsListener(host=cfg.metrics_host, port=cfg.metrics_port)
        if cfg.metrics_port is not None
        else None
    )
    try:
        serving.run(
            host=host,
            port=port,
            workers=workers,
            max_connections=cfg.max_connections,
            metrics=metrics,
        )
    except serving.MetricsListenerError as exc:
        fail(str(exc))


async def _create_demo_user(users: UserService) -> None:
    log = logging.getLogger("authserver")
    created = False
    if await users.get(DEMO_USER) is None:
        try:
            await users.create(CLI, DEMO_USER, DEMO_PASSWORD, demo=True)
            created = True
        except UserExistsError:
            pass  # another instance starting at the same moment created it
    # Every start in demo mode says so: the password is in the README.
    log.warning(
        "DEMO MODE: %s the demo user %r, whose password is printed in the README. "
        "Anyone can log in as it: never use --demo in production.",
        "created" if created else "kept",
        DEMO_USER,
    )


# -- users -----------------------------------------------------------------------


@users_app.command("add")
def users_add(
    name: str,
    password_stdin: Annotated[bool, typer.Option(help="Read the password from stdin.")] = False,
) -> None:
    """Create a user."""
    with operator_errors():
        try:
            validate_username(name)
        except UserError as exc:
            raise OperatorError(str(exc)) from exc
        cfg = settings()
        password = read_password(password_stdin)
        user = run_with_users(cfg, lambda users: users.create(CLI, name, password))
    typer.echo(f"created user {user.username}")


@users_app.command("passwd")
def users_passwd(
    name: str,
    password_stdin: Annotated[bool, typer.Option(help="Read the password from stdin.")] = False,
) -> None:
    """Set a user's password; the user's sessions are revoked."""
    with operator_errors():
        cfg = settings()

        async def exists(users: UserService) -> None:
            if await users.get(name) is None:
                raise OperatorError(f"unknown user {name!r}")

        run_with_users(cfg, exists)  # before asking for a password it could not use
        password = read_password(password_stdin)
        run_with_users(cfg, lambda users: users.set_password(CLI, name, password))
    typer.echo(f"password changed for {name}")


@users_app.command("disable")
def users_disable(name: str) -> None:
    """Disable a user and revoke every refresh token of theirs."""
    with operator_errors():
        run_with_users(settings(), lambda users: users.set_disabled(CLI, name, True))
    typer.echo(f"disabled {name}; their refresh tokens are revoked")


@users_app.command("enable")
def users_enable(name: str) -> None:
    """Enable a disabled user."""
    with operator_errors():
        run_with_users(settings(), lambda users: users.set_disabled(CLI, name, False))
    typer.echo(f"enabled {name}")


@users_app.command("list")
def users_list() -> None:
    """List users."""
    with operator_errors():
        users = run_with_users(settings(), lambda users: users.list())
    typer.echo(f"{'USERNAME':<32} {'STATUS':<9} CREATED")
    for user in users:
        created = datetime.fromtimestamp(user.created_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = "disabled" if user.disabled else "active"
        typer.echo(f"{user.username:<32} {status:<9} {created}")


# -- sessions ------------------------------------------------------------------------


def run_with_sessions(cfg: Settings, work: Callable[[SessionService], Awaitable[T]]) -> T:
    async def with_sessions(store: SqlStore) -> T:
        try:
            return await work(SessionService(store=store, auditor=Auditor(store)))
        except UserError as exc:
            raise OperatorError(str(exc)) from exc

    return run_with_store(cfg, with_sessions)


def _sessions(count: int) -> str:
    """How many sessions a command ended ("1 session", "3 sessions"), said the same way
    by `sessions revoke` and `clients remove`."""
    return f"{count} session{'' if count == 1 else 's'}"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@sessions_app.command("list")
def sessions_list(user: str) -> None:
    """List a user's live sessions: id, client, created, last used, expires, address, agent."""
    with operator_errors():
        sessions = run_with_sessions(settings(), lambda s: s.list_of(user))
    typer.echo(
        f"{'ID':<36} {'CLIENT':<20} {'CREATED':<20} {'LAST USED':<20} {'EXPIRES':<20} "
        f"{'IP':<15} USER AGENT"
    )
    for s in sessions:
        typer.echo(
            f"{s.id:<36} {s.client_id:<20} {_utc(s.created_at):<20} {_utc(s.last_used_at):<20} "
            f"{_utc(s.expires_at):<20} {s.ip or '-':<15} {s.user_agent or '-'}"
        )


@sessions_app.command("revoke")
def sessions_revoke(
    session_id: Annotated[str | None, typer.Argument(help="The session to end.")] = None,
    user: Annotated[str | None, typer.Option(help="End every session of this user.")] = None,
) -> None:
    """End a session (SESSION_ID), or every session of a user (--user USER)."""
    with operator_errors():
        if (session_id is None) == (user is None):
            raise OperatorError("name a session id or --user USER (one of them)")
        cfg = settings()
        if user is not None:
            ended = run_with_sessions(cfg, lambda s: s.end_all(CLI, user))
            message = f"ended {_sessions(ended)} of {normalize_username(user) or user}"
        else:
            assert session_id is not None
            session = run_with_sessions(cfg, lambda s: s.end(CLI, session_id))
            if session is None:
                raise OperatorError(f"no live session {session_id!r}")
            message = f"ended session {session.id} of {session.username}"
    typer.echo(message)


# -- clients ---------------------------------------------------------------------


def run_with_clients(cfg: Settings, work: Callable[[ClientService], Awaitable[T]]) -> T:
    """Run `work` with the client registry over the configured store; its errors in one line."""

    async def with_clients(store: SqlStore) -> T:
        service = ClientService(store=store, auditor=Auditor(store), scopes=cfg.scopes)
        try:
            return await work(service)
        except ClientError as exc:
            raise OperatorError(str(exc)) from exc

    return run_with_store(cfg, with_clients)


@clients_app.command("add")
def clients_add(
    client_id: str,
    public: Annotated[
        bool, typer.Option("--public", help="No secret: a browser or mobile app.")
    ] = False,
    grant: Annotated[
        list[str] | None,
        typer.Option(help=f"A grant it may use ({', '.join(GRANTS)}); repeatable."),
    ] = None,
    scope: Annotated[
        list[str] | None, typer.Option(help="A scope it may ask for; repeatable.")
    ] = None,
    redirect_uri: Annotated[
        list[str] | None, typer.Option(help="A redirect URI, matched exactly; repeatable.")
    ] = None,
    post_logout_redirect_uri: Annotated[
        list[str] | None, typer.Option(help="Where /end-session may send it back; repeatable.")
    ] = None,
    audience: Annotated[str | None, typer.Option(help="`aud` of its tokens.")] = None,
    name: Annotated[str | None, typer.Option(help="The name people see.")] = None,
    third_party: Annotated[
        bool, typer.Option("--third-party", help="Ask users for consent.")
    ] = False,
    jwks_file: Annotated[
        Path | None, typer.Option(help="Its public keys: it authenticates with private_key_jwt.")
    ] = None,
    require_dpop: Annotated[
        bool, typer.Option("--require-dpop", help="Its tokens must be DPoP-bound.")
    ] = False,
) -> None:
    """Register a client; a confidential one's generated secret is printed once."""
    with operator_errors():
        cfg = settings()
        jwks = None
        if jwks_file is not None:
            try:
                jwks = parse_jwks(jwks_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                raise OperatorError(f"cannot read {jwks_file}: {exc}") from exc
            except ClientError as exc:
                raise OperatorError(f"{jwks_file}: {exc}") from exc
        registration = Registration(
            client_id=client_id,
            public=public,
            grants=tuple(grant or ()),
            scopes=tuple(scope or ()),
            redirect_uris=tuple(redirect_uri or ()),
            post_logout_redirect_uris=tuple(post_logout_redirect_uri or ()),
            audience=audience,
            name=name,
            third_party=third_party,
            jwks=jwks,
            require_dpop=require_dpop,
        )
        client, secret = run_with_clients(cfg, lambda c: c.register(CLI, registration))
    if secret is not None:
        # The only line on standard output: `SECRET=$(authserver clients add ...)` works.
        typer.echo(secret)
    kind = "public" if client.public else "confidential"
    typer.echo(
        f"registered {kind} client {client.client_id} (grants: {' '.join(client.grants)})"
        + ("; its secret is shown above, once" if secret else ""),
        err=True,
    )


@clients_app.command("list")
def clients_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List clients: id, type, grants, scopes, redirect URIs, created, disabled."""
    with operator_errors():
        clients = run_with_clients(settings(), lambda c: c.list())
    if as_json:
        for client in clients:
            typer.echo(json.dumps(describe(client)))
        return
    typer.echo(f"{'CLIENT_ID':<24} {'TYPE':<13} {'GRANTS':<40} {'SCOPES':<16} CREATED    DISABLED")
    for client in clients:
        created = (
            "built-in"
            if client.client_id == BUILTIN_CLIENT_ID
            else datetime.fromtimestamp(client.created_at, UTC).strftime("%Y-%m-%d")
        )
        scopes = " ".join(client.scopes) if client.scopes is not None else "(all)"
        kind = "public" if client.public else "confidential"
        typer.echo(
            f"{client.client_id:<24} {kind:<13} {' '.join(client.grants):<40} {scopes:<16} "
            f"{created} {'yes' if client.disabled else 'no'}"
        )
        for uri in client.redirect_uris:
            typer.echo(f"{'':<24} redirect {uri}")


@clients_app.command("rotate-secret")
def clients_rotate_secret(
    client_id: str,
    grace: Annotated[int, typer.Option(min=0, help="Seconds the old secret keeps working.")] = 0,
) -> None:
    """Print a new secret; the old one still works for the grace period."""
    with operator_errors():
        secret = run_with_clients(
            settings(), lambda c: c.rotate_secret(CLI, client_id, grace=grace)
        )
    typer.echo(secret)


@clients_app.command("disable")
def clients_disable(client_id: str) -> None:
    """Disable a client: it cannot authenticate, and its refresh tokens are refused."""
    with operator_errors():
        run_with_clients(settings(), lambda c: c.set_disabled(CLI, client_id, True))
    typer.echo(f"disabled client {client_id}")


@clients_app.command("enable")
def clients_enable(client_id: str) -> None:
    """Enable a disabled client."""
    with operator_errors():
        run_with_clients(settings(), lambda c: c.set_disabled(CLI, client_id, False))
    typer.echo(f"enabled client {client_id}")


@clients_app.command("remove")
def clients_remove(client_id: str) -> None:
    """Delete a client and revoke every refresh family issued to it."""
    with operator_errors():
        revoked = run_with_clients(settings(), lambda c: c.remove(CLI, client_id))
    typer.echo(f"removed client {client_id}; revoked {_sessions(revoked)}")


# -- keys ------------------------------------------------------------------------


def _audit_key(cfg: Settings, event: str, key: SigningKey) -> None:
    """Store a key event; the key change stands even if the database is unreachable."""
    try:
        run_with_store(
            cfg,
            lambda store: Auditor(store).record(
                event, CLI, kid=key.kid, alg=key.alg, file=key.path.name
            ),
        )
    except (StoreError, SQLAlchemyError, OSError) as exc:
        typer.echo(f"authserver: warning: {event} not stored in the audit trail: {exc}", err=True)


@keys_app.command("generate")
def keys_generate(
    alg: Annotated[str, typer.Option(help="RS256 or ES256.")] = "RS256",
) -> None:
    """Write a new private key (mode 0600); it becomes the signing key."""
    with operator_errors():
        if alg not in ALGORITHMS:
            raise OperatorError(f"unsupported algorithm {alg!r}; use {' or '.join(ALGORITHMS)}")
        cfg = settings()
        key = generate_key(cfg.keys_dir, alg)
        _audit_key(cfg, audit.KEY_ADDED, key)
    typer.echo(f"generated {key.alg} key {key.kid} in {key.path}")


@keys_app.command("list")
def keys_list() -> None:
    """List keys: kid, algorithm, creation time, and which one signs."""
    with operator_errors():
        cfg = settings()
        ring = KeyRing(cfg.keys_dir, allow_insecure=cfg.allow_insecure_key_files)
        ring.load()
    if not ring.keys:
        typer.echo(f"no keys in {cfg.keys_dir}")
        return
    typer.echo(f"{'KID':<45} {'ALG':<6} {'CREATED':<21} SIGNING")
    signing = ring.signing_key.kid
    for key in ring.keys:
        created = key.created.strftime("%Y-%m-%dT%H:%M:%SZ")
        mark = "yes" if key.kid == signing else ""
        typer.echo(f"{key.kid:<45} {key.alg:<6} {created:<21} {mark}")


@keys_app.command("retire")
def keys_retire(kid: str) -> None:
    """Remove a key: tokens it signed stop verifying."""
    with operator_errors():
        cfg = settings()
        ring = KeyRing(cfg.keys_dir, allow_insecure=True)
        ring.load()
        key = ring.get(kid)
        if key is None:
            raise OperatorError(f"no key with kid {kid!r} in {cfg.keys_dir}")
        # The same key copied into two files is one key: retiring it removes both.
        copies = [k for k in ring.keys if k.kid == kid]
        if len(key_files(cfg.keys_dir)) == len(copies):
            raise OperatorError("refusing to retire the only key: generate a new one first")
        for copy in copies:
            copy.path.unlink()
        _audit_key(cfg, audit.KEY_RETIRED, key)
    typer.echo(f"retired key {kid}")


# -- db ----------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply schema migrations."""
    with operator_errors():
        run_with_store(settings(), lambda store: store.ping())
    typer.echo("database is up to date")


@db_app.command("purge")
def db_purge() -> None:
    """Delete what can no longer matter: dead refresh families, old login failures, networks
    and client-assertion ids."""
    with operator_errors():
        cfg = settings()

        def work(store: SqlStore) -> Awaitable[Purged]:
            return purge(
                store,
                now=time.time(),
                login_window=cfg.login_window,
                known_address_ttl=cfg.login_known_address_ttl,
            )

        purged = run_with_store(cfg, work)
    for line in purged.describe():
        typer.echo(line)


# -- audit -------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(value: str) -> float:
    """`2026-11-25`, `2026-11-25T10:00:00Z`, a Unix time, or an age like `30m`, `2h`, `7d`."""
    value = value.strip()
    match = _RELATIVE.fullmatch(value)
    if match:
        return time.time() - int(match[1]) * _UNITS[match[2]]
    with contextlib.suppress(ValueError):
        unix = float(value)
        if math.isfinite(unix):  # not nan or inf, which match nothing
            return unix
    try:
        when = datetime.fromisoformat(value)
    except ValueError as exc:
        raise OperatorError(
            f"cannot read --since {value[:40]!r}: use an ISO date/time, a Unix time, or 30m/2h/7d"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@app.command("audit")
def audit_list(
    user: Annotated[str | None, typer.Option(help="Only this user's events.")] = None,
    event: Annotated[
        str | None, typer.Option(help="Only this event (the README lists them).")
    ] = None,
    since: Annotated[str | None, typer.Option(help="ISO time, Unix time or 30m/2h/7d.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many (the newest).")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List security events, newest last."""
    with operator_errors():
        if event is not None and event not in audit.EVENTS:
            raise OperatorError(f"unknown event {event!r}; the events: {', '.join(audit.EVENTS)}")
        cfg = settings()
        since_ts = parse_when(since) if since else None
        events = run_with_store(
            cfg,
            lambda store: store.list_audit_events(
                # Events name users as stored: `Alice` finds alice's.
                username=(normalize_username(user) or user) if user is not None else None,
                event=event,
                since=since_ts,
                limit=limit,
            ),
        )
    for ev in events:
        at = datetime.fromtimestamp(ev.at, UTC).isoformat(timespec="milliseconds")
        if as_json:
            row = {
                "at": at,
                "event": ev.event,
                "username": ev.username,
                "client_addr": ev.client_addr,
                "request_id": ev.request_id,
                **ev.details,
            }
            typer.echo(json.dumps(row, default=str))
        else:
            details = " ".join(f"{k}={v}" for k, v in ev.details.items() if v is not None)
            typer.echo(
                f"{at} {ev.event:<24} user={ev.username or '-'} "
                f"addr={ev.client_addr or '-'} {details}".rstrip()
            )


def main() -> None:
    app()
