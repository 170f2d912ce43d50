"""`create_app(settings)`: the FastAPI application and its services."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from authserver import __version__
from authserver.api import docs, health, protected, token, wellknown
from authserver.api.deps import Services
from authserver.api.errors import install_error_handlers
from authserver.audit import Auditor
from authserver.config import Settings
from authserver.grants import AuthService, TokenPolicy
from authserver.keys import KeyFileError, KeyRing, generate_key, key_files
from authserver.logs import configure_logging
from authserver.passwords import PasswordHasher
from authserver.refresh import Lifetimes
from authserver.resource import TokenValidator
from authserver.responses import JSON
from authserver.store.migrate import upgrade_async
from authserver.store.sql import SqlStore
from authserver.throttle import LoginThrottle
from authserver.tokens import AccessTokenVerifier, KeyRingSource

log = logging.getLogger("authserver")


def ensure_signing_key(settings: Settings) -> None:
    """Generate a key if the directory has none; a lock stops concurrent starters doubling up."""
    try:
        settings.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = open(settings.keys_dir / ".lock", "a")  # closed by the with below
    except OSError as exc:
        raise KeyFileError(
            f"cannot use keys directory {settings.keys_dir}: {exc.strerror or exc}"
        ) from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not key_files(settings.keys_dir):
            key = generate_key(settings.keys_dir)
            log.warning(
                "keys directory was empty: generated a new signing key",
                extra={"kid": key.kid, "alg": key.alg, "file": str(key.path)},
            )


def build_services(settings: Settings, store: SqlStore, keyring: KeyRing) -> Services:
    auditor = Auditor(store)
    source = KeyRingSource(keyring)
    policy = TokenPolicy(
        issuer=settings.issuer,
        audience=settings.audience,
        access_token_ttl=settings.access_token_ttl,
        scopes=settings.scopes,
        lifetimes=Lifetimes(
            refresh_ttl=settings.refresh_token_ttl,
            session_max_age=settings.session_max_age,
            reuse_grace=settings.refresh_reuse_grace,
        ),
    )
    auth = AuthService(
        store=store,
        hasher=PasswordHasher(rounds=settings.bcrypt_rounds, threads=settings.bcrypt_threads),
        keys=source,
        auditor=auditor,
        throttle=LoginThrottle(
            store, max_failures=settings.login_max_failures, window=settings.login_window
        ),
        policy=policy,
    )
    verifier = AccessTokenVerifier(source, issuer=settings.issuer, audience=settings.audience)
    return Services(
        auth=auth,
        store=store,
        keyring=keyring,
        verifier=verifier,
        validator=TokenValidator(verifier),
        issuer=settings.issuer,
        scopes=settings.scopes,
    )


async def _every(interval: float, work: Callable[[], object], failure: str) -> None:
    """Run blocking `work` in a thread every `interval` seconds; a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(work)
        except Exception:
            log.exception(failure)


async def _housekeeping(services: Services, settings: Settings) -> None:
    while True:
        await asyncio.sleep(settings.purge_interval)
        now = time.time()
        try:
            purged = await services.store.purge_expired(now=now)
            await services.store.purge_login_failures(before=now - settings.login_window)
            if purged:
                log.info("purged expired refresh families", extra={"families": purged})
        except Exception:
            log.exception("housekeeping failed")


class HeadAsGet:
    """Answer HEAD as GET (RFC 9110 §9.3.2: every GET resource takes HEAD too).

    FastAPI routes declare GET alone. The app sees a copy of the scope saying GET,
    while the server's own scope still says HEAD, so it sends the headers only.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


class SecurityHeaders:
    """Adds `X-Content-Type-Options: nosniff` to every response (pure ASGI: cheap)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-content-type-options", b"nosniff"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application; the store and keys are opened by its lifespan."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Keys first: a refused key file stops startup before any connection is opened.
        await asyncio.to_thread(ensure_signing_key, settings)
        keyring = KeyRing(settings.keys_dir, allow_insecure=settings.allow_insecure_key_files)
        await asyncio.to_thread(keyring.load)
        store = SqlStore.from_settings(settings)
        try:
            await upgrade_async(store.engine)
        except BaseException:
            await store.close()
            raise
        services = build_services(settings, store, keyring)
        app.state.services = services
        tasks = [
            # The timing guard's dummy hash costs one bcrypt (~0.3 s at cost 12): make it
            # in the background rather than before listening; a login needing it waits.
            asyncio.create_task(services.auth.hasher.warm_up()),
            asyncio.create_task(
                _every(
                    settings.keys_reload_interval,
                    keyring.reload_if_changed,
                    "reloading the keys directory failed",
                )
            ),
            asyncio.create_task(_housekeeping(services, settings)),
            # SQLite's WAL checkpoint fsyncs: in a thread, it never stalls a request.
            asyncio.create_task(_every(1.0, store.checkpoint, "WAL checkpoint failed")),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            services.auth.hasher.close()
            await store.close()

    app = FastAPI(
        title="authserver",
        version=__version__,
        description="Password login, rotating refresh tokens, JWT access tokens, JWKS.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        default_response_class=JSON,
        swagger_ui_oauth2_redirect_url=None,
    )
    install_error_handlers(app)
    for router in (token.router, protected.router, wellknown.router, health.router):
        app.include_router(router)
    docs.install_docs(app, scopes=settings.scopes)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(HeadAsGet)
    if settings.trusted_proxies:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(settings.trusted_proxies))
    return app


def app_factory() -> Any:
    """For `uvicorn --factory authserver.app:app_factory`: settings from the environment.

    Each worker process calls this, so it also sets up that process's logging.
    """
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    return create_app(settings)
