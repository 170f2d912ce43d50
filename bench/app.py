"""The application the benchmark runs: authserver's own app plus two baselines.

`uvicorn --factory bench.app:bench_app` serves exactly what `authserver serve`
serves (same factory, middleware, error handler, logging), and adds:

- `GET /bench/bare`: the JSON body of `/protected`, with no authentication;
- `POST /bench/sign`: reads a body like `/refresh` does and signs one access
  token with the server's signing key, touching no database.

They live here, never in the production app.
"""

from __future__ import annotations

import secrets

from fastapi import APIRouter, FastAPI, Request

from authserver.api.parsing import read_json_or_form
from authserver.api.schemas import ProtectedResponse, RefreshRequest
from authserver.app import create_app
from authserver.config import Settings
from authserver.logs import configure_logging
from authserver.refresh import REFRESH_TOKEN_BYTES
from authserver.responses import JSON, token_response
from authserver.tokens import mint_access_token

BENCH_USER = "benchuser"
BENCH_CLIENT_ID = "authserver"
router = APIRouter(prefix="/bench", include_in_schema=False)


@router.get("/bare", response_model=ProtectedResponse)
async def bare() -> JSON:
    return JSON({"message": "Access granted for protected route.", "username": BENCH_USER})


@router.post("/sign")
async def sign(request: Request) -> JSON:
    await read_json_or_form(request, RefreshRequest)
    auth = request.app.state.services.auth
    kid, alg, key = auth.keys.signing_key()
    scope = " ".join(auth.policy.scopes)
    access_token, expires_in = mint_access_token(
        key=key,
        kid=kid,
        alg=alg,
        issuer=auth.policy.issuer,
        audience=auth.policy.audience,
        subject=BENCH_USER,
        scope=scope,
        client_id=BENCH_CLIENT_ID,
        ttl=auth.policy.access_token_ttl,
    )
    return token_response(
        {
            "access_token": access_token,
            # A random value of a refresh token's size: the body has /refresh's shape.
            "refresh_token": secrets.token_urlsafe(REFRESH_TOKEN_BYTES),
            "token_type": "bearer",
            "expires_in": expires_in,
            "scope": scope,
        }
    )


def bench_app() -> FastAPI:
    """For `uvicorn --factory bench.app:bench_app`: settings from the environment."""
    settings = Settings()
    # As `authserver serve` does, so every worker logs its audit lines as in production.
    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    app.include_router(router)
    return app
