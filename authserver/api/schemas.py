"""Request and response bodies, as they appear in the OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # Unknown parameters are ignored (RFC 6749 §3.1); values are never coerced.
    model_config = ConfigDict(extra="ignore", strict=True)


class LoginRequest(_Request):
    username: str = Field(min_length=1)
    password: str
    scope: str | None = None
    client_id: str | None = None


class RefreshRequest(_Request):
    refresh_token: str = Field(min_length=1)
    scope: str | None = None
    client_id: str | None = None


class LogoutRequest(_Request):
    refresh_token: str = Field(min_length=1)
    client_id: str | None = None


class TokenResponse(BaseModel):
    access_token: str
    # Not for client_credentials (RFC 6749 §4.4.3), nor for a client without that grant.
    refresh_token: str | None = None
    token_type: str = Field(examples=["bearer"])
    expires_in: int
    scope: str


class ErrorBody(BaseModel):
    error: str
    error_description: str


class ProtectedResponse(BaseModel):
    message: str
    username: str


class SessionPublic(BaseModel):
    id: str
    client_id: str
    created_at: int
    last_used_at: int
    expires_at: int
    ip: str | None
    user_agent: str | None
    current: bool


class SessionList(BaseModel):
    sessions: list[SessionPublic]


class HealthResponse(BaseModel):
    status: str


def body_schema(model: type[BaseModel], *, form: bool, json: bool) -> dict[str, Any]:
    """An `openapi_extra` request body for a route that parses its own body."""
    schema = model.model_json_schema()
    content: dict[str, Any] = {}
    if json:
        content["application/json"] = {"schema": schema}
    if form:
        content["application/x-www-form-urlencoded"] = {"schema": schema}
    return {"requestBody": {"required": True, "content": content}}


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again (RFC 9110 §10.2.3)",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
        "required": True,
    }
}
_DESCRIPTIONS = {
    400: "A malformed request or a refused grant (RFC 6749 §5.2)",
    401: "Missing or invalid credentials",
    403: "The access token may not do this: insufficient_scope",
    404: "No such resource (of the caller's)",
    413: "The request body is too large",
    415: "The body is neither JSON nor form-encoded",
    429: "Too many failed logins: slow_down",
    503: "The database or the signing key is unavailable: temporarily_unavailable",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses, each an `ErrorBody`."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {"model": ErrorBody}
        if status in _DESCRIPTIONS:
            response["description"] = _DESCRIPTIONS[status]
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        responses[status] = response
    return responses
