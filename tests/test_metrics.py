"""Prometheus metrics (issue 15) on a real `serve --workers 2 --metrics-port` process.

One server for the module: its counts are read as differences (before, after), so
the tests do not depend on each other's order. That the two workers' counts are
summed is seen from the workers' own files: each one served some of the requests,
and /metrics shows their total.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from authserver.config import Settings
from authserver.metrics import FLUSH_INTERVAL, WorkersCollector
from authserver.store.migrate import upgrade_async
from authserver.store.sql import SqlStore
from tests.helpers.factories import DEFAULT_PASSWORD, make_client, make_user
from tests.helpers.metrics import Samples, scrape, scrape_until, value
from tests.helpers.procs import (
    ServerPool,
    ServerProcess,
    base_env,
    free_port,
    run_cli,
    server_errors,
)

pytestmark = pytest.mark.slow

ALICE = {"username": "alice", "password": DEFAULT_PASSWORD}
TOKENS = "authserver_tokens_issued_total"
HTTP_COUNT = "authserver_http_request_duration_seconds_count"


@dataclass
class Metered:
    server: ServerProcess
    metrics_url: str
    client_secret: str

    def samples(self) -> Samples:
        return scrape(self.metrics_url)

    def samples_until(self, condition: Callable[[Samples], bool], within: float = 15.0) -> Samples:
        return scrape_until(self.metrics_url, condition, within)


async def _seed(database_url: str) -> str:
    store = SqlStore.from_settings(Settings(database_url=database_url))
    try:
        await upgrade_async(store.engine)
        await make_user(store, "alice")
        _, secret = await make_client(store, "svc", grants=("client_credentials",))
    finally:
        await store.close()
    assert secret is not None
    return secret


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory, rsa_key_pem: bytes) -> Iterator[Metered]:
    workdir = tmp_path_factory.mktemp("metrics")
    keys = workdir / "keys"
    keys.mkdir(mode=0o700)
    (keys / "20200101T000000000000Z-rs256.pem").write_bytes(rsa_key_pem)
    (keys / "20200101T000000000000Z-rs256.pem").chmod(0o600)
    database_url = f"sqlite:///{workdir / 'authserver.db'}"
    secret = asyncio.run(_seed(database_url))
    env = base_env(
        AUTHSERVER_DATABASE_URL=database_url,
        AUTHSERVER_KEYS_DIR=str(keys),
        AUTHSERVER_LOGIN_MAX_FAILURES="2",
    )
    metrics_port = free_port()
    with ServerPool(workdir) as pool:
        server = pool.start(env, workers=2, args=["--metrics-port", str(metrics_port)])
        yield Metered(server, f"http://127.0.0.1:{metrics_port}/metrics", secret)
        assert not server_errors(server.log())


def _multiproc_dir(server: ServerProcess) -> Path:
    """The multiprocess directory, read from the environment of the server's workers."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
            if int(fields[1]) != server.proc.pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                return Path(entry.split(b"=", 1)[1].decode())
    raise AssertionError("no worker has PROMETHEUS_MULTIPROC_DIR")


def _per_worker_logins(directory: Path, tmp: Path) -> list[float]:
    """Each worker's own count of successful logins, read from its own file alone."""
    counts = []
    for path in sorted(directory.glob("counter_*.db")):
        alone = tmp / path.stem
        alone.mkdir(parents=True)
        (alone / path.name).write_bytes(path.read_bytes())
        total = 0.0
        for family in WorkersCollector(alone).collect():
            for s in family.samples:
                if s.name == "authserver_logins_total" and s.labels == {"outcome": "ok"}:
                    total += s.value
        counts.append(total)
    return counts


