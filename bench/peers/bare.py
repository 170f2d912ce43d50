"""The ceiling: a bare FastAPI app, `uvicorn --factory bench.peers.bare:app_factory`.

Framework defaults throughout (no middleware, the default JSON response), as
anyone would write the endpoint; only the body is authserver's /protected body.
"""

from __future__ import annotations

from fastapi import FastAPI

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

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app
