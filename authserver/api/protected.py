"""The example protected resource."""

from __future__ import annotations

from fastapi import APIRouter

from authserver.api.deps import ClaimsDep
from authserver.api.schemas import ProtectedResponse, errors
from authserver.responses import JSON

router = APIRouter(tags=["resources"])


@router.get(
    "/protected",
    response_model=ProtectedResponse,
    responses=errors(401),
    summary="A resource that needs a valid access token",
)
async def protected(claims: ClaimsDep) -> JSON:
    return JSON({"message": "Access granted for protected route.", "username": claims.sub})
