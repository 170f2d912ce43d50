"""Self-service sessions: GET /sessions, DELETE /sessions/{id}, DELETE /sessions.

The caller is the user of the access token, verified exactly as /protected
verifies it (`deps.ClaimsDep`: the same dependency, so the DPoP-bound tokens
that /protected learns to accept are accepted here too, with nothing to change
in this module). A client's own token (client_credentials) is 403
`insufficient_scope`: it is valid, but speaks for no user (`sessions.Caller`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from authserver.api.deps import ClaimsDep, ServicesDep, request_context
from authserver.api.schemas import SessionList, errors
from authserver.errors import SessionNotFoundError
from authserver.responses import JSON, NO_STORE
from authserver.sessions import Caller
from authserver.store.protocol import Session

router = APIRouter(tags=["sessions"])


async def get_caller(claims: ClaimsDep) -> Caller:
    return Caller.of(claims)


CallerDep = Annotated[Caller, Depends(get_caller)]


def _public(session: Session, caller: Caller) -> dict[str, object]:
    return {
        "id": session.id,
        "client_id": session.client_id,
        "created_at": int(session.created_at),
        "last_used_at": int(session.last_used_at),
        "expires_at": int(session.expires_at),
        "ip": session.ip,
        "user_agent": session.user_agent,
        "current": session.id == caller.session_id,
    }


@router.get(
    "/sessions",
    response_model=SessionList,
    responses=errors(401, 403, 503),
    summary="The caller's live sessions (times in Unix seconds)",
)
async def list_sessions(caller: CallerDep, services: ServicesDep) -> JSON:
    sessions = await services.sessions.list_own(caller)
    return JSON({"sessions": [_public(s, caller) for s in sessions]}, headers=NO_STORE)


@router.delete(
    "/sessions/{session_id}",
    status_code=204,
    responses={204: {"description": "The session has ended"}, **errors(401, 403, 404, 503)},
    summary="End one of the caller's sessions",
)
async def end_session(
    session_id: str, request: Request, caller: CallerDep, services: ServicesDep
) -> Response:
    ended = await services.sessions.end(request_context(request), session_id, caller=caller)
    if ended is None:
        raise SessionNotFoundError()
    return Response(status_code=204, headers=NO_STORE)


@router.delete(
    "/sessions",
    status_code=204,
    responses={204: {"description": "Every other session has ended"}, **errors(401, 403, 503)},
    summary="End every session of the caller but the current one",
)
async def end_other_sessions(
    request: Request, caller: CallerDep, services: ServicesDep
) -> Response:
    await services.sessions.end_others(request_context(request), caller)
    return Response(status_code=204, headers=NO_STORE)
