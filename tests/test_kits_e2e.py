"""Both kits end to end, with real processes.

`authserver serve` (access tokens live 2 s) and `examples/resource_server.py`
run as separate uvicorn processes on free ports, with SQLite; a `TokenAuth`
client sends bursts of concurrent requests over several token lifetimes. The
audit trail, read with `python -m authserver audit`, says what the server saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from authserver.client import TokenAuth, TokenPair
from tests.helpers import procs
from tests.helpers.procs import free_port
from tests.helpers.tokens import jwt_header

pytestmark = pytest.mark.slow

TTL = 2
PASSWORD = "correct horse battery"
WAVES, PER_WAVE, WAVE_GAP = 20, 10, 0.35  # 200 requests over ~7 s: three and a half lifetimes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def spawned(name: str, args: list[str], env: Mapping[str, str], cwd: Path) -> Iterator[Proc]:
    """Start a process (output to NAME.log); SIGTERM it at the end."""
    log_path = cwd / f"{name}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(args, env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield Proc(name, popen, log_path)
        finally:
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
                try:
                    popen.wait(15)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait(15)


def wait_answering(proc: Proc, url: str) -> None:
    """Until `url` answers at all (any status)."""
    deadline = time.monotonic() + 60
    while True:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.log()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            httpx.get(url, timeout=2)
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not start:\n{proc.log()[-3000:]}")
        time.sleep(0.1)


def run_cli(env: Mapping[str, str], cwd: Path, *args: str, stdin: str | None = None) -> str:
    done = procs.run_cli(args, env, cwd=cwd, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass
class Deployment:
    auth_url: str
    resource_url: str
    env: dict[str, str]
    workdir: Path
    auth: Proc
    resource: Proc

    def cli(self, *args: str) -> str:
        return run_cli(self.env, self.workdir, *args)

    def audit(self, event: str) -> list[dict[str, object]]:
        out = self.cli("audit", "--event", event, "--json")
        return [json.loads(line) for line in out.splitlines() if line.strip()]


@contextlib.contextmanager
def deployment(
    tmp_path: Path, repo_root: Path, jwks_refetch_interval: float
) -> Iterator[Deployment]:
    auth_port, resource_port = free_port(), free_port()
    auth_url = f"http://127.0.0.1:{auth_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHSERVER_", "RESOURCE_"))}
    env.update(
        PYTHONUNBUFFERED="1",
        AUTHSERVER_DATABASE_URL=f"sqlite:///{tmp_path / 'auth.db'}",
        AUTHSERVER_KEYS_DIR=str(tmp_path / "keys"),
        AUTHSERVER_ISSUER=auth_url,
        AUTHSERVER_ACCESS_TOKEN_TTL=str(TTL),
        AUTHSERVER_BCRYPT_ROUNDS="4",
        AUTHSERVER_KEYS_RELOAD_INTERVAL="1",
        AUTHSERVER_LOG_FORMAT="text",
    )
    resource_env = {
        **env,
        "RESOURCE_ISSUER": auth_url,
        "RESOURCE_AUDIENCE": "authserver",
        "RESOURCE_JWKS_REFETCH_INTERVAL": str(jwks_refetch_interval),
    }
    server_args = ["serve", "--host", "127.0.0.1", "--port", str(auth_port)]
    resource_args = [
        *("-m", "uvicorn", "--app-dir", str(repo_root / "examples"), "resource_server:app"),
        *("--host", "127.0.0.1", "--port", str(resource_port)),
    ]
    resource_url = f"http://127.0.0.1:{resource_port}"
    # Before the server starts: two processes migrating one new SQLite file could race.
    run_cli(env, tmp_path, "users", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    with (
        spawned(
            "authserver", [sys.executable, "-m", "authserver", *server_args], env, tmp_path
        ) as auth,
        spawned("resource", [sys.executable, *resource_args], resource_env, tmp_path) as resource,
    ):
        wait_answering(auth, f"{auth_url}/health")
        wait_answering(resource, f"{resource_url}/hello")
        yield Deployment(auth_url, resource_url, env, tmp_path, auth, resource)


def kid_of(token: str) -> str:
    kid: str = jwt_header(token)["kid"]
    return kid


async def burst_over_lifetimes(
    dep: Deployment, auth: TokenAuth, *, waves: int = WAVES, during: asyncio.Task[str] | None = None
) -> tuple[list[httpx.Response | BaseException], float]:
    """`waves` bursts of concurrent requests, WAVE_GAP apart; returns them and the time taken."""
    async with httpx.AsyncClient(auth=auth, timeout=30) as client:

        async def one(wave: int) -> httpx.Response:
            await asyncio.sleep(wave * WAVE_GAP)
            return await client.get(f"{dep.resource_url}/hello")

        start = time.monotonic()
        results = await asyncio.gather(
            *(one(w) for w in range(waves) for _ in range(PER_WAVE)), return_exceptions=True
        )
        elapsed = time.monotonic() - start
    if during is not None:
        await during
    return results, elapsed


def assert_all_succeeded(results: list[httpx.Response | BaseException], dep: Deployment) -> None:
    failures = [
        r if isinstance(r, BaseException) else f"{r.status_code} {r.text}"
        for r in results
        if isinstance(r, BaseException) or r.status_code != 200
    ]
    assert not failures, (failures[:5], dep.resource.log()[-3000:])
    assert {r.json()["message"] for r in results if isinstance(r, httpx.Response)} == {
        "Hello, alice."
    }


async def test_many_concurrent_requests_over_several_lifetimes(
    tmp_path: Path, repo_root: Path
) -> None:
    with deployment(tmp_path, repo_root, jwks_refetch_interval=5) as dep:
        saved: list[TokenPair] = []
        auth = TokenAuth(
            f"{dep.auth_url}/token", username="alice", password=PASSWORD, on_tokens=saved.append
        )
        results, elapsed = await burst_over_lifetimes(dep, auth)

        assert len(results) == WAVES * PER_WAVE == 200
        assert_all_succeeded(results, dep)
        assert dep.audit("refresh_reuse_detected") == []
        assert len(dep.audit("login_succeeded")) == 1
        refreshes = len(dep.audit("refreshed"))
        lifetimes = math.ceil(elapsed / TTL)
        # About one refresh per lifetime, not one per request.
        assert lifetimes - 2 <= refreshes <= lifetimes + 3, (refreshes, elapsed)
        assert len(saved) == refreshes + 1  # the client kept every rotated pair
        assert len({p.refresh_token for p in saved}) == len(saved)


async def test_key_rotation_is_picked_up_without_a_failed_request(
    tmp_path: Path, repo_root: Path
) -> None:
    # The resource server may refetch the JWKS once a second; its first fetch
    # happens at the first request, and the new key is minted seconds later.
    with deployment(tmp_path, repo_root, jwks_refetch_interval=1) as dep:
        saved: list[TokenPair] = []
        auth = TokenAuth(
            f"{dep.auth_url}/token", username="alice", password=PASSWORD, on_tokens=saved.append
        )

        async def rotate() -> str:
            await asyncio.sleep(6 * WAVE_GAP)
            out = await asyncio.to_thread(dep.cli, "keys", "generate")
            match = re.search(r"key (\S+) in", out)
            assert match, out
            return match.group(1)

        rotation = asyncio.create_task(rotate())
        results, _ = await burst_over_lifetimes(dep, auth, waves=24, during=rotation)
        new_kid = rotation.result()

        assert_all_succeeded(results, dep)
        kids = [kid_of(p.access_token) for p in saved]
        assert kids[0] != new_kid
        assert kids[-1] == new_kid, "the client never got a token signed by the new key"
        log = dep.resource.log()
        assert re.search(rf"JWKS fetched .*\(unknown kid\): kids .*{re.escape(new_kid)}", log), log
        assert dep.audit("refresh_reuse_detected") == []
