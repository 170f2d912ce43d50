"""Dependencies shared by the routes, as `Annotated` aliases."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.openapi.models import OAuthFlowAuthorizationCode, OAuthFlowClientCredentials
from fastapi.security import OAuth2PasswordBearer

from authserver.audit import RequestContext
from authserver.authorize import Authorizer
from authserver.clients import ClientAuthenticator, ClientService
from authserver.dpop import ProofChecker
from authserver.grants import AuthService
from authserver.introspection import Introspector
from authserver.keys import KeyRing
from authserver.resource import TokenValidator, Validator, require_token, token_claims
from authserver.sessions import SessionService
from authserver.store.protocol import Store
from authserver.store.schema import USER_AGENT_LENGTH
from authserver.tokens import AccessClaims, AccessTokenVerifier
from authserver.users import UserService

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(frozen=True, slots=True)
class Services:
    """Everything the routes call, built once by `create_app`."""

    auth: AuthService
    authorizer: Authorizer
    users: UserService
    clients: ClientService
    client_auth: ClientAuthenticator
    introspector: Introspector
    sessions: SessionService
    store: Store
    keyring: KeyRing
    verifier: AccessTokenVerifier
    validator: TokenValidator
    dpop: ProofChecker
    issuer: str
    scopes: tuple[str, ...]


# Dependencies are `async def` although they never await: FastAPI runs a plain
# `def` dependency in a worker thread, a hop that costs more than the work.


async def get_services(request: Request) -> Services:
    return services_of(request)


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def request_context(request: Request) -> RequestContext:
    """Who is asking, for the audit trail and the throttle.

    The token routes call this (and `services_of`) directly rather than as
    dependencies: they are the hottest routes, and resolving a dependency costs
    FastAPI more than the work inside it.
    """
    supplied = request.headers.get("x-request-id", "")
    request_id = supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
    client = request.client
    # Bounded like the audit column: behind a proxy trusted with "*", the host is any
    # text the client put in X-Forwarded-For.
    client_addr = client.host[:64] if client and client.host else None
    user_agent = request.headers.get("user-agent")
    return RequestContext(
        client_addr=client_addr,
        request_id=request_id,
        user_agent=user_agent[:USER_AGENT_LENGTH] if user_agent else None,
    )


class _TokenEndpointFlows(OAuth2PasswordBearer):
    """The bearer token of a request, declared in the OpenAPI document with the flows
    that end at /token: the password flow (a user), client_credentials (a confidential
    client, RFC 6749 §4.4) and the authorization code (a user signing in in the browser,
    with PKCE, as the built-in client). The Swagger UI's Authorize dialog offers them
    all; their scopes are the configured ones, filled in by `docs.install_docs`."""

    def __init__(self, token_url: str, authorization_url: str) -> None:
        super().__init__(tokenUrl=token_url, scheme_name="OAuth2", auto_error=False)
        flows = self.model.flows  # type: ignore[attr-defined]
        flows.clientCredentials = OAuthFlowClientCredentials(tokenUrl=token_url, scopes={})
        flows.authorizationCode = OAuthFlowAuthorizationCode(
            authorizationUrl=authorization_url, tokenUrl=token_url, scopes={}
        )


oauth2_scheme = _TokenEndpointFlows("/token", "/authorize")


def get_validator(request: Request) -> Validator:
    return services_of(request).validator


def get_proof_checker(request: Request) -> ProofChecker:
    return services_of(request).dpop


# The very dependency a resource server builds with `authserver.resource`, over
# the server's own keys: local, so the validator never awaits anything.
get_claims = require_token(get_validator, scheme=oauth2_scheme, dpop=get_proof_checker)
# The same check as a function of the request, for /protected's direct handler.
claims_of = token_claims(get_validator, scheme=oauth2_scheme, dpop=get_proof_checker)


ServicesDep = Annotated[Services, Depends(get_services)]
ClaimsDep = Annotated[AccessClaims, Depends(get_claims)]
