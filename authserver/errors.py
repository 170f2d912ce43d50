"""Protocol errors: one hierarchy, rendered in one place (`app.py`).

Codes and statuses follow RFC 6749 §5.2 (token endpoint) and RFC 6750 §3.1
(bearer-protected resources): https://www.rfc-editor.org/rfc/rfc6749#section-5.2
"""

from __future__ import annotations


class OAuthError(Exception):
    """Base of every error a client can cause; `app.py` turns it into a response."""

    error: str = "invalid_request"
    status_code: int = 400
    description: str = "The request is invalid."

    def __init__(self, description: str | None = None, *, status_code: int | None = None) -> None:
        self.description = description or type(self).description
        if status_code is not None:
            self.status_code = status_code
        super().__init__(self.description)

    def headers(self) -> dict[str, str]:
        return {}

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
        return {"WWW-Authenticate": 'Basic realm="authserver"'} if self.status_code == 401 else {}


class InvalidGrantError(OAuthError):
    error = "invalid_grant"
    description = "The grant is invalid, expired or revoked."

    def headers(self) -> dict[str, str]:
        # /login and /refresh answer 401, and a 401 must carry a challenge (RFC 9110
        # §15.5.2). Bearer, not Basic: Basic would make a browser prompt for a password.
        return {"WWW-Authenticate": 'Bearer realm="authserver"'} if self.status_code == 401 else {}


class UnauthorizedClientError(OAuthError):
    error = "unauthorized_client"
    description = "The client may not use this grant type."


class UnsupportedGrantTypeError(OAuthError):
    error = "unsupported_grant_type"
    description = "The grant type is not supported."


class InvalidScopeError(OAuthError):
    error = "invalid_scope"
    description = "The requested scope is invalid or exceeds the granted scope."


class SlowDownError(OAuthError):
    """Too many failed logins (RFC 8628 §3.5 borrows this code for throttling)."""

    error = "slow_down"
    status_code = 429
    description = "Too many failed attempts; try again later."

    def __init__(self, retry_after: int, description: str | None = None) -> None:
        super().__init__(description)
        self.retry_after = max(1, retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class TemporarilyUnavailableError(OAuthError):
    """The store is down or too contended; the client may retry (RFC 6749 §4.1.2.1)."""

    error = "temporarily_unavailable"
    status_code = 503
    description = "The service is temporarily unavailable; retry shortly."

    def __init__(self, description: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(description)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class BearerError(OAuthError):
    """Errors of a bearer-protected resource carry an RFC 6750 §3 challenge."""

    def headers(self) -> dict[str, str]:
        desc = self.description.replace("\\", "").replace('"', "'")
        return {"WWW-Authenticate": f'Bearer error="{self.error}", error_description="{desc}"'}


class MissingTokenError(OAuthError):
    """No credentials at all: RFC 6750 §3.1 says send the bare challenge, no error code."""

    error = "invalid_request"
    status_code = 401
    description = "Authentication required: send an access token as 'Authorization: Bearer'."

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


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

    def __init__(self, scopes: tuple[str, ...] = (), description: str | None = None) -> None:
        super().__init__(description)
        self.scopes = scopes

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if self.scopes:
            headers["WWW-Authenticate"] += f', scope="{" ".join(self.scopes)}"'
        return headers
