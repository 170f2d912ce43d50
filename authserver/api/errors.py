"""Every exception handler of the server, installed once by `install_error_handlers`.

Each maps a foreign exception (the store down, no signing key, a malformed
request, no route, a hung-up client, a bug) to an `OAuthError`, and every one
is rendered the one way, by `authserver.responses.error_response`. No body or
status is written here: the errors know their own.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from authserver.errors import (
    InvalidRequestError,
    NotServedError,
    ServerError,
    TemporarilyUnavailableError,
)
from authserver.keys import NoSigningKeyError
from authserver.responses import JSON, error_response, install_error_handler
from authserver.store.protocol import StoreUnavailable

log = logging.getLogger("authserver")


def install_error_handlers(app: FastAPI) -> None:
    # Every OAuthError, whatever its subclass: the resource kit's handler, which is ours.
    install_error_handler(app)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_request: Request, exc: StoreUnavailable) -> JSON:
        log.warning("database unavailable: %s", exc)
        return error_response(TemporarilyUnavailableError(retry_after=2))

    @app.exception_handler(NoSigningKeyError)
    async def no_key(_request: Request, exc: NoSigningKeyError) -> JSON:
        log.error("cannot sign: %s", exc)
        return error_response(
            TemporarilyUnavailableError("No signing key is loaded.", retry_after=5)
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, _exc: RequestValidationError) -> JSON:
        # Never FastAPI's default 422, which repeats the submitted input.
        return error_response(InvalidRequestError("The request is malformed."))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSON:
        return error_response(
            NotServedError(str(exc.detail), status_code=exc.status_code, headers=exc.headers)
        )

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_request: Request, _exc: ClientDisconnect) -> JSON:
        # The client hung up mid-body: nobody will read this answer, and it is no server error.
        return error_response(InvalidRequestError("The request body was cut short."))

    @app.exception_handler(Exception)
    async def server_error(_request: Request, _exc: Exception) -> JSON:
        log.exception("unhandled error")
        return error_response(ServerError())
