"""Browser sign-in: GET /authorize, the sign-in and consent forms, /end-session, /userinfo.

Pages are server-rendered (Jinja2, autoescaped, no script), so they work without
JavaScript under the server's Content-Security-Policy. The rules live in
`authserver.authorize`; this module reads requests, keeps the cookies and renders.

Cookies: the session cookie (the browser's sign-in) and the CSRF cookie (a random
value each form repeats, the double-submit pattern) are HttpOnly and SameSite=Lax;
on an https issuer they are Secure and `__Host-` prefixed, so no sibling host can
plant one. SameSite=Lax still sends the session cookie on the top-level GET that
brings a browser from an application to /authorize: single sign-on.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from authserver.api.deps import ClaimsDep, Services, request_context, services_of
from authserver.api.docs import STATIC, templates
from authserver.api.middleware import content_security_policy
from authserver.api.parsing import read_form
from authserver.api.schemas import errors
from authserver.authorize import (
    CONSENT_REQUIRED,
    LOGIN_REQUIRED,
    AuthorizationError,
    AuthorizationRequest,
    with_query,
)
from authserver.errors import (
    InsufficientScopeError,
    InvalidGrantError,
    InvalidTokenError,
    OAuthError,
    SlowDownError,
)
from authserver.oidc import OPENID, userinfo, verify_id_token_hint
from authserver.responses import JSON, NO_STORE
from authserver.store.protocol import BrowserSession

router = APIRouter(tags=["browser sign-in"])
_PAGE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
_CSRF_FIELD = "csrf_token"
_SCOPE_TEXT = {
    OPENID: "know who you are (your username)",
    "read": "read your data",
    "write": "change your data",
}


def _secure(services: Services) -> bool:
    return services.issuer.startswith("https://")


def _cookie_name(services: Services, name: str) -> str:
    return f"__Host-{name}" if _secure(services) else name


def _set_cookie(
    response: Response, services: Services, name: str, value: str, max_age: int | None
) -> None:
    response.set_cookie(
        _cookie_name(services, name),
        value,
        max_age=max_age,
        path="/",
        secure=_secure(services),
        httponly=True,
        samesite="lax",
    )


def _page(
    request: Request,
    name: str,
    context: dict[str, Any],
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    page: HTMLResponse = templates.TemplateResponse(
        request,
        name,
        {"static": STATIC, **context},
        status_code=status_code,
        headers={**_PAGE_HEADERS, **(headers or {})},
    )
    return page


def _message(request: Request, heading: str, message: str, *, status_code: int) -> HTMLResponse:
    return _page(
        request,
        "message.html",
        {"heading": heading, "message": message, "error": status_code >= 400},
        status_code=status_code,
    )


def _refused(request: Request, services: Services, exc: AuthorizationError) -> Response:
    """Back to the client with the error, once its redirect URI is verified; else our page."""
    target = services.authorizer.error_redirect(exc)
    if target is not None:
        return RedirectResponse(target, status_code=303, headers=_PAGE_HEADERS)
    return _message(
        request,
        "This sign-in request cannot be completed",
        f"{exc.error.description} Go back to the application and try again, or tell its "
        "developers.",
        status_code=400,
    )


def _csrf_token(request: Request, services: Services) -> str:
    """The browser's CSRF value, or a new one (set by `_with_csrf`)."""
    value = request.cookies.get(_cookie_name(services, "authserver_csrf"), "")
    if 32 <= len(value) <= 64 and value.isascii():
        return value
    return secrets.token_urlsafe(32)


def _with_csrf(response: Response, services: Services, token: str) -> Response:
    _set_cookie(response, services, "authserver_csrf", token, None)
    return response


def _csrf_ok(request: Request, services: Services, form: Mapping[str, str]) -> bool:
    cookie = request.cookies.get(_cookie_name(services, "authserver_csrf"), "")
    sent = form.get(_CSRF_FIELD, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), sent.encode())


def _form_policy(auth: AuthorizationRequest) -> dict[str, str]:
    """The page's policy lets its form end in the redirect back to the application."""
    parts = urlsplit(auth.redirect_uri)
    return {"Content-Security-Policy": content_security_policy(f"{parts.scheme}://{parts.netloc}")}


