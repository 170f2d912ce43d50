"""Response helpers: fast JSON, and the no-store headers every token response carries."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

# RFC 6749 §5.1: token responses must not be cached.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class JSON(JSONResponse):
    """`JSONResponse` rendered by orjson."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def token_response(body: dict[str, Any]) -> JSON:
    return JSON(body, headers=NO_STORE)
