"""The scope grammar (RFC 6749 §3.3), for the configuration and the grants alike.

    scope       = scope-token *( SP scope-token )
    scope-token = 1*( %x21 / %x23-5B / %x5D-7E )

https://www.rfc-editor.org/rfc/rfc6749#section-3.3
"""

from __future__ import annotations

import re

from authserver.errors import InvalidScopeError

_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def is_scope_token(token: str) -> bool:
    return _SCOPE_TOKEN.fullmatch(token) is not None


def parse_scope(scope: str | None) -> tuple[str, ...] | None:
    """Split a scope parameter into its tokens, without repeats; None when absent or empty.

    Raises `InvalidScopeError` for a token outside the grammar.
    """
    if scope is None or not scope.strip(" "):
        return None
    tokens = tuple(dict.fromkeys(t for t in scope.split(" ") if t))
    if not all(is_scope_token(t) for t in tokens):
        raise InvalidScopeError("The scope parameter is malformed.")
    return tokens