def _form_page(
    request: Request,
    services: Services,
    auth: AuthorizationRequest,
    name: str,
    context: dict[str, Any],
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A page whose form carries `auth` on: its parameters, the CSRF value (cookie and
    field), and a policy that lets the form end in the redirect back to the application."""
    token = _csrf_token(request, services)
    page = _page(
        request,
        name,
        {"client_name": auth.client.name, "params": auth.params, "csrf_token": token, **context},
        status_code=status_code,
        headers={**_form_policy(auth), **(headers or {})},
    )
    return _with_csrf(page, services, token)


def _sign_in_page(
    request: Request,
    services: Services,
    auth: AuthorizationRequest,
    *,
    error: str | None = None,
    username: str | None = None,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    context = {
        "error": error,
        "username": username if username is not None else auth.login_hint or "",
    }
    return _form_page(
        request, services, auth, "login.html", context, status_code=status_code, headers=headers
    )


def _consent_page(
    request: Request, services: Services, auth: AuthorizationRequest, session: BrowserSession
) -> Response:
    context = {
        "username": session.username,
        "scopes": auth.scope,
        "describe": lambda s: _SCOPE_TEXT.get(s, f"use the {s} scope"),
    }
    return _form_page(request, services, auth, "consent.html", context)


async def _onwards(
    request: Request,
    services: Services,
    auth: AuthorizationRequest,
    session: BrowserSession,
) -> Response:
    """A signed-in browser: consent first if the client needs it, else back with a code."""
    authorizer = services.authorizer
    if await authorizer.must_consent(auth, session):
        authorizer.refuse_unattended(auth, CONSENT_REQUIRED)
        return _consent_page(request, services, auth, session)
    target = await authorizer.issue_code(auth, session)
    return RedirectResponse(target, status_code=303, headers=_PAGE_HEADERS)


async def _session(request: Request, services: Services) -> BrowserSession | None:
    cookie = request.cookies.get(_cookie_name(services, "authserver_session"))
    return await services.authorizer.session_of(cookie)


@router.get("/authorize", include_in_schema=False)
async def authorize(request: Request) -> Response:
    """RFC 6749 §4.1.1 with PKCE; OpenID Connect Core §3.1.2."""
    services = services_of(request)
    authorizer = services.authorizer
    try:
        auth = await authorizer.check_request(request.query_params.multi_items())
        session = await _session(request, services)
        if session is None or authorizer.must_sign_in(auth, session):
            authorizer.refuse_unattended(auth, LOGIN_REQUIRED)
            return _sign_in_page(request, services, auth)
        return await _onwards(request, services, auth, session)
    except AuthorizationError as exc:
        return _refused(request, services, exc)


_FORM_FIELDS = frozenset({_CSRF_FIELD, "username", "password", "decision"})
_FORM_EXPIRED = (
    "This form has expired or did not come from this site. Go back to the application and "
    "sign in again."
)
_FormAnswer = Callable[
    [Request, Services, Mapping[str, str], AuthorizationRequest], Awaitable[Response]
]


async def _form_post(request: Request, answer: _FormAnswer) -> Response:
    """A sign-in or consent form: read it, check its CSRF token, recover the authorization
    request it carries on (checked again, every time), then `answer` it. An unreadable
    form or a failed CSRF check gets our page; an `AuthorizationError` is refused as
    /authorize would refuse it."""
    services = services_of(request)
    try:
        try:
            form = await read_form(request)
        except OAuthError:
            return _message(request, "Bad request", "The form could not be read.", status_code=400)
        items = [(k, v) for k, v in form.items() if k not in _FORM_FIELDS]
        auth = await services.authorizer.check_request(items)
        if not _csrf_ok(request, services, form):
            return _message(request, "Please try again", _FORM_EXPIRED, status_code=400)
        return await answer(request, services, form, auth)
    except AuthorizationError as exc:
        return _refused(request, services, exc)


def _sign_in_refused(
    request: Request, services: Services, auth: AuthorizationRequest, username: str, exc: Exception
) -> Response:
    """The form again, saying why, the username kept (Keycloak's login theme does so)."""
    if isinstance(exc, SlowDownError):
        minutes = max(1, -(-exc.retry_after // 60))
        error = (
            f"Too many failed sign-ins. Wait {minutes} minute{'s' * (minutes > 1)} and try again."
        )
        status_code, headers = 429, exc.headers()
    elif not username:  # the form came without one of them
        error, status_code, headers = "Enter your username and your password.", 400, {}
    else:
        error = "The username or password is not right. Check them and try again."
        status_code, headers = 401, {}
    return _sign_in_page(
        request,
        services,
        auth,
        error=error,
        username=username,
        status_code=status_code,
        headers=headers,
    )


async def _answer_sign_in(
    request: Request, services: Services, form: Mapping[str, str], auth: AuthorizationRequest
) -> Response:
    ctx, authorizer = request_context(request), services.authorizer
    username, password = form.get("username", ""), form.get("password", "")
    if not username or not password:  # nothing to check: no failure counted
        return _sign_in_refused(request, services, auth, "", InvalidGrantError())
    try:
        user = await services.auth.authenticate_user(
            ctx, username=username, password=password, now=authorizer.clock()
        )
    except (InvalidGrantError, SlowDownError) as exc:
        return _sign_in_refused(request, services, auth, username, exc)
    session, cookie = await authorizer.start_session(ctx, user, client_id=auth.client.client_id)
    try:
        response = await _onwards(request, services, auth, session)
    except AuthorizationError as exc:  # prompt=none: no consent page to show
        response = _refused(request, services, exc)
    _set_cookie(response, services, "authserver_session", cookie, authorizer.session_max_age)
    return response


async def _answer_consent(
    request: Request, services: Services, form: Mapping[str, str], auth: AuthorizationRequest
) -> Response:
    session = await _session(request, services)
    if session is None:
        return _sign_in_page(request, services, auth)
    decision = form.get("decision")
    if decision not in {"allow", "deny"}:
        return _consent_page(request, services, auth, session)
    authorizer = services.authorizer
    await authorizer.consent(request_context(request), auth, session, allow=decision == "allow")
    target = await authorizer.issue_code(auth, session)
    return RedirectResponse(target, status_code=303, headers=_PAGE_HEADERS)


@router.post("/authorize/sign-in", include_in_schema=False)
async def sign_in(request: Request) -> Response:
    """The sign-in form: the same password rule, throttle and audit as /login."""
    return await _form_post(request, _answer_sign_in)


@router.post("/authorize/consent", include_in_schema=False)
async def consent(request: Request) -> Response:
    """The consent form's answer: remembered per user, client and scope set."""
    return await _form_post(request, _answer_consent)


@router.get("/end-session", include_in_schema=False)
async def end_session(request: Request) -> Response:
    """OpenID Connect RP-Initiated Logout 1.0: end the browser session the id_token_hint
    names, and every session begun from it; back to a registered post-logout URI."""
    services, ctx = services_of(request), request_context(request)
    params = request.query_params
    hint = params.get("id_token_hint", "")
    try:
        claims = verify_id_token_hint(
            hint, services.auth.keys, issuer=services.issuer
        )  # an expired one still names the session
    except InvalidTokenError:
        return _message(
            request,
            "Sign-out failed",
            "The application did not say who to sign out (no valid id_token_hint).",
            status_code=400,
        )
    client_id = claims["aud"]
    target = params.get("post_logout_redirect_uri")
    client = await services.clients.get(client_id)
    if params.get("client_id", client_id) != client_id or (
        target is not None and (client is None or target not in client.post_logout_redirect_uris)
    ):
        return _message(
            request,
            "Sign-out failed",
            "The application asked to be sent back to an address it did not register.",
            status_code=400,
        )
    sub = claims.get("sub")
    await services.authorizer.end_session(ctx, claims["sid"], sub if isinstance(sub, str) else "")
    if target is not None:
        response: Response = RedirectResponse(
            with_query(target, {"state": params.get("state")}),
            status_code=303,
            headers=_PAGE_HEADERS,
        )
    else:
        response = _message(
            request, "Signed out", "You are signed out. You can close this page.", status_code=200
        )
    current = await _session(request, services)
    if current is None or current.id == claims["sid"]:
        response.delete_cookie(
            _cookie_name(services, "authserver_session"),
            path="/",
            secure=_secure(services),
            httponly=True,
            samesite="lax",
        )
    return response


async def _userinfo(services: Services, claims: ClaimsDep) -> JSON:
    if OPENID not in claims.scope:
        raise InsufficientScopeError((OPENID,))
    sid = claims.raw.get("sid")
    if isinstance(sid, str) and not await services.store.session_live(sid):
        raise InvalidTokenError("The session of this access token has ended.")
    return JSON(userinfo(claims.sub), headers=NO_STORE)


@router.get(
    "/userinfo",
    responses=errors(401, 403, 503),
    summary="OpenID Connect UserInfo: who the access token's user is",
)
async def userinfo_get(request: Request, claims: ClaimsDep) -> JSON:
    return await _userinfo(services_of(request), claims)


@router.post("/userinfo", responses=errors(401, 403, 503), summary="OpenID Connect UserInfo (POST)")
async def userinfo_post(request: Request, claims: ClaimsDep) -> JSON:
    return await _userinfo(services_of(request), claims)
