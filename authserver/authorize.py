"""The authorization endpoint (RFC 6749 §4.1, OAuth 2.1, RFC 7636 PKCE, RFC 9207 `iss`),
browser sessions, consent and authorization codes.

The HTTP layer (`api/authorize.py`) parses the request and renders pages; what a
request may ask for, when a browser must sign in or consent, and what a code is
bound to are decided here. Only the `code` response type exists: the implicit
flow puts tokens in URLs (history, logs, Referer), and OAuth 2.1 drops it. PKCE
with S256 is required of every client, confidential ones too: it binds the code
to the browser that started the flow (RFC 9700 §2.1.1).

Until the client and its redirect URI are known good, an error is a page of our
own (`AuthorizationError.redirect_uri` is None): redirecting to an unchecked URI
would make this an open redirector (RFC 6749 §4.1.2.1, RFC 9700 §4.11).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit, urlunsplit

from authserver import audit
from authserver.audit import Auditor, RequestContext
from authserver.clients import AUTHORIZATION_CODE, ClientService, is_client_id
from authserver.errors import (
    AccessDeniedError,
    ConsentRequiredError,
    InvalidClientError,
    InvalidRequestError,
    InvalidScopeError,
    LoginRequiredError,
    OAuthError,
    UnauthorizedClientError,
    UnsupportedResponseTypeError,
)
from authserver.oidc import OPENID
from authserver.refresh import digest
from authserver.scopes import parse_scope
from authserver.store.protocol import AuthorizationCode, BrowserSession, Client, Store, User

CODE_TTL = 60  # seconds (RFC 6749 §4.1.2: "a maximum authorization code lifetime of 10
# minutes is RECOMMENDED"; a browser redirect needs a second or two)
CODE_BYTES = 32
S256 = "S256"
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of a SHA-256 digest
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 §4.1
PROMPTS = frozenset({"none", "login", "consent", "select_account"})
_MAX_PARAM = 1024  # state, nonce, login_hint: stored or echoed, so bounded
# The parameters an authorization request is made of: what the forms carry along.
PARAMETERS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "prompt",
    "max_age",
    "login_hint",
)


def s256(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL(SHA256(ASCII(code_verifier)))."""
    hashed = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(hashed).rstrip(b"=").decode("ascii")


def check_verifier(verifier: str | None, challenge: str) -> bool:
    if verifier is None or _VERIFIER.fullmatch(verifier) is None:
        return False
    return hmac.compare_digest(s256(verifier), challenge)


def with_query(uri: str, params: Mapping[str, str | None]) -> str:
    """`uri` with `params` added to its query (RFC 6749 §3.1.2: keep the registered query)."""
    parts = urlsplit(uri)
    extra = urlencode({k: v for k, v in params.items() if v is not None})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


class AuthorizationError(Exception):
    """An authorization request refused: back to `redirect_uri` when it is a verified one,
    else (None) an error page of this server's own."""

    def __init__(
        self, error: OAuthError, *, redirect_uri: str | None = None, state: str | None = None
    ) -> None:
        super().__init__(error.description)
        self.error = error
        self.redirect_uri = redirect_uri
        self.state = state


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """A checked authorization request: whom to send the browser back to, with what."""

    client: Client
    redirect_uri: str
    state: str | None
    scope: tuple[str, ...]
    code_challenge: str
    nonce: str | None
    prompt: frozenset[str]
    max_age: int | None
    login_hint: str | None
    params: Mapping[str, str]  # as received: what the sign-in and consent forms carry on

    @property
    def scope_key(self) -> str:
        """The scope set, spelled one way: what a consent is remembered under."""
        return " ".join(sorted(self.scope))


