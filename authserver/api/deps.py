"""Dependencies shared by the routes, as `Annotated` aliases."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import OAuth2PasswordBearer

from authserver.audit import RequestContext
from authserver.errors import MissingTokenError
from authserver.grants import AuthService
from authserver.keys import KeyRing
from authserver.store.protocol import Store
from authserver.tokens import AccessClaims, AccessTokenVerifier

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(frozen=True, slots=True)
class Services:
    """Everything the routes call, built once by `create_app`."""

    auth: AuthService
    store: Store
    keyring: KeyRing
    verifier: AccessTokenVerifier
    issuer: str
    scopes: tuple[str, ...]


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_context(request: Request) -> RequestContext:
    supplied = request.headers.get("x-request-id", "")
    request_id = supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
    client = request.client
    return RequestContext(client_addr=client.host if client else None, request_id=request_id)


def invalid_grant_is_401(request: Request) -> None:
    """The seed-compatible /login and /refresh answer a bad grant with 401, not 400."""
    request.state.invalid_grant_status = 401


# Declares the OAuth2 password flow in the OpenAPI document, so the Swagger UI's
# Authorize button logs in at /token.
oauth2_scheme = OAuth2PasswordBearer(
    tokenUrl="/token",
    auto_error=False,
    scopes={"read": "Read access", "write": "Write access"},
)


def get_claims(
    request: Request, token: Annotated[str | None, Security(oauth2_scheme)]
) -> AccessClaims:
    if not token:
        raise MissingTokenError()
    return get_services(request).verifier.verify(token)


ServicesDep = Annotated[Services, Depends(get_services)]
ContextDep = Annotated[RequestContext, Depends(get_context)]
ClaimsDep = Annotated[AccessClaims, Depends(get_claims)]
