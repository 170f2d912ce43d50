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
    title = title or client_id
    oauth = OAuth()
    oauth.register(
        "authserver",
        client_id=client_id,
        client_secret=client_secret,
        server_metadata_url=f"{issuer}/.well-known/openid-configuration",
        client_kwargs={
            "scope": scope,
            "code_challenge_method": "S256",  # PKCE, which authserver requires of everyone
            "token_endpoint_auth_method": "client_secret_basic" if client_secret else "none",
        },
    )
    server = oauth.create_client("authserver")
    # Tokens by session: the cookie names an entry here and holds no token itself.
    tokens: dict[str, dict[str, Any]] = {}

    def page(body: str, status_code: int = 200) -> HTMLResponse:
        return HTMLResponse(
            f"<!doctype html><html><head><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>",
            status_code=status_code,
        )

    def token_of(request: Request) -> dict[str, Any] | None:
        return tokens.get(request.session.get("sid", ""))

    async def home(request: Request) -> Response:
        token = token_of(request)
        if token is None:
            return page('<p id="status">Signed out.</p><a id="login" href="/login">Sign in</a>')
        user = token["userinfo"]
        return page(
            f'<p id="status">Signed in as <span id="user">{html.escape(user["sub"])}</span>.</p>'
            f'<pre id="claims">{html.escape(json.dumps(dict(user), sort_keys=True))}</pre>'
            '<a id="api" href="/api">Call the API</a> <a id="refresh" href="/refresh">Refresh</a>'
            ' <a id="logout" href="/logout">Sign out</a>'
        )

    async def login(request: Request) -> Response:
        response: Response = await server.authorize_redirect(request, f"{base_url}/callback")
        return response

    async def callback(request: Request) -> Response:
        metadata = await server.load_server_metadata()
        # RFC 9207: the answer must come from the server we sent the browser to.
        if request.query_params.get("iss") != metadata["issuer"]:
            return page('<p id="error">The answer did not come from our issuer.</p>', 400)
        try:
            token = await server.authorize_access_token(request)
        except OAuthError as exc:
            return page(f'<p id="error">{html.escape(exc.error or "")}</p>', 400)
        sid = secrets.token_urlsafe(16)
        tokens[sid] = dict(token)
        request.session["sid"] = sid
        return RedirectResponse("/", status_code=303)

    async def api(request: Request) -> Response:
        token = token_of(request)
        if token is None:
            return RedirectResponse("/", status_code=303)
        answers = {}
        for path in ("/protected", "/userinfo"):
            resp = await server.get(f"{issuer}{path}", token=token)
            answers[path] = {"status": resp.status_code, "body": resp.json()}
        return page(f'<pre id="result">{html.escape(json.dumps(answers, sort_keys=True))}</pre>')

    async def refresh(request: Request) -> Response:
        token = token_of(request)
        if token is None:
            return RedirectResponse("/", status_code=303)
        metadata = await server.load_server_metadata()
        async with AsyncOAuth2Client(
            client_id,
            client_secret,
            token_endpoint_auth_method="client_secret_basic" if client_secret else "none",
        ) as client:
            try:
                new = await client.refresh_token(
                    metadata["token_endpoint"], refresh_token=token["refresh_token"]
                )
            except OAuthError as exc:
                return page(f'<p id="error">refresh refused: {html.escape(exc.error)}</p>', 400)
        token.update(new)
        return page('<p id="refreshed">Refreshed.</p><a href="/">Back</a>')

    async def logout(request: Request) -> Response:
        token = token_of(request)
        if token is None:
            return RedirectResponse("/", status_code=303)
        response: Response = await server.logout_redirect(
            request,
            post_logout_redirect_uri=f"{base_url}/logged-out",
            id_token_hint=token["id_token"],
            state=secrets.token_urlsafe(16),
        )
        return response

    async def logged_out(request: Request) -> Response:
        try:
            await server.validate_logout_response(request)
        except OAuthError:
            return page('<p id="error">Unexpected sign-out answer.</p>', 400)
        # The server ended its session; the local one ends too. The refresh token is
        # kept (this is a demo): /refresh now shows the server refusing it.
        request.session.pop("sid", None)
        return page('<p id="status">Signed out.</p><a id="login" href="/login">Sign in</a>')

    return Starlette(
        routes=[
            Route("/", home),
            Route("/login", login),
            Route("/callback", callback),
            Route("/api", api),
            Route("/refresh", refresh),
            Route("/logout", logout),
            Route("/logged-out", logged_out),
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
