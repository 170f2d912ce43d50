"""Token introspection (RFC 7662): is this token good now, and what does it say?

A resource server that must see a logout or a reuse detection at once asks here
instead of (or besides) verifying tokens itself. An access token is active
while it verifies, has not expired, and its session (`sid`, the refresh family)
has not been revoked; a client's own token (no `sid`) while its client is
registered and enabled. A refresh token is active while it could still be
exchanged (the rotation's own rule, `store/rotation.py`). Anything else is
`{"active": false}` and nothing more, never a hint why (RFC 7662 §2.2).
https://www.rfc-editor.org/rfc/rfc7662
"""

from __future__ import annotations

import time
from typing import Any

from authserver.clients import ClientService
from authserver.errors import InvalidTokenError
from authserver.refresh import MAX_REFRESH_TOKEN_LENGTH, digest
from authserver.store.protocol import Client, Store
from authserver.tokens import AccessClaims, AccessTokenVerifier

INACTIVE: dict[str, Any] = {"active": False}


def session_of(claims: AccessClaims | None) -> str | None:
    """The session (`sid`) a user's access token belongs to; None for a client's own."""
    sid = claims.raw.get("sid") if claims is not None else None
    return sid if isinstance(sid, str) else None


class Introspector:
    def __init__(
        self, *, verifier: AccessTokenVerifier, store: Store, clients: ClientService
    ) -> None:
        # `verifier` accepts every audience: tokens of clients with their own audience too.
        self.verifier = verifier
        self.store = store
        self.clients = clients

    def access_claims(self, token: str) -> AccessClaims | None:
        """The claims of `token` if it is a valid access token (CPU only, no store read)."""
        try:
            return self.verifier.verify(token)
        except InvalidTokenError:
            return None

    async def answer(
        self,
        token: str,
        claims: AccessClaims | None,
        *,
        session_live: bool | None,
        caller: Client,
    ) -> dict[str, Any]:
        """The RFC 7662 §2.2 answer for `token`, an access or a refresh token, given
        `access_claims(token)` and, for a user's access token, whether its session
        (`session_of(claims)`) was live when read with `caller`, the client asking, just
        authenticated."""
        if claims is None:
            return await self._refresh_token(token)
        sid = session_of(claims)
        if sid is not None:
            if not session_live:
                return INACTIVE
        elif claims.client_id != caller.client_id:
            # A resource server asking about its own token has just been read, enabled.
            client = await self.clients.get(claims.client_id)
            if client is None or client.disabled:
                return INACTIVE
        answer: dict[str, Any] = {
            "active": True,
            "token_type": "access_token",
            "scope": " ".join(claims.scope),
            "client_id": claims.client_id,
            "sub": claims.sub,
            "aud": claims.aud,
            "iss": claims.iss,
            "exp": int(claims.exp),
            "iat": int(claims.iat),
            "jti": claims.jti,
        }
        if sid is not None:
            answer["username"] = claims.sub
            answer["sid"] = sid
        cnf = claims.raw.get("cnf")
        if isinstance(cnf, dict):
            answer["cnf"] = cnf  # RFC 9449 §6.2: the key the token is bound to
        return answer

    async def _refresh_token(self, token: str) -> dict[str, Any]:
        if not token or len(token) > MAX_REFRESH_TOKEN_LENGTH:
            return INACTIVE
        rec = await self.store.find_refresh(digest(token), now=time.time())
        if rec is None or rec.status != "active" or rec.refusal is not None:
            return INACTIVE
        answer: dict[str, Any] = {
            "active": True,
            "token_type": "refresh_token",
            "scope": rec.scope,
            "client_id": rec.client_id,
            "username": rec.username,
            "sub": rec.username,
            "exp": int(rec.expires_at),
            "iat": int(rec.created_at),
            "sid": rec.family_id,
        }
        if rec.dpop_jkt is not None:
            answer["cnf"] = {"jkt": rec.dpop_jkt}
        return answer