async def test_counts_are_summed_over_both_workers(metered: Metered, tmp_path: Path) -> None:
    before = metered.samples()
    sent = 0
    directory = _multiproc_dir(metered.server)

    def ok_logins(samples: Samples) -> float:
        return value(samples, "authserver_logins_total", outcome="ok") - value(
            before, "authserver_logins_total", outcome="ok"
        )

    def all_logins(samples: Samples, sent: int) -> bool:
        return ok_logins(samples) == sent

    # New connections, many at once: the kernel hands them to both workers.
    for _ in range(20):
        async with httpx.AsyncClient(
            base_url=metered.server.url,
            timeout=30,
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as client:
            answers = await asyncio.gather(*(client.post("/login", json=ALICE) for _ in range(12)))
        assert all(a.status_code == 200 for a in answers)
        sent += len(answers)
        # Each worker writes its files once it flushes: wait for every login to be there.
        metered.samples_until(functools.partial(all_logins, sent=sent))
        if sum(1 for c in _per_worker_logins(directory, tmp_path / str(sent)) if c > 0) >= 2:
            break
    issued = {"grant": "password", "client_id": "authserver"}
    http = {"route": "/login", "status": "200"}

    def all_counted(samples: Samples) -> bool:
        return (
            ok_logins(samples) == sent
            and value(samples, TOKENS, **issued) - value(before, TOKENS, **issued) == sent
            and value(samples, HTTP_COUNT, **http) - value(before, HTTP_COUNT, **http) == sent
        )

    after = metered.samples_until(all_counted)
    per_worker = _per_worker_logins(directory, tmp_path / "final")
    assert len([c for c in per_worker if c > 0]) == 2, per_worker
    ok = value(after, "authserver_logins_total", outcome="ok")
    assert ok == sum(per_worker)
    assert ok - value(before, "authserver_logins_total", outcome="ok") == sent
    assert value(after, TOKENS, **issued) - value(before, TOKENS, **issued) == sent
    assert value(after, HTTP_COUNT, **http) - value(before, HTTP_COUNT, **http) == sent
    assert value(after, "authserver_password_hash_seconds_count") >= sent
    assert value(after, "authserver_signing_keys_loaded") == 1

    # Each security event, counted once whichever worker saw it.
    before = after
    async with httpx.AsyncClient(base_url=metered.server.url, timeout=30) as client:
        refresh = (await client.post("/login", json=ALICE)).json()["refresh_token"]
        assert (await client.post("/refresh", json={"refresh_token": refresh})).status_code == 200
        assert (await client.post("/refresh", json={"refresh_token": refresh})).status_code == 401
        stranger = {"username": f"nobody-{secrets.token_hex(4)}", "password": "wrong"}
        statuses = [(await client.post("/login", json=stranger)).status_code for _ in range(3)]
        assert statuses == [401, 401, 429]
        service = await client.post(
            "/token", data={"grant_type": "client_credentials"}, auth=("svc", metered.client_secret)
        )
        assert service.status_code == 200
    expected = {
        ("authserver_logins_total", (("outcome", "ok"),)): 1,
        ("authserver_refresh_rotations_total", ()): 1,
        ("authserver_refresh_reuse_detections_total", ()): 1,
        ("authserver_logins_total", (("outcome", "bad_credentials"),)): 2,
        ("authserver_logins_total", (("outcome", "throttled"),)): 1,
        (TOKENS, (("grant", "refresh_token"), ("client_id", "authserver"))): 1,
        (TOKENS, (("grant", "client_credentials"), ("client_id", "svc"))): 1,
        (HTTP_COUNT, (("route", "/login"), ("status", "429"))): 1,
    }

    def deltas(samples: Samples) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (name, labels): value(samples, name, **dict(labels))
            - value(before, name, **dict(labels))
            for (name, labels) in expected
        }

    after = metered.samples_until(lambda s: deltas(s) == expected)
    assert deltas(after) == expected


async def test_a_count_is_exported_within_the_flush_interval(metered: Metered) -> None:
    """The supervisor serves /metrics from the workers' files, which they write every
    FLUSH_INTERVAL: a request shows there soon after, with no other request to push it."""
    live = {"route": "/health/live", "status": "200"}
    before = value(metered.samples(), HTTP_COUNT, **live)
    assert httpx.get(f"{metered.server.url}/health/live", timeout=10).status_code == 200
    # Polled from now, not after a sleep of one interval: it shows as soon as it is written.
    # Generous beyond the interval: a busy test machine may run the worker's timer late.
    after = metered.samples_until(
        lambda s: value(s, HTTP_COUNT, **live) == before + 1, within=10 * FLUSH_INTERVAL
    )
    assert value(after, HTTP_COUNT, **live) == before + 1


async def test_own_listener_and_bounded_labels(metered: Metered) -> None:
    public = httpx.get(f"{metered.server.url}/metrics", timeout=10)
    assert public.status_code == 404
    assert "authserver_" not in public.text
    marker = secrets.token_hex(8)
    async with httpx.AsyncClient(base_url=metered.server.url, timeout=30) as client:
        unknown = await client.post(
            "/token", data={"grant_type": "client_credentials", "client_id": f"c-{marker}"}
        )
        assert unknown.status_code == 401
        for i in range(5):
            assert (await client.get(f"/{marker}/{i}")).status_code == 404
        assert (await client.get(f"/protected/{marker}")).status_code == 404

    def routes_of(samples: Samples) -> set[str | None]:
        return {dict(labels).get("route") for (_, labels) in samples} - {None}

    # Once the 404s are written (their flush): then the marker would show, were it a label.
    samples = metered.samples_until(lambda s: "unmatched" in routes_of(s))
    text = httpx.get(metered.metrics_url, timeout=10).text
    assert marker not in text
    routes = routes_of(samples)
    assert routes <= {"unmatched", "/login", "/refresh", "/token", "/health", "/health/live"}
    assert "unmatched" in routes
    clients = {dict(labels).get("client_id") for (_, labels) in samples} - {None}
    assert clients <= {"authserver", "svc"}
    names = {name for (name, _) in samples}
    assert names and all(n.startswith("authserver_") for n in names), names


def test_a_dead_workers_live_gauge_is_dropped(tmp_path: Path) -> None:
    """A worker that exits (killed or replaced) no longer holds the fewest-keys gauge down."""
    script = "from authserver import metrics; metrics.SIGNING_KEYS.set(0)"
    env = base_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    assert list(tmp_path.glob("gauge_livemin_*.db"))
    names = [s.name for f in WorkersCollector(tmp_path).collect() for s in f.samples]
    assert "authserver_signing_keys_loaded" not in names
    assert not list(tmp_path.glob("gauge_livemin_*.db"))


def test_a_taken_metrics_port_is_one_line_and_exit_1(tmp_path: Path, keys_dir: Path) -> None:
    env = base_env(
        AUTHSERVER_DATABASE_URL=f"sqlite:///{tmp_path / 'authserver.db'}",
        AUTHSERVER_KEYS_DIR=str(keys_dir),
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "--port", str(free_port()), "--metrics-port", str(port)]
        done = run_cli(args, env, cwd=tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"authserver: error: cannot serve metrics on 127.0.0.1:{port}: ")
    assert "Traceback" not in done.stderr
