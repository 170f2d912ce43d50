"""A small API that accepts authserver's access tokens: each user's notes.

GET /notes (scope `read`) lists the caller's notes; POST /notes (scope `write`)
adds one. `create_app(issuer, audience)` builds it for any authserver; run it
next to one with::

    NOTES_ISSUER=http://127.0.0.1:8000 .venv/bin/uvicorn --app-dir examples/notes_api \
        --factory notes:app_from_env --port 9001

Its tests (tests/test_notes.py) need nothing but the `authserver` fixture of
`authserver.testing`.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, Field

from authserver.resource import (
    AccessClaims,
    TokenValidator,
    Validator,
    install_error_handler,
    require_token,
)


def validator_of(request: Request) -> Validator:
    validator: Validator = request.app.state.validator
    return validator


# Module-level aliases: FastAPI resolves annotations in the module's namespace.
Reader = Annotated[AccessClaims, Depends(require_token(validator_of, scopes=["read"]))]
Writer = Annotated[AccessClaims, Depends(require_token(validator_of, scopes=["write"]))]
router = APIRouter()


class NoteIn(BaseModel):
    text: str = Field(min_length=1, max_length=1000)


@router.get("/notes")
async def list_notes(request: Request, claims: Reader) -> dict[str, list[str]]:
    return {"notes": request.app.state.notes[claims.sub]}


@router.post("/notes", status_code=201)
async def add_note(request: Request, note: NoteIn, claims: Writer) -> dict[str, str]:
    request.app.state.notes[claims.sub].append(note.text)
    return {"text": note.text}


def create_app(issuer: str, audience: str = "authserver") -> FastAPI:
    """The API for tokens of `issuer` meant for `audience`; its keys come from the issuer."""
    validator = TokenValidator.from_issuer(issuer, audience=audience)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await validator.aclose()

    app = FastAPI(title="notes", lifespan=lifespan)
    app.state.validator = validator
    app.state.notes = defaultdict(list)
    install_error_handler(app)
    app.include_router(router)
    return app


def app_from_env() -> FastAPI:
    return create_app(
        os.environ.get("NOTES_ISSUER", "http://127.0.0.1:8000"),
        os.environ.get("NOTES_AUDIENCE", "authserver"),
    )
