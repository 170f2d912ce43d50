"""Refresh families for the runs, started by real logins.

A seeding server is a second `authserver serve` on the run's database, for a
user whose password is hashed at bcrypt's lowest cost: hundreds of families
then cost milliseconds each rather than a cost-12 hash each, and every family
is exactly what a login produces. It is a separate process from the server
being measured, so its work is never counted in that server's CPU time or
memory.
"""

from __future__ import annotations

import asyncio

import httpx

from authserver.client import DPoPKey
from bench.data import BENCH_PASSWORD, BENCH_USER

SEED_BCRYPT_ROUNDS = 4  # the lowest authserver accepts
_CONCURRENCY = 8


async def _login(
    client: httpx.AsyncClient, username: str, password: str, dpop: DPoPKey | None
) -> str:
    # With `dpop`, a DPoP login: the family is bound to that key (RFC 9449 §5).
    headers = {"DPoP": dpop.proof("POST", client.base_url.join("/login"))} if dpop else {}
    response = await client.post(
        "/login", json={"username": username, "password": password}, headers=headers
    )
    if response.status_code != 200:
        raise RuntimeError(f"seeding login: {response.status_code} {response.text[:300]}")
    token: str = response.json()["refresh_token"]
    return token


async def _logins(
    base_url: str, count: int, username: str, password: str, dpop: DPoPKey | None
) -> list[str]:
    gate = asyncio.Semaphore(_CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:

        async def one() -> str:
            async with gate:
                return await _login(client, username, password, dpop)

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def _access_token(base_url: str, username: str, password: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        response = await client.post("/login", json={"username": username, "password": password})
    if response.status_code != 200:
        raise RuntimeError(f"seeding login: {response.status_code} {response.text[:300]}")
    token: str = response.json()["access_token"]
    return token


def login_access_token(
    base_url: str, username: str = BENCH_USER, password: str = BENCH_PASSWORD
) -> str:
    """The access token of one login at `base_url`: a user's token with a live session."""
    return asyncio.run(_access_token(base_url, username, password))


def login_families(
    base_url: str,
    count: int,
    username: str = BENCH_USER,
    password: str = BENCH_PASSWORD,
    *,
    dpop_key_pem: bytes | None = None,
) -> list[str]:
    """Log `username` in `count` times at `base_url`; the refresh token of each new family
    (bound to the DPoP key `dpop_key_pem`, if given)."""
    dpop = DPoPKey(dpop_key_pem) if dpop_key_pem else None
    return asyncio.run(_logins(base_url, count, username, password, dpop))
