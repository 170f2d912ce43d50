"""POST /introspect (RFC 7662), for registered confidential clients."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from authserver.api.client_credentials import credentials_of
from authserver.api.deps import request_context, services_of
from authserver.api.parsing import read_form
from authserver.api.routing import DirectRoute
from authserver.api.schemas import body_schema, errors
from authserver.errors import InvalidClientError, InvalidRequestError
from authserver.introspection import session_of
from authserver.responses import JSON, NO_STORE

_ENDPOINT = "/introspect"
router = APIRouter(tags=["tokens"], route_class=DirectRoute)


class IntrospectForm(BaseModel):
    token: str
    token_type_hint: str | None = None


class IntrospectionResponse(BaseModel):
    active: bool
    token_type: str | None = None
    scope: str | None = None
    client_id: str | None = None
    username: str | None = None
    sub: str | None = None
    aud: str | list[str] | None = None
    iss: str | None = None
    exp: int | None = None
    iat: int | None = None
    jti: str | None = None
    sid: str | None = None


@router.post(
    "/introspect",
    response_model=IntrospectionResponse,
    responses=errors(400, 401, 429, 503),
    openapi_extra=body_schema(IntrospectForm, json=False, form=True),
    summary="RFC 7662 token introspection (confidential clients)",
)
async def introspect(request: Request) -> JSON:
    services, ctx = services_of(request), request_context(request)
    form = await read_form(request)
    credentials = credentials_of(request, form)
    token = form.get("token")
    # The token's signature and claims first (CPU only, no store read), so that a user's
    # token has its session read in the same query as the client: one round trip. Nothing
    # of it is told before the client is authenticated.
    claims = services.introspector.access_claims(token) if token else None
    sid = session_of(claims)
    live: bool | None = None
    if sid is None:
        client = await services.client_auth.authenticate(ctx, credentials, endpoint=_ENDPOINT)
    else:
        client, live = await services.client_auth.authenticate_with_session(
            ctx, credentials, endpoint=_ENDPOINT, session=sid
        )
    if client.public:
        # RFC 7662 §2.1: the endpoint is for the resource servers an operator registered.
        raise InvalidClientError("Introspection is for confidential clients.")
    if not token:
        raise InvalidRequestError("The 'token' parameter is missing.")
    # `token_type_hint` is only a hint (§2.1): every kind is tried, whatever it says.
    answer = await services.introspector.answer(token, claims, session_live=live, caller=client)
    return JSON(answer, headers=NO_STORE)
