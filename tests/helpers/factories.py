"""Factories for test data: real rows in a real store, no mocks."""

from __future__ import annotations

import time

import bcrypt

from authserver.config import Settings
from authserver.store.migrate import upgrade_async
from authserver.store.protocol import Store, User
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
