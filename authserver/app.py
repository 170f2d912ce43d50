"""Wiring: `create_app(settings)` builds the services and the FastAPI application.

What the pieces do lives elsewhere: the routes, middleware and exception
handlers in `api/`, key bootstrap in `keys.py`, the background jobs in `jobs.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from authserver import __version__
from authserver.api import (
    authorize,
    docs,
    health,
    introspect,
    protected,
    sessions,
    token,
    wellknown,
)
from authserver.api.deps import Services
from authserver.api.errors import install_error_handlers
from authserver.api.middleware import HeadAsGet, SecurityHeaders
from authserver.audit import Auditor
from authserver.authorize import Authorizer
from authserver.clients import ClientAuthenticator, ClientService
from authserver.config import Settings
from authserver.dpop import Nonces, ProofChecker, StoreReplayCache
from authserver.grants import AuthService, TokenPolicy
from authserver.introspection import Introspector
from authserver.jobs import start_jobs, stop_jobs
from authserver.keys import KeyRing, ensure_signing_key
from authserver.logs import configure_logging
from authserver.metrics import HttpMetrics
from authserver.password_policy import PasswordPolicy
from authserver.passwords import PasswordHasher
from authserver.refresh import Lifetimes
from authserver.resource import TokenValidator
from authserver.responses import JSON
from authserver.serving import set_header_timeout, settle_heap
from authserver.sessions import SessionService
from authserver.store.migrate import upgrade_async
from authserver.store.sql import SqlStore
from authserver.throttle import LoginThrottle, ThrottleLimits
from authserver.tokens import AccessTokenVerifier, KeyRingSource
from authserver.users import UserService


def _proof_checker(settings: Settings, store: SqlStore, keyring: KeyRing) -> ProofChecker:
    nonces = None
    if settings.dpop_nonce:
        derived: dict[int, list[bytes]] = {}

        def secrets() -> list[bytes]:
            # Derived from the signing keys: every process sharing the keys directory
            # makes and accepts the same nonces, and a key rotation changes them.
            known = derived.get(keyring.generation)
            if known is None:
                derived.clear()
                known = derived[keyring.generation] = keyring.derived_secrets("dpop-nonce")
            return known

        nonces = Nonces(secrets, lifetime=settings.dpop_proof_window)
    return ProofChecker(
        replay=StoreReplayCache(store),
        window=settings.dpop_proof_window,
        nonces=nonces,
        # Behind a proxy the issuer is the URL clients see.
        base_url=settings.issuer,
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
    hasher = PasswordHasher(rounds=settings.bcrypt_rounds, threads=settings.bcrypt_threads)
    throttle = LoginThrottle(
        store,
        ThrottleLimits(
            max_failures=settings.login_max_failures,
            max_failures_per_user=settings.login_max_failures_per_user,
            max_failures_per_address=settings.login_max_failures_per_address,
            window=settings.login_window,
            known_address_ttl=settings.login_known_address_ttl,
        ),
    )
    auth = AuthService(
        store=store,
        hasher=hasher,
        keys=source,
        auditor=auditor,
        throttle=throttle,
        policy=policy,
    )
    clients = ClientService(
        store=store, auditor=auditor, scopes=settings.scopes, issuer=settings.issuer
    )
    verifier = AccessTokenVerifier(source, issuer=settings.issuer, audience=settings.audience)
    return Services(
        auth=auth,
        authorizer=Authorizer(
            store=store,
            clients=clients,
            auditor=auditor,
            issuer=settings.issuer,
            scopes=settings.scopes,
            session_max_age=settings.session_max_age,
        ),
        users=UserService(
            store=store,
            hasher=hasher,
            auditor=auditor,
            policy=PasswordPolicy(min_length=settings.password_min_length),
        ),
        clients=clients,
        client_auth=ClientAuthenticator(clients=clients, throttle=throttle, issuer=settings.issuer),
        introspector=Introspector(
            verifier=AccessTokenVerifier(source, issuer=settings.issuer, audience=None),
            store=store,
            clients=clients,
        ),
        sessions=SessionService(store=store, auditor=auditor),
        store=store,
        keyring=keyring,
        verifier=verifier,
        validator=TokenValidator(verifier),
        dpop=_proof_checker(settings, store, keyring),
        issuer=settings.issuer,
        scopes=settings.scopes,
    )


# FastAPI's OpenTelemetry, turned off: it would otherwise look for configured providers
# on every request (`AUTHSERVER_OPENTELEMETRY` turns it on).
_NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def create_app(
    settings: Settings | None = None, *, started: Callable[[], None] | None = None
) -> FastAPI:
    """Build the application; the store and keys are opened by its lifespan, which calls
    `started` once everything is open (a server process tunes itself there)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Keys first: a refused key file stops startup before any connection is opened.
        await asyncio.to_thread(ensure_signing_key, settings.keys_dir)
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
        jobs = start_jobs(
            store=store,
            keyring=keyring,
            hasher=services.auth.hasher,
            keys_reload_interval=settings.keys_reload_interval,
            purge_interval=settings.purge_interval,
            login_window=settings.login_window,
            known_address_ttl=settings.login_known_address_ttl,
        )
        if started is not None:
            started()
        try:
            yield
        finally:
            await stop_jobs(jobs)
            services.auth.hasher.close()
            await store.close()

    app = FastAPI(
        title="authserver",
        version=__version__,
        description=(
            "Password login, browser sign-in (authorization code with PKCE, OpenID Connect), "
            "rotating refresh tokens, JWT access tokens, JWKS."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        default_response_class=JSON,
        swagger_ui_oauth2_redirect_url=None,
        telemetry=None if settings.opentelemetry else _NO_TELEMETRY,
    )
    install_error_handlers(app)
    # Routes are matched in order: the hot ones first (/protected, the hottest GET, then
    # the token endpoints and introspection), the browser's pages after them. They go
    # into the app's own list as they are: `include_router` would wrap each router in a
    # route of its own whose matching cost ~30 µs a request more than these routes'
    # own (measured on /health/live), and these routers add nothing to include (no
    # prefix, no dependencies; each route already carries its tags and responses).
    for router in (
        protected.router,
        token.router,
        introspect.router,
        authorize.router,
        sessions.router,
        wellknown.router,
        health.router,
    ):
        app.router.routes.extend(router.routes)
    docs.install_docs(app, scopes=settings.scopes)
    if settings.metrics_port is not None:
        # Innermost, so that the scope it reads the matched route from is the router's own.
        app.add_middleware(HttpMetrics)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(HeadAsGet)
    if settings.trusted_proxies:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(settings.trusted_proxies))
    return app


def app_factory() -> Any:
    """For `uvicorn --factory authserver.app:app_factory`: settings from the environment.

    Each worker process calls this, so it also sets up that process's logging, the
    header timeout of its connections and, once started, its garbage collector.
    """
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    set_header_timeout(settings.header_timeout)
    return create_app(settings, started=settle_heap)
