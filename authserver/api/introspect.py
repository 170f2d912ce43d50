"""POST /introspect (RFC 7662), for registered confidential clients."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from authserver.api.client_credentials import client_of
from authserver.api.deps import request_context, services_of
from authserver.api.parsing import read_form
from authserver.api.routing import DirectRoute
from authserver.api.schemas import body_schema, errors
from authserver.errors import InvalidClientError, InvalidRequestError
from authserver.responses import JSON, NO_STORE

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
    client = await client_of(request, form, ctx, endpoint="/introspect")
    if client.public:
        # RFC 7662 §2.1: the endpoint is for the resource servers an operator registered.
        raise InvalidClientError("Introspection is for confidential clients.")
    token = form.get("token")
    if not token:
        raise InvalidRequestError("The 'token' parameter is missing.")
    # `token_type_hint` is only a hint (§2.1): every kind is tried, whatever it says.
    return JSON(await services.introspector.introspect(token), headers=NO_STORE)
