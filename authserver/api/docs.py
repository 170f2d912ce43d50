"""The Swagger UI at /docs, with its assets served from the installed fastapi-offline.

No CDN: the page works on a machine with no internet. fastapi-offline ships
Swagger UI 5, which renders the OpenAPI 3.1 document FastAPI generates (the
swagger-ui-bundle package stops at 4.15, which refuses 3.1).
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"
ASSETS_DIR = files("fastapi_offline") / "static"


def install_docs(app: FastAPI, *, scopes: tuple[str, ...]) -> None:
    """Serve /docs, offering the configured scopes in its Authorize dialog."""
    _offer_scopes(app, scopes)
    app.mount(ASSETS, StaticFiles(directory=str(ASSETS_DIR)), name="swagger-assets")
    redirect_url = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
            oauth2_redirect_url=redirect_url,
            init_oauth={"clientId": "", "usePkceWithAuthorizationCodeGrant": False},
            # No validator badge: it would send the schema URL to validator.swagger.io.
            swagger_ui_parameters={"persistAuthorization": False, "validatorUrl": None},
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()


def _offer_scopes(app: FastAPI, scopes: tuple[str, ...]) -> None:
    """Put `AUTHSERVER_SCOPES` in the OpenAPI password flow (the route declares none)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for scheme in schema.get("components", {}).get("securitySchemes", {}).values():
                flow = scheme.get("flows", {}).get("password")
                if flow is not None:
                    flow["scopes"] = {scope: f"the {scope} scope" for scope in scopes}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
