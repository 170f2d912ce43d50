"""Factories for test data: real rows in a real store, no mocks."""

from __future__ import annotations

import time

import bcrypt

from authserver.store.protocol import Store, User

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
