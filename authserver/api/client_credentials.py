"""How a request says which client it is: HTTP Basic, form fields, or an assertion.

One function, `client_of`, for every endpoint that authenticates clients
(/token, /revoke, /introspect): `credentials_of` reads what the request presents,
and `clients.ClientAuthenticator` checks it. RFC 6749 §2.3.1 (Basic and the
form's client_secret), RFC 7523 §2.2 (client_assertion), and §2.3: a client
uses one method per request.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from urllib.parse import unquote_plus

from starlette.requests import Request

from authserver.api.deps import services_of
from authserver.audit import RequestContext
from authserver.clients import ClientCredentials, is_client_id
from authserver.errors import InvalidClientError, InvalidRequestError
from authserver.store.protocol import Client
from authserver.tokens import ASSERTION_TYPE


def _basic(request: Request) -> tuple[str, str] | None:
    """(client_id, secret) from `Authorization: Basic`, each form-decoded (§2.3.1)."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except ValueError as exc:  # binascii.Error, UnicodeDecodeError, non-ASCII text
        raise InvalidClientError("Malformed HTTP Basic credentials.") from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidClientError("Malformed HTTP Basic credentials.")
    return unquote_plus(client_id), unquote_plus(secret)


def credentials_of(request: Request, form: Mapping[str, str]) -> ClientCredentials:
    """The client credentials a request presents (none at all: the built-in client)."""
    basic = _basic(request)
    basic_id, basic_secret = basic or ("", "")
    form_id = form.get("client_id") or ""
    form_secret = form.get("client_secret") or ""
    assertion_type = form.get("client_assertion_type")
    assertion = form.get("client_assertion")
    if basic_id and form_id and basic_id != form_id:
        raise InvalidRequestError("Two different client_id values were sent.")
    if assertion_type is not None or assertion is not None:
        if assertion_type != ASSERTION_TYPE or not assertion:
            raise InvalidClientError("Unsupported client assertion.")
    if sum(bool(m) for m in (basic_secret, form_secret, assertion)) > 1:
        raise InvalidRequestError("Use one client authentication method per request.")
    client_id = basic_id or form_id or None
    if client_id is not None and not is_client_id(client_id):
        raise InvalidRequestError("The client_id is malformed.")
    return ClientCredentials(
        client_id=client_id,
        secret=basic_secret or form_secret or None,
        assertion=assertion or None,
        basic=bool(basic_secret),
    )


async def client_of(
    request: Request, form: Mapping[str, str], ctx: RequestContext, *, endpoint: str
) -> Client:
    """The client a request to `endpoint` authenticates as (the built-in one if it names
    none); 401 `invalid_client` if it cannot."""
    return await services_of(request).client_auth.authenticate(
        ctx, credentials_of(request, form), endpoint=endpoint
    )
