"""A web app that signs its users in with authserver (OpenID Connect, code flow + PKCE).

Built on Authlib's Starlette client, unmodified: it reads the server's discovery
document, sends the browser to /authorize with a PKCE challenge and a nonce, checks
the id_token (signature from the JWKS, iss, aud, exp, nonce, at_hash) when the
browser comes back, calls an API with the access token, refreshes it, and signs out
through /end-session.

Run it beside the server (see the README, "Sign in from a web app"):

    RP_ISSUER=http://127.0.0.1:8000 RP_CLIENT_ID=webapp RP_CLIENT_SECRET=... \\
    RP_BASE_URL=http://localhost:9001 .venv/bin/uvicorn --app-dir examples \\
        oidc_relying_party:app --port 9001

RP_CLIENT_SECRET unset means a public client (PKCE alone). RP_SCOPE defaults to
"openid read". Tokens stay on the server side of this app, in memory: the browser
holds only a signed session cookie naming them.
"""

from __future__ import annotations

import html
import json
import os
import secrets
from typing import Any

from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.integrations.starlette_client import OAuth, OAuthError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>",
        status_code=status_code,
    )


class RelyingParty:
    """The app's routes, for one registered client served at `base_url`."""

    def __init__(
        self,
        *,
        issuer: str,
        client_id: str,
        client_secret: str | None,
        base_url: str,
        scope: str,
        title: str,
    ) -> None:
        self.issuer, self.client_id, self.client_secret = issuer, client_id, client_secret
        self.base_url, self.title = base_url, title
        self.auth_method = "client_secret_basic" if client_secret else "none"
        oauth = OAuth()
        oauth.register(
            "authserver",
            client_id=client_id,
            client_secret=client_secret,
            server_metadata_url=f"{issuer}/.well-known/openid-configuration",
            client_kwargs={
                "scope": scope,
                "code_challenge_method": "S256",  # PKCE, which authserver requires
                "token_endpoint_auth_method": self.auth_method,
            },
        )
        self.server = oauth.create_client("authserver")
        # Tokens by session: the cookie names an entry here and holds no token itself.
        self.tokens: dict[str, dict[str, Any]] = {}

    def page(self, body: str, status_code: int = 200) -> HTMLResponse:
        return _page(self.title, body, status_code)

    def token_of(self, request: Request) -> dict[str, Any] | None:
        return self.tokens.get(request.session.get("sid", ""))

    async def home(self, request: Request) -> Response:
        token = self.token_of(request)
        if token is None:
            return self.page(
                '<p id="status">Signed out.</p><a id="login" href="/login">Sign in</a>'
            )
        user = token["userinfo"]
        return self.page(
            f'<p id="status">Signed in as <span id="user">{html.escape(user["sub"])}</span>.</p>'
            f'<pre id="claims">{html.escape(json.dumps(dict(user), sort_keys=True))}</pre>'
            '<a id="api" href="/api">Call the API</a> <a id="refresh" href="/refresh">Refresh</a>'
            ' <a id="logout" href="/logout">Sign out</a>'
        )

    async def login(self, request: Request) -> Response:
        response: Response = await self.server.authorize_redirect(
            request, f"{self.base_url}/callback"
        )
        return response

    async def callback(self, request: Request) -> Response:
        metadata = await self.server.load_server_metadata()
        # RFC 9207: the answer must come from the server we sent the browser to.
        if request.query_params.get("iss") != metadata["issuer"]:
            return self.page('<p id="error">The answer did not come from our issuer.</p>', 400)
        try:
            token = await self.server.authorize_access_token(request)
        except OAuthError as exc:
            return self.page(f'<p id="error">{html.escape(exc.error or "")}</p>', 400)
        sid = secrets.token_urlsafe(16)
        self.tokens[sid] = dict(token)
        request.session["sid"] = sid
        return RedirectResponse("/", status_code=303)

    async def api(self, request: Request) -> Response:
        token = self.token_of(request)
        if token is None:
            return RedirectResponse("/", status_code=303)
        answers = {}
        for path in ("/protected", "/userinfo"):
            resp = await self.server.get(f"{self.issuer}{path}", token=token)
            answers[path] = {"status": resp.status_code, "body": resp.json()}
        return self.page(
            f'<pre id="result">{html.escape(json.dumps(answers, sort_keys=True))}</pre>'
        )

    async def refresh(self, request: Request) -> Response:
        token = self.token_of(request)
        if token is None:
            return RedirectResponse("/", status_code=303)
        metadata = await self.server.load_server_metadata()
        async with AsyncOAuth2Client(
            self.client_id, self.client_secret, token_endpoint_auth_method=self.auth_method
        ) as client:
            try:
                new = await client.refresh_token(
                    metadata["token_endpoint"], refresh_token=token["refresh_token"]
                )
            except OAuthError as exc:
                error = html.escape(exc.error or "")
                return self.page(f'<p id="error">refresh refused: {error}</p>', 400)
        token.update(new)
        return self.page('<p id="refreshed">Refreshed.</p><a href="/">Back</a>')

    async def logout(self, request: Request) -> Response:
        token = self.token_of(request)
        if token is None:
            return RedirectResponse("/", status_code=303)
        response: Response = await self.server.logout_redirect(
            request,
            post_logout_redirect_uri=f"{self.base_url}/logged-out",
            id_token_hint=token["id_token"],
            state=secrets.token_urlsafe(16),
        )
        return response

    async def logged_out(self, request: Request) -> Response:
        try:
            await self.server.validate_logout_response(request)
        except OAuthError:
            return self.page('<p id="error">Unexpected sign-out answer.</p>', 400)
        # The server ended its session; the local one ends too.
        request.session.pop("sid", None)
        return self.page('<p id="status">Signed out.</p><a id="login" href="/login">Sign in</a>')


def create_app(
    *,
    issuer: str,
    client_id: str,
    client_secret: str | None,
    base_url: str,
    scope: str = "openid read",
    title: str | None = None,
) -> Starlette:
    """The relying party for one registered client, served at `base_url`."""
    rp = RelyingParty(
        issuer=issuer,
        client_id=client_id,
        client_secret=client_secret,
        base_url=base_url,
        scope=scope,
        title=title or client_id,
    )
    return Starlette(
        routes=[
            Route("/", rp.home),
            Route("/login", rp.login),
            Route("/callback", rp.callback),
            Route("/api", rp.api),
            Route("/refresh", rp.refresh),
            Route("/logout", rp.logout),
            Route("/logged-out", rp.logged_out),
        ],
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=os.environ.get("RP_SESSION_SECRET") or secrets.token_urlsafe(32),
                # Apps on one host share cookies across ports: each keeps its own name.
                session_cookie=f"rp_session_{client_id}",
                same_site="lax",
            )
        ],
    )


def _from_environment() -> Starlette:
    return create_app(
        issuer=os.environ.get("RP_ISSUER", "http://127.0.0.1:8000"),
        client_id=os.environ.get("RP_CLIENT_ID", "webapp"),
        client_secret=os.environ.get("RP_CLIENT_SECRET") or None,
        base_url=os.environ.get("RP_BASE_URL", "http://localhost:9001"),
        scope=os.environ.get("RP_SCOPE", "openid read"),
        title=os.environ.get("RP_TITLE"),
    )


app = _from_environment()
