"""Schemathesis against the app's own OpenAPI document, in-process over ASGI.

Every operation gets a bounded number of generated requests, valid and
invalid; each response must not be a 5xx and must match what the document
says (status code, content type, headers, body schema). When this fails,
fix the code or the document (`api/schemas.py`, the routes' `responses=`),
never this test.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from authserver.app import create_app
from authserver.config import Settings
from authserver.keys import generate_key
from authserver.store.migrate import upgrade_async
from authserver.store.sql import SqlStore
from tests.helpers.factories import DEFAULT_PASSWORD, make_user

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


# Created by the fixture, so that merely collecting this module leaves nothing behind.
_ROOT = Path(tempfile.gettempdir()) / f"authserver-fuzz-{uuid.uuid4().hex}"
_SETTINGS = Settings(
    database_url=f"sqlite:///{_ROOT / 'fuzz.db'}",
    keys_dir=_ROOT / "keys",
    bcrypt_rounds=4,
    issuer="http://testserver",
    log_format="text",
    # The fuzzer fails logins by the hundred; keep exercising the grants, not the 429.
    login_max_failures=1_000_000,
)
# No lifespan is needed to render the document; schemathesis starts it per test.
APP = create_app(_SETTINGS)
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP
schema.location = "/openapi.json"


async def _seed() -> str:
    _ROOT.mkdir()
    generate_key(_SETTINGS.keys_dir)
    store = SqlStore.from_settings(_SETTINGS)
    try:
        await upgrade_async(store.engine)
        await make_user(store, "alice")
    finally:
        await store.close()
    async with LifespanManager(APP) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post(
                "/login", json={"username": "alice", "password": DEFAULT_PASSWORD}
            )
            assert r.status_code == 200, r.text
            token: str = r.json()["access_token"]
            return token


@pytest.fixture(scope="module")
def access_token() -> Iterator[str]:
    """A real token, so generated requests to /protected also reach the 200 path."""
    yield asyncio.run(_seed())
    shutil.rmtree(_ROOT, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_every_operation_conforms(case: Any, access_token: str) -> None:
    headers = None
    if case.path == "/protected" and not (case.headers or {}).get("Authorization"):
        headers = {"Authorization": f"Bearer {access_token}"}
    case.call_and_validate(headers=headers, checks=CHECKS)


def test_schema_lists_every_route() -> None:
    results = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), results
    paths = {result.ok().path for result in results if isinstance(result, Ok)}
    assert {
        "/login",
        "/refresh",
        "/token",
        "/revoke",
        "/logout",
        "/protected",
        "/health",
        "/.well-known/jwks.json",
        "/.well-known/oauth-authorization-server",
    } <= paths
