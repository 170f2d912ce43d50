"""The Swagger UI at /docs, with its assets served from the installed fastapi-offline.

No CDN: the page works on a machine with no internet. fastapi-offline ships
Swagger UI 5, which renders the OpenAPI 3.1 document FastAPI generates (the
swagger-ui-bundle package stops at 4.15, which refuses 3.1).
"""

from __future__ import annotations

import re
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_oauth2_redirect_html, swagger_ui_default_parameters
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from authserver.clients import BUILTIN_CLIENT_ID, DOCS_REDIRECT_PATH

ASSETS = "/docs/assets"
ASSETS_DIR = files("fastapi_offline") / "static"
STATIC = "/docs/static"
STATIC_DIR = files("authserver.api") / "static"
REDIRECT = DOCS_REDIRECT_PATH
templates = Jinja2Templates(directory=str(files("authserver.api") / "templates"))


def _redirect_script() -> bytes:
    """Swagger UI's OAuth2 redirect script, as FastAPI ships it inline in its page: served
    as a file of its own here, so that the page needs no inline script."""
    page = bytes(get_swagger_ui_oauth2_redirect_html().body).decode("utf-8")
    match = re.search(r"<script>(.*)</script>", page, re.S)
    if match is None:
        raise RuntimeError("FastAPI's OAuth2 redirect page has no script")
    return match.group(1).encode("utf-8")


def install_docs(app: FastAPI, *, scopes: tuple[str, ...]) -> None:
    """Serve /docs, offering the configured scopes in its Authorize dialog."""
    _offer_scopes(app, scopes)
    app.mount(ASSETS, StaticFiles(directory=str(ASSETS_DIR)), name="swagger-assets")
    app.mount(STATIC, StaticFiles(directory=str(STATIC_DIR)), name="authserver-static")
    redirect_script = _redirect_script()
    config = {
        "openapiUrl": app.openapi_url or "/openapi.json",
        "oauth2RedirectUrl": REDIRECT,
        # Both flows of the Authorize dialog are the built-in public client's: its client_id
        # is filled in, and it has no secret, so a person types only a username and password
        # (the password flow sends HTTP Basic with an empty secret), or signs in on
        # authserver's own page (the authorization code flow, always with PKCE).
        "initOAuth": {
            "clientId": BUILTIN_CLIENT_ID,
            "clientSecret": "",
            "usePkceWithAuthorizationCodeGrant": True,
        },
        "parameters": {
            **swagger_ui_default_parameters,
            "persistAuthorization": False,
            # No validator badge: it would send the schema URL to validator.swagger.io.
            "validatorUrl": None,
        },
    }

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return templates.TemplateResponse(
            request,
            "swagger.html",
            {"title": f"{app.title} - API", "assets": ASSETS, "static": STATIC, "config": config},
        )

    @app.get(REDIRECT, include_in_schema=False)
    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return templates.TemplateResponse(
            request, "oauth2_redirect.html", {"script": f"{REDIRECT}.js"}
        )

    @app.get(f"{REDIRECT}.js", include_in_schema=False)
    async def swagger_ui_redirect_script() -> Response:
        return Response(redirect_script, media_type="text/javascript")


def _offer_scopes(app: FastAPI, scopes: tuple[str, ...]) -> None:
    """Put `AUTHSERVER_SCOPES` in the OpenAPI flows (the route declares none)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for scheme in schema.get("components", {}).get("securitySchemes", {}).values():
                for flow in scheme.get("flows", {}).values():
                    flow["scopes"] = {scope: f"the {scope} scope" for scope in scopes}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
