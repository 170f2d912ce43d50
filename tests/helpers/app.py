"""The real app, started in-process with its lifespan, and the requests tests make of it."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import sqlalchemy as sa
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from authserver.app import create_app
from authserver.config import Settings
from authserver.refresh import digest
from authserver.store.protocol import Store
from authserver.store.schema import refresh_families, refresh_tokens
from authserver.store.sql import SqlStore
from tests.helpers.factories import DEFAULT_PASSWORD


@dataclass
class Running:
    """An app started with its lifespan, and an HTTP client that talks to it in-process."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def store(self) -> Store:
        store: Store = self.app.state.services.store
        return store

    async def login(
        self, username: str = "alice", password: str = DEFAULT_PASSWORD, **extra: Any
    ) -> dict[str, Any]:
        response = await self.client.post(
            "/login", json={"username": username, "password": password, **extra}
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Running]:
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Running(app=app, client=client, settings=settings)


# What the `start_app` fixture hands a test: start the app with settings overrides.
StartApp = Callable[..., Awaitable[Running]]


class Clock:
    """The service's clock, set by the test: real `AuthService`, chosen time."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def set_clock(running: Running, start: float | None = None) -> Clock:
    clock = Clock(time.time() if start is None else start)
    running.app.state.services.auth.clock = clock
    return clock


async def refresh(running: Running, token: str, **extra: Any) -> httpx.Response:
    return await running.client.post("/refresh", json={"refresh_token": token, **extra})


async def rotate(running: Running, token: str) -> str:
    r = await refresh(running, token)
    assert r.status_code == 200, r.text
    new: str = r.json()["refresh_token"]
    return new


async def family_of(running: Running, token: str) -> dict[str, Any]:
    """The stored state of a token's family: its revocation and each token's status."""
    store = running.store
    assert isinstance(store, SqlStore)
    async with store.engine.connect() as conn:
        family_id = (
            await conn.execute(
                sa.select(refresh_tokens.c.family_id).where(
                    refresh_tokens.c.token_hash == digest(token)
                )
            )
        ).scalar_one()
        family = (
            await conn.execute(
                sa.select(refresh_families).where(refresh_families.c.id == family_id)
            )
        ).one()
        statuses = (
            await conn.execute(
                sa.select(refresh_tokens.c.status).where(refresh_tokens.c.family_id == family_id)
            )
        ).scalars()
        return {
            "id": family_id,
            "revoked_reason": family.revoked_reason,
            "dpop_jkt": family.dpop_jkt,
            "statuses": Counter(statuses),
        }
