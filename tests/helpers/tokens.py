"""Tokens as a client sees them: JWT segments decoded by hand, the JWKS, and the checks
every token response and every refused refresh must pass."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

import httpx

TOKEN_FIELDS = {"access_token", "refresh_token", "token_type", "expires_in", "scope"}


def decode_segment(segment: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    )
    return value


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _signature = token.split(".")
    return decode_segment(header), decode_segment(payload)


def jwt_header(token: str) -> dict[str, Any]:
    """The JOSE header alone, whatever follows it."""
    return decode_segment(token.split(".", 1)[0])


def assert_no_store(response: Any) -> None:
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"


def assert_invalid_grant(r: httpx.Response, token: str) -> None:
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "invalid_grant"
    assert set(r.json()) == {"error", "error_description"}
    assert r.headers["WWW-Authenticate"].startswith("Bearer ")
    assert token not in r.text


async def jwks(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = (await client.get("/.well-known/jwks.json")).json()["keys"]
    return keys


async def wait_for_kids(
    client: httpx.AsyncClient, predicate: Callable[[set[str]], bool], timeout: float = 15.0
) -> set[str]:
    """Poll the JWKS until its set of kids satisfies `predicate`; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        kids = {k["kid"] for k in await jwks(client)}
        if predicate(kids):
            return kids
        assert time.monotonic() < deadline, f"JWKS never changed as expected: {kids}"
        await asyncio.sleep(0.05)
