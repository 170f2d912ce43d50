"""Protocol errors: one hierarchy, each error knowing its whole answer.

An `OAuthError` says its status, its JSON body and its headers (the no-store
pair and, where one is due, the challenge); `authserver.responses` renders it,
the one way, for the server and for the resource kit alike. Nothing here knows
HTTP frameworks, so every domain module may raise these.

Codes and statuses follow RFC 6749 §5.2 (token endpoint) and RFC 6750 §3.1
(bearer-protected resources): https://www.rfc-editor.org/rfc/rfc6749#section-5.2
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

# RFC 6749 §5.1 and §5.2: neither a token response nor an error may be cached.
NO_STORE: Final[Mapping[str, str]] = {"Cache-Control": "no-store", "Pragma": "no-cache"}


# RFC 6749 §5.2: error_description = 1*( %x20-21 / %x23-5B / %x5D-7E )
_DESCRIPTION_CHARS = frozenset(chr(c) for c in range(0x20, 0x7F)) - {'"', "\\"}


def _description(text: str) -> str:
    """`text` in the characters RFC 6749 §5.2 allows: quotes become apostrophes, and
    anything else outside the set (control characters, non-ASCII) is dropped."""
    text = text.replace('"', "'")
    return "".join(c for c in text if c in _DESCRIPTION_CHARS)


class OAuthError(Exception):
    """Base of every error answer (mostly ones a client causes), with the response it becomes.

    A description is written by us and never quotes the request (no parameter name
    or value a client sent); it is kept to RFC 6749 §5.2's characters all the same.
    """

    error: str = "invalid_request"
    status_code: int = 400
    description: str = "The request is invalid."

    def __init__(self, description: str | None = None, *, status_code: int | None = None) -> None:
        self.description = _description(description or type(self).description)
        if status_code is not None:
            self.status_code = status_code
        super().__init__(self.description)

    def headers(self) -> dict[str, str]:
        return dict(NO_STORE)

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


class InvalidRequestError(OAuthError):
    error = "invalid_request"
    description = "The request is missing a parameter or is otherwise malformed."


class InvalidClientError(OAuthError):
    error = "invalid_client"
    status_code = 401
    description = "Client authentication failed."

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if self.status_code == 401:
            headers["WWW-Authenticate"] = 'Basic realm="authserver"'
        return headers


class InvalidGrantError(OAuthError):
    error = "invalid_grant"
    description = "The grant is invalid, expired or revoked."

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if self.status_code == 401:
            # A 401 must carry a challenge (RFC 9110 §15.5.2). Bearer, not Basic:
            # Basic would make a browser prompt for a password.
            headers["WWW-Authenticate"] = 'Bearer realm="authserver"'
        return headers


class UnauthorizedClientError(OAuthError):
    error = "unauthorized_client"
    description = "The client may not use this grant type."


class UnsupportedGrantTypeError(OAuthError):
    error = "unsupported_grant_type"
    description = "The grant type is not supported."


class InvalidScopeError(OAuthError):
    error = "invalid_scope"
    description = "The requested scope is invalid or exceeds the granted scope."


# The authorization endpoint's own codes (RFC 6749 §4.1.2.1, OpenID Connect Core
# §3.1.2.6): sent back to the client in the redirect, never as a response body.
class UnsupportedResponseTypeError(OAuthError):
    error = "unsupported_response_type"
    description = "The response type is not supported."


class AccessDeniedError(OAuthError):
    error = "access_denied"
    description = "The user refused the request."


class LoginRequiredError(OAuthError):
    error = "login_required"
    description = "The user must sign in."


class ConsentRequiredError(OAuthError):
    error = "consent_required"
    description = "The user must allow the application."


class SlowDownError(OAuthError):
    """Too many failed logins (RFC 8628 §3.5 borrows this code for throttling)."""

    error = "slow_down"
    status_code = 429
    description = "Too many failed attempts; try again later."

    def __init__(self, retry_after: int, description: str | None = None) -> None:
        super().__init__(description)
        self.retry_after = max(1, retry_after)

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Retry-After": str(self.retry_after)}


class TemporarilyUnavailableError(OAuthError):
    """The store is down or too contended; the client may retry (RFC 6749 §4.1.2.1)."""

    error = "temporarily_unavailable"
    status_code = 503
    description = "The service is temporarily unavailable; retry shortly."

    def __init__(self, description: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(description)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Retry-After": str(self.retry_after)}


class UnhealthyError(TemporarilyUnavailableError):
    """/health's 503: the error body, plus the `status` a health probe reads."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"Unavailable: {problem}.", retry_after=5)

    def body(self) -> dict[str, str]:
        return {"status": "unavailable", **super().body()}


