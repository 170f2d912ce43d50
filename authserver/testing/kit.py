"""The testing kit's server: a real authserver on a free loopback port, in this process.

`AuthServerKit.start(directory)` runs the very app `authserver serve` runs
(`create_app`) under uvicorn, in a thread with its own event loop, over a
temporary SQLite file and a keys directory of its own, with bcrypt at its
cheapest cost. Its issuer is its own URL, so a resource server built with
`authserver.resource.TokenValidator.from_issuer(kit.issuer, audience=...)`
discovers its JWKS and trusts its tokens with nothing else to configure.

Users and clients are created through the server's own services (run on the
server's event loop, so any test loop may await them); tokens are minted with
the server's own `tokens.mint_access_token` and signing key, so they are
exactly what the server issues, for any subject, scope, audience and lifetime,
and also in the shapes a resource server must refuse (expired, issued in the
future, signed by a key the JWKS does not have).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authserver.app import create_app
from authserver.audit import RequestContext
from authserver.clients import Registration
from authserver.config import Settings
from authserver.keys import Algorithm, generate_key
from authserver.resource import TokenValidator
from authserver.tokens import mint_access_token, prepare_key

__all__ = ["AuthServerKit", "KitClient", "KitUser"]

T = TypeVar("T")
_CTX = RequestContext(client_addr="authserver.testing")
_START_TIMEOUT = 30.0
# A token "not yet valid" is issued this far ahead: past any verifier's clock skew.
_FUTURE = 3600


@dataclass(frozen=True, slots=True)
class KitUser:
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class KitClient:
    client_id: str
    secret: str | None  # None for a public client


class AuthServerKit:
    """A running authserver for a test suite; see the module docstring.

    `issuer` is its base URL (`http://127.0.0.1:PORT`), `audience` the `aud` of the
    tokens it issues by default, `settings` everything else it runs with.
    """

    def __init__(self, settings: Settings, alg: Algorithm) -> None:
        self.settings = settings
        self.issuer = settings.issuer
        self.audience = settings.audience
        self._alg = alg
        self._signing = generate_key(settings.keys_dir, alg)
        self._key = prepare_key(self._signing.private_key, alg)
        self._foreign: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.app = create_app(settings)

    @classmethod
    @contextlib.contextmanager
    def start(
        cls, directory: Path, *, alg: Algorithm = "RS256", **overrides: Any
    ) -> Iterator[AuthServerKit]:
        """Run a server with its data in `directory` until the block ends.

        `overrides` are `Settings` fields (`scopes`, `audience`, `access_token_ttl`, ...);
        the database, keys directory, issuer and bcrypt cost are the kit's own unless given.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        values: dict[str, Any] = {
            "database_url": f"sqlite:///{directory / 'authserver.db'}",
            "keys_dir": directory / "keys",
            "issuer": f"http://127.0.0.1:{port}",
            "bcrypt_rounds": 4,
            "log_format": "text",
            # The kit's own background work is not what a suite tests.
            "purge_interval": 3600.0,
            **overrides,
        }
        # No .env file: a suite's server must not depend on the directory it runs from.
        settings = Settings(_env_file=None, **values)
        kit = cls(settings, alg)
        try:
            kit._run(sock)
            yield kit
        finally:
            kit._stop()
            sock.close()

    # -- the server thread ---------------------------------------------------------

    def _run(self, sock: socket.socket) -> None:
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        server = self._server = uvicorn.Server(config)
        loop = self._loop = asyncio.new_event_loop()

        def serve() -> None:
            try:
                loop.run_until_complete(server.serve(sockets=[sock]))
            except BaseException as exc:  # reported by `_run`'s caller, not lost in the thread
                self._failure = exc
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="authserver.testing", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the authserver test server did not start: {self._failure!r}")
            time.sleep(0.01)

    def _stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=_START_TIMEOUT)

    async def _on_server(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` on the server's loop, where its store lives, from any loop."""
        assert self._loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # -- helpers ---------------------------------------------------------------------

    def url(self, path: str = "/") -> str:
        return self.issuer + path

    def validator(self, *, audience: str | None = None) -> TokenValidator:
        """A resource server's validator for this server's tokens (`authserver.resource`),
        exactly as an API configures it: by the issuer URL alone."""
        return TokenValidator.from_issuer(self.issuer, audience=audience or self.audience)

    async def create_user(
        self, username: str | None = None, password: str | None = None
    ) -> KitUser:
        """A new user (a fresh name unless given), with its password."""
        username = username or f"user-{secrets.token_hex(4)}"
        password = password or secrets.token_urlsafe(12)
        users = self.app.state.services.users
        user = await self._on_server(users.create(_CTX, username, password))
        return KitUser(user.username, password)

    async def create_client(
        self,
        client_id: str | None = None,
        *,
        public: bool = False,
        grants: tuple[str, ...] = (),
        scopes: tuple[str, ...] = (),
        audience: str | None = None,
        redirect_uris: tuple[str, ...] = (),
    ) -> KitClient:
        """A registered client (a fresh id unless given); its secret if confidential.

        The defaults are `authserver clients add`'s, but for a public client without
        redirect URIs, which gets the grants it can use: password and refresh_token.
        """
        if public and not grants and not redirect_uris:
            grants = ("password", "refresh_token")
        registration = Registration(
            client_id=client_id or f"client-{secrets.token_hex(4)}",
            public=public,
            grants=grants,
            scopes=scopes,
            audience=audience,
            redirect_uris=redirect_uris,
        )
        clients = self.app.state.services.clients
        client, secret = await self._on_server(clients.register(_CTX, registration))
        return KitClient(client.client_id, secret)

    async def login(
        self,
        user: KitUser | str,
        password: str | None = None,
        *,
        scope: str | None = None,
        client_id: str | None = None,
    ) -> dict[str, Any]:
        """Log in over HTTP (POST /login, the password grant, as the built-in client or
        the public client `client_id`): the token response."""
        if isinstance(user, KitUser):
            username, password = user.username, password or user.password
        else:
            username = user
        body: dict[str, Any] = {"username": username, "password": password or ""}
        if scope is not None:
            body["scope"] = scope
        if client_id is not None:
            body["client_id"] = client_id
        async with httpx.AsyncClient(base_url=self.issuer) as http:
            response = await http.post("/login", json=body)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    async def token(self, user: KitUser | str, password: str | None = None, **kw: Any) -> str:
        """Log in and return just the access token."""
        access_token: str = (await self.login(user, password, **kw))["access_token"]
        return access_token

    def mint_token(
        self,
        subject: str = "user",
        *,
        scope: str | None = None,
        audience: str | None = None,
        lifetime: int | None = None,
        client_id: str = "authserver",
        issuer: str | None = None,
        issued_at: float | None = None,
        sid: str | None = None,
        expired: bool = False,
        not_yet_valid: bool = False,
        foreign_key: bool = False,
    ) -> str:
        """An access token as the server signs one, for any subject, without a login.

        `scope` defaults to every configured scope, `audience` to the server's, `lifetime`
        to its access-token TTL. For negative tests: `expired` (its `exp` has passed),
        `not_yet_valid` (issued an hour from now), `foreign_key` (signed under the
        server's `kid` by a key the JWKS does not have), `issuer` (another `iss`).
        """
        ttl = lifetime if lifetime is not None else self.settings.access_token_ttl
        now = issued_at if issued_at is not None else time.time()
        if expired:
            now -= ttl + 60
        if not_yet_valid:
            now += _FUTURE
        token, _ = mint_access_token(
            key=self._foreign_key() if foreign_key else self._key,
            kid=self._signing.kid,
            alg=self._alg,
            issuer=issuer or self.issuer,
            audience=audience or self.audience,
            subject=subject,
            scope=scope if scope is not None else " ".join(self.settings.scopes),
            client_id=client_id,
            ttl=ttl,
            now=now,
            sid=sid,
        )
        return token

    def _foreign_key(self) -> Any:
        if self._foreign is None:
            private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
                rsa.generate_private_key(public_exponent=65537, key_size=2048)
                if self._alg == "RS256"
                else ec.generate_private_key(ec.SECP256R1())
            )
            self._foreign = prepare_key(private, self._alg)
        return self._foreign
