"""Token routes: /login, /refresh, /token (RFC 6749), /revoke (RFC 7009), /logout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from authserver.api.client_credentials import client_of
from authserver.api.deps import Services, request_context, services_of
from authserver.api.parsing import read_form, read_json_or_form
from authserver.api.routing import DirectRoute
from authserver.api.schemas import (
    LoginRequest,
    LogoutRequest,
    RefreshRequest,
    TokenResponse,
    body_schema,
    errors,
)
from authserver.audit import RequestContext
from authserver.clients import (
    AUTHORIZATION_CODE,
    BUILTIN_CLIENT,
    CLIENT_CREDENTIALS,
    PASSWORD,
    REFRESH_TOKEN,
    ClientCredentials,
    is_client_id,
)
from authserver.dpop import sent_method
from authserver.errors import (
    InvalidGrantError,
    InvalidRequestError,
    UnsupportedGrantTypeError,
)
from authserver.grants import GRANT_TYPES, AuthService
from authserver.resource import request_url
from authserver.responses import JSON, NO_STORE, token_response
from authserver.store.protocol import Client

router = APIRouter(tags=["tokens"], route_class=DirectRoute)


class TokenForm(BaseModel):
    grant_type: str
    username: str | None = None
    password: str | None = None
    refresh_token: str | None = None
    scope: str | None = None
    client_id: str | None = None
    code: str | None = None
    redirect_uri: str | None = None
    code_verifier: str | None = None


class RevokeForm(BaseModel):
    token: str
    token_type_hint: str | None = None


async def dpop_key(request: Request, services: Services) -> str | None:
    """The key (RFC 7638 thumbprint) of the request's DPoP proof, checked as RFC 9449 §4.3
    asks; None without a `DPoP` header."""
    proofs = request.headers.getlist("dpop")
    if not proofs:
        return None
    method, url = sent_method(request.scope), request_url(request)
    proof = await services.dpop.check(proofs, method=method, url=url)
    return proof.jkt


def _required(params: Mapping[str, str], name: str, *, empty_ok: bool = False) -> str:
    value = params.get(name)
    if value is None or (not value and not empty_ok):
        raise InvalidRequestError(f"The '{name}' parameter is missing.")
    return value


async def token_request(
    auth: AuthService,
    ctx: RequestContext,
    params: Mapping[str, str],
    *,
    client: Client,
    dpop_jkt: str | None = None,
) -> dict[str, Any]:
    """The RFC 6749 token endpoint's form: dispatch on `grant_type` (§4.1.3, §4.3, §4.4, §6)."""
    grant_type = params.get("grant_type")
    if not grant_type:
        raise InvalidRequestError("The 'grant_type' parameter is missing.")
    if grant_type == PASSWORD:
        return await auth.password_grant(
            ctx,
            username=_required(params, "username"),
            # Unlike a username, an empty password is a (wrong) password, not a missing one.
            password=_required(params, "password", empty_ok=True),
            scope=params.get("scope"),
            client=client,
            dpop_jkt=dpop_jkt,
        )
    if grant_type == REFRESH_TOKEN:
        return await auth.refresh_grant(
            ctx,
            refresh_token=_required(params, "refresh_token"),
            scope=params.get("scope"),
            client=client,
            dpop_jkt=dpop_jkt,
        )
    if grant_type == AUTHORIZATION_CODE:
        return await auth.authorization_code_grant(
            ctx,
            code=_required(params, "code"),
            redirect_uri=_required(params, "redirect_uri"),
            code_verifier=params.get("code_verifier"),
            client=client,
            dpop_jkt=dpop_jkt,
        )
    if grant_type == CLIENT_CREDENTIALS:
        return await auth.client_credentials_grant(
            ctx, client=client, scope=params.get("scope"), dpop_jkt=dpop_jkt
        )
    raise UnsupportedGrantTypeError(f"Unsupported grant_type; use one of {', '.join(GRANT_TYPES)}.")


async def _seed_client(
    services: Services, ctx: RequestContext, client_id: str | None, *, endpoint: str
) -> Client | None:
    """The client a seed-style JSON request names, if it names one. No secret can come
    with that JSON: only a public client may be named; an unknown one is 401."""
    if not client_id:
        return None
    if not is_client_id(client_id):
        raise InvalidRequestError("The client_id is malformed.")
    named = ClientCredentials(client_id=client_id)
    return await services.client_auth.authenticate(ctx, named, endpoint=endpoint)