class ServerError(OAuthError):
    """A bug of ours: RFC 6749 §4.1.2.1's `server_error`. The detail goes to the log,
    never to the client."""

    error = "server_error"
    status_code = 500
    description = "An unexpected error occurred."


class NotServedError(OAuthError):
    """No route for this path (404) or this method (405, with `Allow`).

    Still an RFC 6749 §5.2 code in the body, as for every error; the status and the
    description tell the rest. The only error without no-store: it says nothing about
    a credential, and a cache may keep it like any 404 (RFC 9111 §4.2.2).
    """

    error = "invalid_request"

    def __init__(
        self, description: str, *, status_code: int, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(description, status_code=status_code)
        self._headers = dict(headers or {})

    def headers(self) -> dict[str, str]:
        return dict(self._headers)


class SessionNotFoundError(OAuthError):
    """No live session of the caller's has that id: another user's, an ended one and a
    made-up one alike (so another user's session ids cannot be probed)."""

    error = "invalid_request"
    status_code = 404
    description = "No live session of yours has this id."


# RFC 9449 (DPoP): https://www.rfc-editor.org/rfc/rfc9449
DPOP_ALGS = "ES256 RS256"  # the `algs` of a DPoP challenge: keys.ALGORITHMS, spelled out


class BearerError(OAuthError):
    """Errors of a bearer-protected resource carry an RFC 6750 §3 challenge."""

    def headers(self) -> dict[str, str]:
        desc = self.description.replace("\\", "").replace('"', "'")
        challenge = f'Bearer error="{self.error}", error_description="{desc}"'
        return {**super().headers(), "WWW-Authenticate": challenge}


class MissingTokenError(OAuthError):
    """No credentials at all: RFC 6750 §3.1 says send the bare challenge, no error code."""

    error = "invalid_request"
    status_code = 401
    description = "Authentication required: send an access token as 'Authorization: Bearer'."

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": "Bearer"}


class MalformedBearerRequestError(BearerError):
    """RFC 6750 §3.1 invalid_request: e.g. more than one way of sending a token."""

    error = "invalid_request"
    status_code = 400
    description = "The request is malformed."


class InvalidTokenError(BearerError):
    error = "invalid_token"
    status_code = 401
    description = "The access token is invalid."


class InsufficientScopeError(BearerError):
    error = "insufficient_scope"
    status_code = 403
    description = "The access token lacks the required scope."

    def __init__(
        self, scopes: tuple[str, ...] = (), description: str | None = None, *, dpop: bool = False
    ) -> None:
        super().__init__(description)
        self.scopes = scopes
        self.dpop = dpop  # the token came with the DPoP scheme: so does the challenge

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if self.dpop:  # RFC 9449 §7.1
            challenge = headers["WWW-Authenticate"].removeprefix("Bearer ")
            headers["WWW-Authenticate"] = f'DPoP {challenge}, algs="{DPOP_ALGS}"'
        if self.scopes:
            headers["WWW-Authenticate"] += f', scope="{" ".join(self.scopes)}"'
        return headers


# RFC 9449 (DPoP) at token endpoints: https://www.rfc-editor.org/rfc/rfc9449
class InvalidDPoPProofError(OAuthError):
    """RFC 9449 §5: a DPoP proof at a token endpoint is missing, malformed or wrong."""

    error = "invalid_dpop_proof"
    description = "The DPoP proof is invalid."


class UseDPoPNonceError(OAuthError):
    """RFC 9449 §8: the proof must carry the server's nonce, sent in `DPoP-Nonce`."""

    error = "use_dpop_nonce"
    description = "Send a DPoP proof with the nonce in the DPoP-Nonce header."

    def __init__(self, nonce: str, description: str | None = None) -> None:
        super().__init__(description)
        self.nonce = nonce

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "DPoP-Nonce": self.nonce}


class DPoPResourceError(OAuthError):
    """A DPoP-protected resource's refusal (RFC 9449 §7.1): 401 with a `DPoP` challenge
    naming the error (`invalid_dpop_proof`, `use_dpop_nonce` or `invalid_token`)."""

    status_code = 401

    def __init__(self, error: str, description: str, *, nonce: str | None = None) -> None:
        super().__init__(description)
        self.error = error
        self.nonce = nonce

    @classmethod
    def of(cls, exc: OAuthError) -> DPoPResourceError:
        """The resource's form of a proof or token error raised while checking a request."""
        return cls(exc.error, exc.description, nonce=getattr(exc, "nonce", None))

    def headers(self) -> dict[str, str]:
        challenge = (
            f'DPoP error="{self.error}", error_description="{self.description}", algs="{DPOP_ALGS}"'
        )
        headers = {**super().headers(), "WWW-Authenticate": challenge}
        if self.nonce is not None:
            headers["DPoP-Nonce"] = self.nonce
        return headers
