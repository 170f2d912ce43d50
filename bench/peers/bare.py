"""The ceiling: a bare FastAPI app, `uvicorn --factory bench.peers.bare:app_factory`.

Framework defaults throughout (no middleware, the default JSON response), as
anyone would write the endpoint; only the body is authserver's /protected body.
`POST /introspect` reads the request body and answers with a fixed body of the
shape of authserver's answer for an active access token: no client check, no
token check.
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from bench.peers.settings import setting


def app_factory() -> FastAPI:
    body = {"message": "Access granted for protected route.", "username": setting("SUBJECT")}
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    # The load generator sends authserver's request, bearer token included; it is ignored.
    # No return annotation, as in FastAPI's tutorial: one would make FastAPI validate the
    # answer, work authserver's /protected does not do, and lower the ceiling.
    @app.get("/protected")
    async def protected():
        return body

    active = {
        "active": True,
        "token_type": "access_token",
        "scope": "read write",
        "client_id": "authserver",
        "sub": setting("SUBJECT"),
        "aud": "authserver",
        "iss": "http://127.0.0.1",
        "exp": 2_000_000_000,
        "iat": 1_900_000_000,
        "jti": "0123456789abcdefghijkl",
        "username": setting("SUBJECT"),
        "sid": "00000000-0000-0000-0000-000000000000",
    }

    @app.post("/introspect")
    async def introspect(request: Request):
        await request.body()
        return active

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app
