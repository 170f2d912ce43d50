"""OpenID Connect Core 1.0: the id_token, the UserInfo answer, and the discovery document.

https://openid.net/specs/openid-connect-core-1_0.html
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from authserver.errors import InvalidTokenError
from authserver.keys import ALGORITHMS
from authserver.tokens import (
    MAX_TOKEN_LENGTH,
    KeyRingSource,
    jwt_header,
    sign_jwt,
    verify_assertion,
)

OPENID = "openid"
ID_TOKEN_TTL = 300  # seconds: an id_token says who signed in, once; it is no session


def at_hash(access_token: str) -> str:
    """§3.1.3.6: the left half of the access token's hash, base64url. SHA-256 for every
    algorithm we sign with (RS256, ES256)."""
    half = hashlib.sha256(access_token.encode("ascii")).digest()[:16]
    return base64.urlsafe_b64encode(half).rstrip(b"=").decode("ascii")


def mint_id_token(
    keys: KeyRingSource,
    *,
    issuer: str,
    subject: str,
    client_id: str,
    nonce: str | None,
    auth_time: float,
    sid: str,
    access_token: str,
    now: float,
) -> str:
    """An id_token (§2) for `client_id`, signed like access tokens, with `typ: JWT`."""
    kid, alg, key = keys.signing_key()
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": client_id,
        "exp": int(now) + ID_TOKEN_TTL,
        "iat": int(now),
        "auth_time": int(auth_time),
        "at_hash": at_hash(access_token),
        "sid": sid,
    }
    if nonce is not None:
        claims["nonce"] = nonce
    return sign_jwt(claims, key=key, alg=alg, kid=kid)


def verify_id_token_hint(token: str, keys: KeyRingSource, *, issuer: str) -> dict[str, Any]:
    """The claims of an id_token this server issued, expired or not (RP-Initiated Logout
    §2: an expired id_token_hint still names the session); `InvalidTokenError` else."""
    if (
        len(token) > MAX_TOKEN_LENGTH or jwt_header(token).get("typ") != "JWT"
    ):  # not an access token (at+jwt)
        raise InvalidTokenError("The id_token_hint is not an id_token.")
    claims = verify_assertion(token, keys.verification_keys())
    if claims.get("iss") != issuer or not isinstance(claims.get("sid"), str):
        raise InvalidTokenError("The id_token_hint was not issued by this server.")
    aud = claims.get("aud")
    if not isinstance(aud, str) or not aud:
        raise InvalidTokenError("The id_token_hint names no client.")
    return claims


def userinfo(username: str) -> dict[str, str]:
    """The UserInfo answer (§5.3.2): the claims an `openid` access token may read."""
    return {"sub": username, "preferred_username": username}


def discovery(issuer: str, scopes: tuple[str, ...], metadata: dict[str, Any]) -> dict[str, Any]:
    """OpenID Connect Discovery 1.0 §3: the RFC 8414 `metadata` and what OpenID adds."""
    return {
        **metadata,
        "userinfo_endpoint": f"{issuer}/userinfo",
        "end_session_endpoint": f"{issuer}/end-session",
        "scopes_supported": [OPENID, *(s for s in scopes if s != OPENID)],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": list(ALGORITHMS),
        "claims_supported": [
            "iss",
            "sub",
            "aud",
            "exp",
            "iat",
            "auth_time",
            "nonce",
            "at_hash",
            "sid",
            "preferred_username",
        ],
        "request_parameter_supported": False,
        "request_uri_parameter_supported": False,
        "claims_parameter_supported": False,
    }
