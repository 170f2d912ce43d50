"""Discovery: the JWKS (RFC 7517) and authorization server metadata (RFC 8414)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from authserver.api.deps import ServicesDep
from authserver.authorize import PROMPTS, S256
from authserver.clients import AUTH_METHODS
from authserver.dpop import SIGNING_ALGORITHMS as DPOP_ALGORITHMS
from authserver.grants import GRANT_TYPES
from authserver.keys import ALGORITHMS
from authserver.oidc import OPENID, discovery
from authserver.responses import JSON

router = APIRouter(tags=["discovery"])
# Short enough that resource servers see a new or retired key within a minute.
_CACHE = {"Cache-Control": "public, max-age=60"}
_METADATA_PATH = "/.well-known/oauth-authorization-server"


@router.get("/.well-known/jwks.json", summary="Public keys that verify access tokens")
async def jwks(services: ServicesDep) -> JSON:
    return JSON(services.keyring.jwks(), headers=_CACHE)


def metadata(issuer: str, scopes: tuple[str, ...]) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "token_endpoint": f"{issuer}/token",
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "revocation_endpoint": f"{issuer}/revoke",
        "authorization_endpoint": f"{issuer}/authorize",
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "code_challenge_methods_supported": [S256],
        # RFC 9207: every answer of /authorize names the issuer.
        "authorization_response_iss_parameter_supported": True,
        "prompt_values_supported": sorted(PROMPTS),
        "grant_types_supported": list(GRANT_TYPES),
        "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "token_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
        "revocation_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "revocation_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
        "introspection_endpoint": f"{issuer}/introspect",
        # Confidential clients only: `none` authenticates nobody here.
        "introspection_endpoint_auth_methods_supported": [m for m in AUTH_METHODS if m != "none"],
        "introspection_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
        "scopes_supported": [OPENID, *(s for s in scopes if s != OPENID)],
        # RFC 9449 §5.1: the algorithms DPoP proofs may be signed with.
        "dpop_signing_alg_values_supported": list(DPOP_ALGORITHMS),
        "service_documentation": f"{issuer}/docs",
    }


@router.get("/", summary="This server: its issuer and where to find out more")
async def index(services: ServicesDep) -> JSON:
    # The issuer identifier is a URL too, and should answer: with the way onwards.
    meta = metadata(services.issuer, services.scopes)
    links = {k: meta[k] for k in ("issuer", "jwks_uri", "token_endpoint", "service_documentation")}
    links["authorization_server_metadata"] = f"{meta['issuer']}{_METADATA_PATH}"
    return JSON(links, headers=_CACHE)


@router.get(_METADATA_PATH, summary="RFC 8414 authorization server metadata")
async def authorization_server_metadata(services: ServicesDep) -> JSON:
    return JSON(metadata(services.issuer, services.scopes), headers=_CACHE)


@router.get(
    "/.well-known/openid-configuration", summary="OpenID Connect Discovery 1.0 provider metadata"
)
async def openid_configuration(services: ServicesDep) -> JSON:
    meta = metadata(services.issuer, services.scopes)
    return JSON(discovery(services.issuer, services.scopes, meta), headers=_CACHE)
