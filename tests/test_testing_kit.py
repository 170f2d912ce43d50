"""authserver.testing, the pytest plugin: the example suite that uses it alone, what loading
it costs a suite that does not, and its tokens as a resource server sees them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from authserver.errors import InvalidTokenError
from authserver.testing import AuthServerKit

# Plugins of this environment that the example does not use and that take seconds to
# import; the kit's own plugin is loaded as a user's suite loads it, by its entry point.
UNUSED_PLUGINS = ("hypothesispytest", "schemathesis", "xdist", "xdist.looponfail")


def test_the_example_suite_passes_with_the_kit_alone(repo_root: Path) -> None:
    disabled = [arg for name in UNUSED_PLUGINS for arg in ("-p", f"no:{name}")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSERVER_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *disabled, "-q"],
        cwd=repo_root / "examples" / "notes_api",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9 passed" in result.stdout, result.stdout


def test_loading_the_plugin_imports_no_server_code(repo_root: Path) -> None:
    # pytest loads it in every run of an environment that has authserver, this suite's too.
    probe = (
        "import sys, authserver.testing; "
        "print(__import__('json').dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    loaded = set(json.loads(out))
    assert "pytest" in loaded
    assert not loaded & {"fastapi", "starlette", "uvicorn", "sqlalchemy", "jose", "httpx"}


async def test_its_tokens_as_a_resource_server_sees_them(authserver: AuthServerKit) -> None:
    validator = authserver.validator()
    try:
        user = await authserver.create_user()
        claims = await validator.validate(await authserver.token(user))
        assert claims.sub == user.username
        assert isinstance(claims.raw["sid"], str)  # a real login's token, with its session

        minted = await validator.validate(
            authserver.mint_token("robot", scope="read", lifetime=60, client_id="svc")
        )
        assert (minted.sub, minted.scope, minted.client_id) == ("robot", ("read",), "svc")
        assert minted.exp - minted.iat == 60
        other = authserver.validator(audience="billing")
        assert (await other.validate(authserver.mint_token(audience="billing"))).aud == "billing"
        await other.aclose()

        refusals = {
            "expired": "expired",
            "not_yet_valid": "issued in the future",
            "foreign_key": "signature is invalid",
        }
        for flag, reason in refusals.items():
            with pytest.raises(InvalidTokenError, match=reason):
                await validator.validate(authserver.mint_token(**{flag: True}))  # type: ignore[arg-type]
    finally:
        await validator.aclose()


async def test_its_clients_are_registered(authserver: AuthServerKit) -> None:
    client = await authserver.create_client(scopes=("read",))
    assert client.secret is not None
    async with httpx.AsyncClient(base_url=authserver.issuer) as http:
        r = await http.post(
            "/token",
            data={"grant_type": "client_credentials"},
            auth=(client.client_id, client.secret),
        )
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == "read"
    public = await authserver.create_client("spa", public=True)
    assert (public.client_id, public.secret) == ("spa", None)
    user = await authserver.create_user()
    tokens = await authserver.login(user, client_id="spa")
    validator = authserver.validator()
    try:
        assert (await validator.validate(tokens["access_token"])).client_id == "spa"
    finally:
        await validator.aclose()
