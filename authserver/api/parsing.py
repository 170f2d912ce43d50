"""Request bodies: read with a size bound, decoded strictly, and validated.

Bodies are parsed here rather than by FastAPI's body parameters so that a bad
body becomes our `invalid_request` (never a 422 echoing the submitted password)
and so that /login can take JSON and form encoding alike.
"""

from __future__ import annotations

from typing import TypeVar
from urllib.parse import parse_qsl

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from authserver.errors import InvalidRequestError

MAX_BODY_BYTES = 2 * 1024 * 1024
FORM = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"
M = TypeVar("M", bound=BaseModel)


class PayloadTooLargeError(InvalidRequestError):
    status_code = 413
    description = "The request body is too large."


class UnsupportedMediaTypeError(InvalidRequestError):
    status_code = 415
    description = f"The body must be {JSON_TYPE} or {FORM}."


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLargeError()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLargeError()
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def parse_form(body: bytes) -> dict[str, str]:
    """Decode `application/x-www-form-urlencoded` strictly (RFC 6749 §3.2: no repeats)."""
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=50)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequestError("The form body is not valid UTF-8 form encoding.") from exc
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise InvalidRequestError("A parameter is repeated.")
        form[name] = value
    return form


def parse_json(body: bytes) -> dict[str, object]:
    try:
        value = orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequestError("The body is not valid JSON.") from exc
    if not isinstance(value, dict):
        raise InvalidRequestError("The body must be a JSON object.")
    return value


def _field_of(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    return str(loc[0]) if loc and loc[0] in model.model_fields else "body"


def validate(model: type[M], data: dict[str, object]) -> M:
    """Validate into `model`, describing the problem without echoing anything sent:
    no value, and no name but the model's own field names."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_field_of(model, err['loc'])}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)[:5]
        )
        raise InvalidRequestError(f"Invalid request: {problems}"[:400]) from exc


async def read_json_or_form(request: Request, model: type[M]) -> M:
    """For the seed-compatible endpoints: a JSON object, or the same fields form-encoded.

    Any other media type (a missing one too) is 415, before the body is read: a
    browser sends `text/plain` and form bodies cross-site without a CORS
    preflight, and only the form is one that this server must take.
    """
    kind = media_type(request)
    if kind not in (JSON_TYPE, FORM):
        raise UnsupportedMediaTypeError()
    body = await read_body(request)
    data: dict[str, object] = dict(parse_form(body)) if kind == FORM else parse_json(body)
    return validate(model, data)


async def read_form(request: Request) -> dict[str, str]:
    """For the RFC 6749/7009 endpoints, which take form encoding only."""
    body = await read_body(request)
    if media_type(request) != FORM:
        raise InvalidRequestError(f"The body must be {FORM}.")
    return parse_form(body)
