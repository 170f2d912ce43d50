"""Readiness (`/health`: the database answers and a signing key is loaded) and liveness
(`/health/live`: the process answers, touching nothing else)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter

from authserver.api.deps import ServicesDep
from authserver.api.schemas import HealthResponse
from authserver.errors import UnhealthyError
from authserver.responses import JSON
from authserver.store.protocol import StoreError

router = APIRouter(tags=["operations"])
log = logging.getLogger("authserver.health")
_PING_TIMEOUT = 2.0


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"description": "The database or the signing key is missing"}},
)
async def health(services: ServicesDep) -> JSON:
    problem = None
    if not services.keyring.keys:
        problem = "no signing key is loaded"
    else:
        try:
            await asyncio.wait_for(services.store.ping(), _PING_TIMEOUT)
        except (StoreError, TimeoutError):
            problem = "the database does not answer"
    if problem is None:
        return JSON({"status": "ok"}, headers={"Cache-Control": "no-store"})
    log.warning("health check failed: %s", problem)
    raise UnhealthyError(problem)


@router.get("/health/live", response_model=HealthResponse)
async def live() -> JSON:
    # Nothing but the event loop: a database outage must not get a healthy process restarted.
    return JSON({"status": "ok"}, headers={"Cache-Control": "no-store"})