def _single(items: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The request's parameters; RFC 6749 §3.1: none may be repeated, and one sent
    without a value counts as omitted."""
    params: dict[str, str] = {}
    for name, value in items:
        if name in params:
            raise InvalidRequestError(f"The '{name}' parameter is repeated.")
        if value != "":
            params[name] = value
    return params


class Authorizer:
    """Checks authorization requests, signs browsers in, remembers consent, issues codes."""

    def __init__(
        self,
        *,
        store: Store,
        clients: ClientService,
        auditor: Auditor,
        issuer: str,
        scopes: tuple[str, ...],
        session_max_age: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.clients = clients
        self.auditor = auditor
        self.issuer = issuer
        self.scopes = scopes
        self.session_max_age = session_max_age
        self.clock = clock

    async def check_request(self, items: Sequence[tuple[str, str]]) -> AuthorizationRequest:
        """The request of these (query or form) parameters; `AuthorizationError` if refused."""
        try:
            params = _single(items)
        except InvalidRequestError as exc:
            # Which client is asking is not known for sure: our own page.
            raise AuthorizationError(exc) from exc
        client, redirect_uri = await self._client_and_redirect(params)
        state = params.get("state")
        try:
            return self._check(params, client, redirect_uri)
        except OAuthError as exc:
            raise AuthorizationError(exc, redirect_uri=redirect_uri, state=state) from exc

    async def _client_and_redirect(self, params: Mapping[str, str]) -> tuple[Client, str]:
        client_id = params.get("client_id")
        if client_id is None:
            raise AuthorizationError(InvalidRequestError("The request names no client_id."))
        client = await self.clients.get(client_id) if is_client_id(client_id) else None
        if client is None or client.disabled:
            raise AuthorizationError(
                InvalidClientError("This application is not registered here.", status_code=400)
            )
        registered = client.redirect_uris
        redirect_uri = params.get("redirect_uri")
        if redirect_uri is None:
            if len(registered) != 1:
                raise AuthorizationError(InvalidRequestError("The request names no redirect_uri."))
            return client, registered[0]
        # Exact string comparison (RFC 9700 §4.1.3): no prefixes, no patterns.
        if redirect_uri not in registered:
            raise AuthorizationError(
                InvalidRequestError("The redirect_uri is not one registered for this application.")
            )
        return client, redirect_uri

    def _check(
        self, params: Mapping[str, str], client: Client, redirect_uri: str
    ) -> AuthorizationRequest:
        if "request" in params or "request_uri" in params:
            raise InvalidRequestError("Request objects are not supported.")
        response_type = params.get("response_type")
        if response_type is None:
            raise InvalidRequestError("The 'response_type' parameter is missing.")
        if response_type != "code":
            raise UnsupportedResponseTypeError("Only response_type=code is supported.")
        if AUTHORIZATION_CODE not in client.grants:
            raise UnauthorizedClientError("This client may not use the authorization code flow.")
        challenge = params.get("code_challenge")
        if challenge is None:
            raise InvalidRequestError("PKCE is required: send a code_challenge (S256).")
        if params.get("code_challenge_method") != S256:
            raise InvalidRequestError("The code_challenge_method must be S256.")
        if _CHALLENGE.fullmatch(challenge) is None:
            raise InvalidRequestError("The code_challenge is not a base64url SHA-256 digest.")
        prompt = frozenset(params.get("prompt", "").split())
        if not prompt <= PROMPTS:
            raise InvalidRequestError("The prompt parameter has an unknown value.")
        if "none" in prompt and len(prompt) > 1:
            raise InvalidRequestError("prompt=none cannot be combined with other values.")
        max_age = params.get("max_age")
        if max_age is not None and not (max_age.isascii() and max_age.isdigit()):
            raise InvalidRequestError("The max_age parameter must be a number of seconds.")
        for name in ("state", "nonce", "login_hint"):
            if len(params.get(name, "")) > _MAX_PARAM:
                raise InvalidRequestError(f"The '{name}' parameter is too long.")
        return AuthorizationRequest(
            client=client,
            redirect_uri=redirect_uri,
            state=params.get("state"),
            scope=self._scope(client, params.get("scope")),
            code_challenge=challenge,
            nonce=params.get("nonce"),
            prompt=prompt,
            max_age=int(max_age[:12]) if max_age is not None else None,
            login_hint=params.get("login_hint"),
            params={k: v for k, v in params.items() if k in PARAMETERS},
        )

    def _scope(self, client: Client, scope: str | None) -> tuple[str, ...]:
        """What the request may have: what it asks, if the client may have all of it, with
        `openid` allowed to every client; nothing asked, the client's scopes (never
        `openid`, which must be asked for)."""
        requested = parse_scope(scope)
        allowed = client.scopes if client.scopes is not None else self.scopes
        if requested is None:
            return tuple(s for s in allowed if s != OPENID)
        if any(s not in allowed and s != OPENID for s in requested):
            raise InvalidScopeError("The requested scope is not one this client may have.")
        return requested

    # -- browser sessions ------------------------------------------------------

    async def session_of(self, cookie: str | None) -> BrowserSession | None:
        """The live browser session a session cookie stands for."""
        if not cookie or len(cookie) > 128:
            return None
        return await self.store.get_browser_session(digest(cookie), now=self.clock())

    def must_sign_in(self, request: AuthorizationRequest, session: BrowserSession | None) -> bool:
        """OIDC Core §3.1.2.1: no session, `prompt=login`, or a sign-in older than `max_age`.
        (`prompt=none` then is `login_required`, for the caller to raise.)"""
        if session is None or "login" in request.prompt:
            return True
        return request.max_age is not None and self.clock() - session.auth_time > request.max_age

    async def start_session(
        self, ctx: RequestContext, user: User, *, client_id: str
    ) -> tuple[BrowserSession, str]:
        """A new browser session for a user who just signed in, and its cookie value: a
        new one at every sign-in, so that a value planted before it (session fixation)
        is worth nothing."""
        now = self.clock()
        cookie = secrets.token_urlsafe(32)
        session = BrowserSession(
            id=str(uuid.uuid4()),
            user_id=user.id,
            username=user.username,
            auth_time=now,
            expires_at=now + self.session_max_age,
        )
        event = self.auditor.build(
            audit.LOGIN_SUCCEEDED,
            ctx,
            username=user.username,
            browser_session=session.id,
            client_id=client_id,
        )
        await self.store.start_browser_session(
            session_id=session.id,
            token_hash=digest(cookie),
            user_id=user.id,
            auth_time=now,
            expires_at=session.expires_at,
            event=event,
        )
        self.auditor.emit(event)
        return session, cookie

    async def end_session(self, ctx: RequestContext, session_id: str, username: str) -> None:
        """End a browser session and revoke every session (refresh family) begun from it."""
        event = self.auditor.build(
            audit.BROWSER_SIGNED_OUT, ctx, username=username, browser_session=session_id
        )
        await self.store.end_browser_session(session_id, at=self.clock(), event=event)
        self.auditor.emit(event)

    # -- consent ---------------------------------------------------------------

    async def must_consent(self, request: AuthorizationRequest, session: BrowserSession) -> bool:
        """Third-party clients ask the user, once per scope set (or again at
        `prompt=consent`); the server's own (first-party) clients never do."""
        if not request.client.third_party:
            return False
        if "consent" in request.prompt:
            return True
        return not await self.store.has_consent(
            session.user_id, request.client.client_id, request.scope_key
        )

    async def consent(
        self,
        ctx: RequestContext,
        request: AuthorizationRequest,
        session: BrowserSession,
        *,
        allow: bool,
    ) -> None:
        """Record the user's answer; a refusal is `access_denied` (RFC 6749 §4.1.2.1)."""
        client_id = request.client.client_id
        if not allow:
            await self.auditor.record(
                audit.CONSENT_DENIED, ctx, username=session.username, client_id=client_id
            )
            raise AuthorizationError(
                AccessDeniedError("The user did not allow the application access."),
                redirect_uri=request.redirect_uri,
                state=request.state,
            )
        event = self.auditor.build(
            audit.CONSENT_GRANTED,
            ctx,
            username=session.username,
            client_id=client_id,
            scope=request.scope_key,
        )
        await self.store.add_consent(
            session.user_id, client_id, request.scope_key, at=self.clock(), event=event
        )
        self.auditor.emit(event)

    # -- codes -----------------------------------------------------------------

    async def issue_code(self, request: AuthorizationRequest, session: BrowserSession) -> str:
        """A code for this request and session; the URL that takes the browser back."""
        now = self.clock()
        code = secrets.token_urlsafe(CODE_BYTES)
        await self.store.add_code(
            AuthorizationCode(
                code_hash=digest(code),
                client_id=request.client.client_id,
                user_id=session.user_id,
                browser_session_id=session.id,
                redirect_uri=request.redirect_uri,
                code_challenge=request.code_challenge,
                scope=" ".join(request.scope),
                nonce=request.nonce,
                auth_time=session.auth_time,
                created_at=now,
                expires_at=now + CODE_TTL,
            )
        )
        return with_query(
            request.redirect_uri, {"code": code, "state": request.state, "iss": self.issuer}
        )

    def error_redirect(self, exc: AuthorizationError) -> str | None:
        """Where a refused request sends the browser (RFC 6749 §4.1.2.1, RFC 9207), or None
        for an error page of our own."""
        if exc.redirect_uri is None:
            return None
        return with_query(
            exc.redirect_uri,
            {
                "error": exc.error.error,
                "error_description": exc.error.description,
                "state": exc.state,
                "iss": self.issuer,
            },
        )

    def refuse_unattended(self, request: AuthorizationRequest, error: OAuthError) -> None:
        """`prompt=none` allows no page: `login_required` or `consent_required`."""
        if "none" in request.prompt:
            raise AuthorizationError(error, redirect_uri=request.redirect_uri, state=request.state)


LOGIN_REQUIRED = LoginRequiredError("The user is not signed in.")
CONSENT_REQUIRED = ConsentRequiredError("The user has not allowed this application yet.")
