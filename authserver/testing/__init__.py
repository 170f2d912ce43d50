"""authserver.testing: a real authserver for your own pytest suite.

Installed with authserver, this module is a pytest plugin (entry point
`pytest11`), so its fixtures are there in any suite of an environment that has
authserver, and cost nothing until a test asks for one by name:

- `authserver`: an `AuthServerKit` (session scope): a running authserver on a
  free loopback port, over a temporary SQLite database and keys of its own, with
  bcrypt at its cheapest cost. Its `issuer` URL is all `authserver.resource`
  needs (`kit.validator()`, or `TokenValidator.from_issuer(kit.issuer, ...)`).
  It has `await create_user()`, `await create_client()`, `await login(user)`,
  `await token(user)` and `mint_token(subject, scope=..., audience=...,
  lifetime=..., expired=..., not_yet_valid=..., foreign_key=...)`.
- `authserver_settings`: a dict of `Settings` overrides for that server
  (`scopes`, `audience`, `access_token_ttl`, ...); override this fixture in your
  conftest.py to change them.

The fixtures are synchronous, so they work with pytest-asyncio in any mode and
with any event-loop scope; the server runs on an event loop of its own.

Importing this module imports pytest and nothing of authserver's server; the
server's code is imported when the `authserver` fixture is first used.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from authserver.testing.kit import AuthServerKit, KitClient, KitUser

__all__ = ["AuthServerKit", "KitClient", "KitUser", "authserver", "authserver_settings"]


@pytest.fixture(scope="session")
def authserver_settings() -> dict[str, Any]:
    """`Settings` overrides for the `authserver` fixture's server; override in a conftest."""
    return {}


@pytest.fixture(scope="session")
def authserver(
    authserver_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthServerKit]:
    """A running authserver for the whole session (see `AuthServerKit`)."""
    from authserver.testing.kit import AuthServerKit

    with AuthServerKit.start(tmp_path_factory.mktemp("authserver"), **authserver_settings) as kit:
        yield kit


def __getattr__(name: str) -> Any:
    # The kit's classes on first use: `from authserver.testing import AuthServerKit`
    # works, while loading the plugin imports no server code.
    if name in ("AuthServerKit", "KitClient", "KitUser"):
        from authserver.testing import kit

        return getattr(kit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
