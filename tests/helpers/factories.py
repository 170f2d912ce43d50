"""Factories for test data: real rows in a real store, no mocks."""

from __future__ import annotations

import time

import bcrypt

from authserver.clients import new_secret
from authserver.config import Settings
from authserver.store.migrate import upgrade_async
from authserver.store.protocol import Client, Store, User
from authserver.store.sql import SqlStore

DEFAULT_PASSWORD = "correct horse battery"


def hash_password(password: str = DEFAULT_PASSWORD, rounds: int = 4) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


async def make_user(
    store: Store,
    username: str = "alice",
    *,
    password: str = DEFAULT_PASSWORD,
    rounds: int = 4,
    disabled: bool = False,
) -> User:
    user = await store.add_user(username, hash_password(password, rounds), at=time.time())
    if disabled:
        user = await store.set_disabled(username, True, at=time.time())
    return user


async def make_client(
    store: Store,
    client_id: str,
    *,
    public: bool = False,
    grants: tuple[str, ...] | None = None,
    scopes: tuple[str, ...] | None = None,
    audience: str | None = None,
    redirect_uris: tuple[str, ...] = (),
    post_logout_redirect_uris: tuple[str, ...] = (),
    jwks: str | None = None,
    disabled: bool = False,
    third_party: bool = False,
    name: str | None = None,
    require_dpop: bool = False,
) -> tuple[Client, str | None]:
    """A registered client, and its secret if it has one (confidential without keys)."""
    secret, digest = (None, None) if public or jwks is not None else new_secret()
    now = time.time()
    client = Client(
        client_id=client_id,
        name=name or client_id,
        public=public,
        secret_digest=digest,
        previous_secret_digest=None,
        previous_secret_expires_at=None,
        jwks=jwks,
        grants=grants or (("password", "refresh_token") if public else ("client_credentials",)),
        scopes=scopes,
        redirect_uris=redirect_uris,
        post_logout_redirect_uris=post_logout_redirect_uris,
        audience=audience,
        third_party=third_party,
        require_dpop=require_dpop,
        disabled=disabled,
        created_at=now,
        updated_at=now,
    )
    await store.atomic(lambda tx: tx.add_client(client))
    return client, secret


async def seed_user(database_url: str, username: str = "alice") -> None:
    """Create the schema (if no server did yet) and a user, straight through the store.

    For tests whose servers run in processes of their own, with no store in this one.
    """
    store = SqlStore.from_settings(Settings(database_url=database_url))
    try:
        await upgrade_async(store.engine)
        await make_user(store, username)
    finally:
        await store.close()
