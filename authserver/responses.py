"""How authserver's JSON answers travel: orjson responses, token responses, errors.

`error_response` is the one place an `OAuthError` becomes a response: the
server's handlers (`api/errors.py`) and the resource kit (`resource.py`, in
users' own apps) both call it, so a 401 `invalid_token` looks the same from
either. It sits outside `api/` so that the kit renders errors without
importing the server's HTTP layer.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse

from authserver.errors import NO_STORE, OAuthError

__all__ = ["JSON", "NO_STORE", "error_response", "install_error_handler", "token_response"]


class JSON(JSONResponse):
    """`JSONResponse` rendered by orjson."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def token_response(body: dict[str, Any]) -> JSON:
    """A successful token response: never cached (RFC 6749 §5.1)."""
    return JSON(body, headers=NO_STORE)


def error_response(exc: OAuthError, *, status_code: int | None = None) -> JSON:
    """Render an `OAuthError`: its status, JSON body and headers (RFC 6749 §5.2, RFC 6750 §3)."""
    return JSON(exc.body(), status_code=status_code or exc.status_code, headers=exc.headers())


def install_error_handler(app: FastAPI) -> None:
    """Make every `OAuthError` (401 invalid_token, 403 insufficient_scope, ...) a response."""

    # Starlette looks handlers up along the MRO: one registration covers every subclass.
    @app.exception_handler(OAuthError)
    async def oauth_error(_request: Request, exc: OAuthError) -> JSON:
        return error_response(exc)