def _seed_refusal(exc: InvalidGrantError) -> InvalidGrantError:
    """The seed-compatible /login and /refresh answer a refused grant with 401, where
    /token answers RFC 6749 §5.2's 400."""
    return InvalidGrantError(exc.description, status_code=401)


@router.post(
    "/login",
    response_model=TokenResponse,
    responses=errors(400, 401, 415, 429, 503),
    openapi_extra=body_schema(LoginRequest, json=True, form=True),
    summary="Log in with a username and password (JSON or form)",
)
async def login(request: Request) -> JSON:
    services, ctx = services_of(request), request_context(request)
    body = await read_json_or_form(request, LoginRequest)
    client = await _seed_client(services, ctx, body.client_id, endpoint="/login")
    jkt = await dpop_key(request, services)
    try:
        tokens = await services.auth.password_grant(
            ctx,
            username=body.username,
            password=body.password,
            scope=body.scope,
            client=client or BUILTIN_CLIENT,
            dpop_jkt=jkt,
        )
    except InvalidGrantError as exc:
        raise _seed_refusal(exc) from exc
    return token_response(tokens)


@router.post(
    "/refresh",
    response_model=TokenResponse,
    responses=errors(400, 401, 415, 429, 503),
    openapi_extra=body_schema(RefreshRequest, json=True, form=False),
    summary="Exchange a refresh token for a new token pair (rotation)",
)
async def refresh(request: Request) -> JSON:
    services, ctx = services_of(request), request_context(request)
    body = await read_json_or_form(request, RefreshRequest)
    client = await _seed_client(services, ctx, body.client_id, endpoint="/refresh")
    jkt = await dpop_key(request, services)
    try:
        tokens = await services.auth.refresh_grant(
            ctx, refresh_token=body.refresh_token, scope=body.scope, client=client, dpop_jkt=jkt
        )
    except InvalidGrantError as exc:
        raise _seed_refusal(exc) from exc
    return token_response(tokens)


@router.post(
    "/token",
    response_model=TokenResponse,
    responses=errors(400, 401, 429, 503),
    openapi_extra=body_schema(TokenForm, json=False, form=True),
    summary="RFC 6749 token endpoint: every grant",
)
async def token(request: Request) -> JSON:
    services, ctx = services_of(request), request_context(request)
    form = await read_form(request)
    # The proof first: a nonce challenge (RFC 9449 §8) must not use up the single-use
    # assertion of a private_key_jwt client, which the client's retry could not resend.
    jkt = await dpop_key(request, services)
    client = await client_of(request, form, ctx, endpoint="/token")
    return token_response(
        await token_request(services.auth, ctx, form, client=client, dpop_jkt=jkt)
    )


@router.post(
    "/revoke",
    status_code=200,
    response_class=Response,  # an empty 200 body (RFC 7009 §2.2), not JSON
    responses={
        200: {"description": "Revoked, or not a known token"},
        **errors(400, 401, 429, 503),
    },
    openapi_extra=body_schema(RevokeForm, json=False, form=True),
    summary="RFC 7009 token revocation",
)
async def revoke(request: Request) -> Response:
    services, ctx = services_of(request), request_context(request)
    form = await read_form(request)
    # RFC 7009 §2.1: the client authenticates as at /token.
    client = await client_of(request, form, ctx, endpoint="/revoke")
    token = form.get("token")
    if not token:
        raise InvalidRequestError("The 'token' parameter is missing.")
    # RFC 7009 §2.2: the answer is 200 whether or not the token was known. An
    # access token cannot be revoked (it is self-contained): it simply expires.
    await services.auth.revoke(
        ctx,
        token=token,
        client=None if client.client_id == BUILTIN_CLIENT.client_id else client,
    )
    return Response(status_code=200, headers=NO_STORE)


@router.post(
    "/logout",
    status_code=204,
    responses={204: {"description": "The session is over"}, **errors(400, 401, 415, 429, 503)},
    openapi_extra=body_schema(LogoutRequest, json=True, form=False),
    summary="Revoke the session (refresh family) of a refresh token",
)
async def logout(request: Request) -> Response:
    services, ctx = services_of(request), request_context(request)
    body = await read_json_or_form(request, LogoutRequest)
    client = await _seed_client(services, ctx, body.client_id, endpoint="/logout")
    await services.auth.logout(ctx, refresh_token=body.refresh_token, client=client)
    return Response(status_code=204, headers=NO_STORE)
