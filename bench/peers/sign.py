"""The sign-only baseline: `uvicorn --factory bench.peers.sign:app_factory`.

`POST /refresh` reads the body as authserver's /refresh does (JSON or a form,
with a `refresh_token`), signs one access token with the newest key of the keys
directory, and answers with a body of /refresh's shape and its no-store
headers. No database, no rotation, no audit: what is left when those are gone.

`POST /token` is the same for the client-credentials grant: it reads the form
(`grant_type=client_credentials`) and signs a token for the client named in the
Basic header, without checking its secret or looking it up: a body of /token's
shape, no refresh token.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from bench.peers.settings import setting
from bench.peers.signer import Signer

# RFC 6749 §5.1, as authserver sends on every token response.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
CLIENT_ID = "authserver"
REFRESH_TOKEN_BYTES = 32  # a body as long as a real refresh answer


class ORJSON(JSONResponse):
    # authserver renders with orjson; so does this, so serialising costs the same.
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def fields_of(request: Request) -> Any:
    body = await request.body()
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    try:
        if media == "application/x-www-form-urlencoded":
            fields: Any = dict(parse_qsl(body.decode(), keep_blank_values=True))
        else:
            fields = orjson.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    return fields


async def refresh_token(request: Request) -> str | None:
    fields = await fields_of(request)
    token = fields.get("refresh_token") if isinstance(fields, dict) else None
    return token if isinstance(token, str) and token else None


def basic_client_id(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        client_id, sep, _secret = base64.b64decode(credentials).decode().partition(":")
    except ValueError:
        return None
    return client_id if sep and client_id else None


def app_factory() -> FastAPI:
    signer = Signer.from_keys_dir(Path(setting("KEYS_DIR")))
    issuer, audience = setting("ISSUER"), setting("AUDIENCE")
    scope, ttl, subject = setting("SCOPE"), int(setting("TTL")), setting("SUBJECT")
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/refresh")
    async def refresh(request: Request) -> Response:
        if await refresh_token(request) is None:
            return ORJSON({"error": "invalid_request"}, status_code=400, headers=NO_STORE)
        access_token = signer.mint(
            issuer=issuer,
            audience=audience,
            subject=subject,
            scope=scope,
            client_id=CLIENT_ID,
            ttl=ttl,
        )
        return ORJSON(
            {
                "access_token": access_token,
                "refresh_token": secrets.token_urlsafe(REFRESH_TOKEN_BYTES),
                "token_type": "bearer",
                "expires_in": ttl,
                "scope": scope,
            },
            headers=NO_STORE,
        )

    @app.post("/token")
    async def token(request: Request) -> Response:
        fields = await fields_of(request)
        client_id = basic_client_id(request)
        if (
            not isinstance(fields, dict)
            or fields.get("grant_type") != "client_credentials"
            or client_id is None
        ):
            return ORJSON({"error": "invalid_request"}, status_code=400, headers=NO_STORE)
        access_token = signer.mint(
            issuer=issuer,
            audience=audience,
            subject=client_id,
            scope=scope,
            client_id=client_id,
            ttl=ttl,
        )
        return ORJSON(
            {
                "access_token": access_token,
                "token_type": "bearer",
                "expires_in": ttl,
                "scope": scope,
            },
            headers=NO_STORE,
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
