"""Token routes: /login, /refresh, /token (RFC 6749), /revoke (RFC 7009), /logout."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from authserver.api.deps import request_context, services_of
from authserver.api.parsing import read_form, read_json_or_form
from authserver.api.schemas import (
    LoginRequest,
    LogoutRequest,
    RefreshRequest,
    TokenResponse,
    body_schema,
    errors,
)
from authserver.audit import RequestContext
from authserver.errors import (
    InvalidClientError,
    InvalidGrantError,
    InvalidRequestError,
    UnsupportedGrantTypeError,
)
from authserver.grants import GRANT_TYPES, PASSWORD_GRANT, REFRESH_TOKEN_GRANT, AuthService
from authserver.responses import JSON, NO_STORE, token_response

router = APIRouter(tags=["tokens"])
DEFAULT_CLIENT_ID = "authserver"
# RFC 6749 Appendix A.1: client_id = *VSCHAR
_CLIENT_ID = re.compile(r"[\x20-\x7e]{1,255}")


class TokenForm(BaseModel):
    grant_type: str
    username: str | None = None
    password: str | None = None
    refresh_token: str | None = None
    scope: str | None = None
    client_id: str | None = None


class RevokeForm(BaseModel):
    token: str
    token_type_hint: str | None = None


def _basic_client_id(request: Request) -> str | None:
    """A client_id from HTTP Basic (RFC 6749 §2.3.1); public clients have an empty secret."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidClientError("Malformed HTTP Basic credentials.") from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidClientError("Malformed HTTP Basic credentials.")
    if unquote(secret):
        raise InvalidClientError("Clients are public: send no client secret.")
    return unquote(client_id)


def client_id_of(request: Request, form: dict[str, str]) -> str:
    from_basic = _basic_client_id(request)
    from_form = form.get("client_id") or None
    if from_basic and from_form and from_basic != from_form:
        raise InvalidRequestError("Two different client_id values were sent.")
    if form.get("client_secret"):
        raise InvalidClientError("Clients are public: send no client secret.", status_code=400)
    return _valid_client_id(from_basic or from_form or DEFAULT_CLIENT_ID)


def _valid_client_id(client_id: str) -> str:
    if not _CLIENT_ID.fullmatch(client_id):
        raise InvalidRequestError("The client_id is malformed.")
    return client_id


def _required(params: Mapping[str, str], name: str, *, empty_ok: bool = False) -> str:
    value = params.get(name)
    if value is None or (not value and not empty_ok):
        raise InvalidRequestError(f"The '{name}' parameter is missing.")
    return value


async def token_request(
    auth: AuthService, ctx: RequestContext, params: Mapping[str, str], *, client_id: str
) -> dict[str, Any]:
    """The RFC 6749 token endpoint's form: dispatch on `grant_type` (§4.3, §6)."""
    grant_type = params.get("grant_type")
    if not grant_type:
        raise InvalidRequestError("The 'grant_type' parameter is missing.")
    if grant_type == PASSWORD_GRANT:
        return await auth.password_grant(
            ctx,
            username=_required(params, "username"),
            # Unlike a username, an empty password is a (wrong) password, not a missing one.
            password=_required(params, "password", empty_ok=True),
            scope=params.get("scope"),
            client_id=client_id,
        )
    if grant_type == REFRESH_TOKEN_GRANT:
        return await auth.refresh_grant(
            ctx, refresh_token=_required(params, "refresh_token"), scope=params.get("scope")
        )
    raise UnsupportedGrantTypeError(f"Unsupported grant_type; use one of {', '.join(GRANT_TYPES)}.")


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
    client_id = _valid_client_id(body.client_id or DEFAULT_CLIENT_ID)
    try:
        tokens = await services.auth.password_grant(
            ctx,
            username=body.username,
            password=body.password,
            scope=body.scope,
            client_id=client_id,
        )
    except InvalidGrantError as exc:
        raise _seed_refusal(exc) from exc
    return token_response(tokens)


@router.post(
    "/refresh",
    response_model=TokenResponse,
    responses=errors(400, 401, 415, 503),
    openapi_extra=body_schema(RefreshRequest, json=True, form=False),
    summary="Exchange a refresh token for a new token pair (rotation)",
)
async def refresh(request: Request) -> JSON:
    services, ctx = services_of(request), request_context(request)
    body = await read_json_or_form(request, RefreshRequest)
    try:
        tokens = await services.auth.refresh_grant(
            ctx, refresh_token=body.refresh_token, scope=body.scope
        )
    except InvalidGrantError as exc:
        raise _seed_refusal(exc) from exc
    return token_response(tokens)


@router.post(
    "/token",
    response_model=TokenResponse,
    responses=errors(400, 401, 429, 503),
    openapi_extra=body_schema(TokenForm, json=False, form=True),
    summary="RFC 6749 token endpoint (password and refresh_token grants)",
)
async def token(request: Request) -> JSON:
    services, ctx = services_of(request), request_context(request)
    form = await read_form(request)
    client_id = client_id_of(request, form)
    return token_response(await token_request(services.auth, ctx, form, client_id=client_id))


@router.post(
    "/revoke",
    status_code=200,
    response_class=Response,  # an empty 200 body (RFC 7009 §2.2), not JSON
    responses={200: {"description": "Revoked, or not a known token"}, **errors(400)},
    openapi_extra=body_schema(RevokeForm, json=False, form=True),
    summary="RFC 7009 token revocation",
)
async def revoke(request: Request) -> Response:
    services, ctx = services_of(request), request_context(request)
    form = await read_form(request)
    client_id_of(request, form)  # client credentials are checked as at /token (RFC 7009 §2.1)
    token = form.get("token")
    if not token:
        raise InvalidRequestError("The 'token' parameter is missing.")
    # RFC 7009 §2.2: the answer is 200 whether or not the token was known. An
    # access token cannot be revoked (it is self-contained): it simply expires.
    await services.auth.revoke(ctx, token=token)
    return Response(status_code=200, headers=NO_STORE)


@router.post(
    "/logout",
    status_code=204,
    responses={204: {"description": "The session is over"}, **errors(400, 415)},
    openapi_extra=body_schema(LogoutRequest, json=True, form=False),
    summary="Revoke the session (refresh family) of a refresh token",
)
async def logout(request: Request) -> Response:
    services, ctx = services_of(request), request_context(request)
    body = await read_json_or_form(request, LogoutRequest)
    await services.auth.logout(ctx, refresh_token=body.refresh_token)
    return Response(status_code=204, headers=NO_STORE)
