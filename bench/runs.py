"""The measurements, one method per target of issue 5.

authserver runs as `authserver serve` runs it. Each figure compares it with a
baseline measured in the same run: a peer in its own process (bench/peers: a
bare FastAPI app, a sign-only app), or bcrypt's own speed. Rounds alternate
(A B A B ...), and the figure is the median of the per-round ratios; each run
also records the CPU time per request of the process serving it (utime + stime
from /proc), which other load on the machine disturbs far less than throughput.
"""

from __future__ import annotations

import base64
import compileall
import json
import math
import os
import secrets
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import bcrypt

import authserver
from authserver.client import DPoPKey
from bench import data
from bench.load import Load, LoadResult, run_load
from bench.peers.settings import peer_env
from bench.seeding import SEED_BCRYPT_ROUNDS, login_access_token, login_families
from bench.server import (
    ACCESS_TOKEN_TTL,
    AUDIENCE,
    SCOPE,
    Server,
    authserver_command,
    authserver_serve_command,
    base_env,
    free_port,
    peer_command,
    server_env,
)

REFRESH_CLIENTS = 32
DPOP_USER = "dpopuser"
GET_CONNECTIONS = 32
LOGIN_CLIENTS = 8
MB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    name: str
    rounds: int
    duration: int  # seconds of each measured run (wrk takes whole seconds)
    warmup: int
    login_duration: int
    probe_delay_ms: float
    memory_refreshes: int
    memory_chunk: int
    startup_runs: int
    scaling_rounds: int
    workers: tuple[int, ...] = (1, 2, 4)
    # DPoP /protected: its target's margin is small against this machine's drift, so its
    # median gets more rounds than the others'.
    dpop_rounds: int = 0  # 0: `rounds`
    fresh_tokens: int = 0  # 0: enough to defeat the server's verified-token cache


QUICK = Plan(
    name="quick",
    rounds=2,
    duration=2,
    warmup=1,
    login_duration=3,
    probe_delay_ms=10,
    memory_refreshes=3_000,
    memory_chunk=2,
    startup_runs=3,
    scaling_rounds=1,
)
FULL = Plan(
    name="full",
    rounds=7,
    duration=3,
    warmup=1,
    login_duration=8,
    probe_delay_ms=10,
    memory_refreshes=100_000,
    memory_chunk=10,
    startup_runs=5,
    scaling_rounds=3,
    dpop_rounds=11,
)


def peer_env_for(server: Server, keys_dir: Path) -> dict[str, str]:
    """A peer signs with `server`'s keys and claims, so its tokens are as long as the server's."""
    return peer_env(
        keys_dir=keys_dir,
        issuer=server.url,
        audience=AUDIENCE,
        scope=SCOPE,
        ttl=ACCESS_TOKEN_TTL,
        subject=data.BENCH_USER,
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


K = TypeVar("K")


class Rounds:
    """A section's per-round rows, and the figures that sum them up: medians over the
    rounds, their spread, error counts. A row maps each run's name to its
    `Measured.as_dict()`, beside the round's own figures (ratios); runs named by
    something else than a string (a worker count) are found under its `str`."""

    def __init__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.rows = rows

    def median(self, *path: str) -> float:
        """The median over the rounds of the value at `path`: ("ratio",), ("fresh", "rps")."""
        values = []
        for row in self.rows:
            value: Any = row
            for key in path:
                value = value[key]
            values.append(value)
        return median(values)

    def medians(self, names: Iterable[K], field: str) -> dict[K, float]:
        """`field` of each run named, its median over the rounds."""
        return {name: self.median(str(name), field) for name in names}

    def spread(self, *keys: str) -> dict[str, list[float]]:
        """The lowest and the highest over the rounds of each of the round figures `keys`."""
        return {
            key: [min(row[key] for row in self.rows), max(row[key] for row in self.rows)]
            for key in keys
        }

    def errors(self, *names: object) -> int:
        """The errors of the runs named, over every round."""
        return sum(row[str(name)]["errors"] for row in self.rows for name in names)


def in_turn(order: Sequence[K], index: int) -> Sequence[K]:
    """The runs of round `index`: in `order`, then backwards, and so on. Whatever favours
    a round's first (or last) run, a busy neighbour or a warm cache, favours each run
    of a comparison as often as the other."""
    return order if index % 2 == 0 else order[::-1]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Measured:
    """One load run against one server."""

    load: LoadResult
    cpu_seconds: float

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds / max(1, self.load.requests) * 1e6

    def as_dict(self) -> dict[str, float]:
        return {
            "rps": round(self.load.rps, 1),
            "requests": self.load.requests,
            "errors": self.load.errors,
            "p50_ms": round(self.load.p50_ms, 3),
            "p99_ms": round(self.load.p99_ms, 3),
            "cpu_us_per_request": round(self.cpu_us_per_request, 1),
        }


class Bench:
    """Runs the sections of the benchmark in one temporary directory."""

    def __init__(
        self,
        plan: Plan,
        *,
        client: str,
        root: Path,
        postgres_url: str | None,
        say: Callable[[str], None],
    ) -> None:
        self.plan = plan
        self.client = client
        self.root = root
        self.postgres_url = postgres_url
        self.say = say
        self.servers: list[Server] = []
        self.pg_databases: list[str] = []
        self._seeders: dict[tuple[str, int | None], Server] = {}
        self._seeded_databases: set[str] = set()

    # -- plumbing ------------------------------------------------------------------

    def workspace(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start_authserver(
        self, name: str, database_url: str, keys_dir: Path, *, workers: int = 1, **env: str
    ) -> Server:
        port = free_port()
        server = Server.start(
            name,
            authserver_serve_command(port, workers),
            server_env(database_url=database_url, keys_dir=keys_dir, port=port, **env),
            cwd=self.workspace(name),
            port=port,
        )
        return self._started(server)

    def start_peer(self, module: str, name: str, env: dict[str, str]) -> Server:
        """A baseline of bench/peers in its own process."""
        port = free_port()
        server = Server.start(
            name, peer_command(module, port), base_env(**env), cwd=self.workspace(name), port=port
        )
        return self._started(server)

    def _started(self, server: Server) -> Server:
        self.servers.append(server)
        server.wait_healthy()
        return server

    def stop(self, server: Server) -> None:
        server.stop()
        if server in self.servers:
            self.servers.remove(server)

    def seed_families(
        self,
        database_url: str,
        keys_dir: Path,
        count: int,
        *,
        refresh_ttl: int | None = None,
        dpop_key_pem: bytes | None = None,
    ) -> list[str]:
        """`count` new refresh families of the bench user, by logins to a seeding server
        (DPoP logins, the families bound to that key, with `dpop_key_pem`)."""
        seeder = self._seeders.get((database_url, refresh_ttl))
        if seeder is None:
            if database_url not in self._seeded_databases:
                # Hashed at the seeding cost, so no login rehashes it.
                data.add_user(database_url, keys_dir, data.BENCH_USER, rounds=SEED_BCRYPT_ROUNDS)
                self._seeded_databases.add(database_url)
            env = {"AUTHSERVER_BCRYPT_ROUNDS": str(SEED_BCRYPT_ROUNDS)}
            if refresh_ttl is not None:
                env["AUTHSERVER_REFRESH_TOKEN_TTL"] = str(refresh_ttl)
            name = f"seed-{len(self._seeders) + 1}"
            seeder = self.start_authserver(name, database_url, keys_dir, **env)
            self._seeders[database_url, refresh_ttl] = seeder
        return login_families(seeder.url, count, dpop_key_pem=dpop_key_pem)

    def stop_seeders(self) -> None:
        """Seeding servers stop with their section: idle, they still hold memory and connections."""
        for seeder in self._seeders.values():
            self.stop(seeder)
        self._seeders.clear()

    def close(self) -> None:
        for server in list(self.servers):
            self.stop(server)
        if self.postgres_url:
            for url in self.pg_databases:
                try:
                    data.drop_pg_database(self.postgres_url, url)
                except Exception as exc:
                    self.say(f"  could not drop {url}: {exc}")

    def settle(self, server: Server, *, patience: float = 60.0) -> float:
        """Wait until `server` is quiet (under 3% of a core over half a second), at most
        `patience` seconds; how long that took. A section that follows another on the
        same server starts after the other's aftermath (its WAL checkpointed, its
        single-use ids purged), which is the other's cost, not its own."""
        began = time.monotonic()
        last = server.cpu_seconds()
        while time.monotonic() - began < patience:
            time.sleep(0.5)
            now = server.cpu_seconds()
            if now - last < 0.015:
                break
            last = now
        waited = time.monotonic() - began
        if waited > 1.0:
            self.say(f"  waited {waited:.1f}s for {server.name} to go quiet")
        return waited

    def measure(self, server: Server, load: Load) -> Measured:
        before = server.cpu_seconds()
        result = run_load(server.url, load, client=self.client)
        return Measured(result, server.cpu_seconds() - before)

    def sqlite_target(self, name: str) -> tuple[str, Path]:
        work = self.workspace(name)
        keys_dir = work / "keys"
        url = f"sqlite:///{work / 'authserver.db'}"
        if not keys_dir.exists():
            data.make_keys(keys_dir, url)
        return url, keys_dir

    def pg_database(self) -> str:
        assert self.postgres_url
        url = data.create_pg_database(self.postgres_url)
        self.pg_databases.append(url)
        return url

    # -- 1. /protected ---------------------------------------------------------------

    def protected(self, server: Server, keys_dir: Path) -> dict[str, Any]:
        """/protected with one reused token, and with a fresh token per request, vs bare.

        "bare" is the bare FastAPI peer, in its own process, answering the same path.
        All three send the same request (a GET with a bearer token, produced by the
        same Lua function), so the load generator costs the same for each; the
        bare peer ignores the token.
        """
        bare = self.start_peer("bare", "bare", peer_env_for(server, keys_dir))
        try:
            return self._protected(server, bare, keys_dir)
        finally:
            self.stop(bare)

    def _protected(self, server: Server, bare: Server, keys_dir: Path) -> dict[str, Any]:
        plan = self.plan
        # More tokens than the server's verified-token cache holds, taken in a cycle:
        # by the time a token comes round again the cache has long forgotten it.
        count = plan.fresh_tokens or int(data.verifier_cache_size() * 1.1) + 100
        self.say(f"  minting {count} access tokens for the fresh-token runs")
        fresh = data.mint_access_tokens(keys_dir, issuer=server.url, count=count)
        (reused,) = data.mint_access_tokens(keys_dir, issuer=server.url, count=1)
        offset = 0
        targets = {"bare": bare, "reused": server, "fresh": server}

        def load(variant: str, duration: int) -> Load:
            tokens = [reused] if variant == "reused" else fresh
            start = offset if variant == "fresh" else 0
            return Load(
                "tokens", "/protected", duration, GET_CONNECTIONS, tokens=tokens, offset=start
            )

        variants = ("bare", "reused", "fresh")
        for variant in variants:
            warm = self.measure(targets[variant], load(variant, plan.warmup))
            offset += warm.load.requests if variant == "fresh" else 0
            self._check_errors(f"/protected warm-up ({variant})", warm)
        rounds: list[dict[str, Any]] = []
        for index in range(plan.rounds):
            row: dict[str, Any] = {}
            for variant in in_turn(variants, index):
                measured = self.measure(targets[variant], load(variant, plan.duration))
                if variant == "fresh":
                    offset += measured.load.requests
                row[variant] = measured.as_dict()
            row["reused_ratio"] = row["reused"]["rps"] / row["bare"]["rps"]
            row["fresh_ratio"] = row["fresh"]["rps"] / row["bare"]["rps"]
            rounds.append(row)
            self.say(
                f"  round {index + 1}: bare {row['bare']['rps']:.0f}/s, "
                f"reused {row['reused']['rps']:.0f}/s ({row['reused_ratio']:.2f}x), "
                f"fresh {row['fresh']['rps']:.0f}/s ({row['fresh_ratio']:.2f}x)"
            )
        cache_hits_possible = offset > count and count <= data.verifier_cache_size()
        if cache_hits_possible:
            self.say(
                f"  WARNING: {offset} fresh requests cycled through only {count} tokens, "
                "fewer than the server caches: the fresh figure may include cache hits"
            )
        summary = Rounds(rounds)
        cpu = summary.medians(variants, "cpu_us_per_request")
        return {
            "rounds": rounds,
            "rps": summary.medians(variants, "rps"),
            "cpu_us_per_request": cpu,
            "p99_ms": summary.medians(variants, "p99_ms"),
            "errors": summary.errors(*variants),
            "reused_ratio": summary.median("reused_ratio"),
            "fresh_ratio": summary.median("fresh_ratio"),
            # What the ratios would be if the server's CPU were all that mattered.
            "reused_cpu_ratio": cpu["bare"] / cpu["reused"],
            "fresh_cpu_ratio": cpu["bare"] / cpu["fresh"],
            "fresh_tokens": count,
            "fresh_requests": offset,
            "fresh_cache_hits_possible": cache_hits_possible,
            "bare_peer_runs_on": bare.runs_on(),
            "connections": GET_CONNECTIONS,
        }

    # -- metrics overhead (issue 15) --------------------------------------------------

    def metrics_overhead(self, database_url: str, keys_dir: Path) -> dict[str, Any]:
        """/protected (reused token) on two servers alike but for `--metrics-port`.

        Rounds alternate off, on, then on, off; the figure is the median over rounds of
        the server CPU time per request, on / off (the supervising process of the
        metered server, which serves the listener, counted in). Throughput is reported
        too, but on a shared machine it moves with the neighbours' load.
        """
        plain = self.start_authserver("metrics-off", database_url, keys_dir)
        metered = self.start_authserver(
            "metrics-on", database_url, keys_dir, AUTHSERVER_METRICS_PORT=str(free_port())
        )
        try:
            return self._metrics_overhead({"off": plain, "on": metered}, keys_dir)
        finally:
            self.stop(plain)
            self.stop(metered)

    def _metrics_overhead(self, servers: dict[str, Server], keys_dir: Path) -> dict[str, Any]:
        plan = self.plan
        loads = {}
        for variant, server in servers.items():
            (token,) = data.mint_access_tokens(keys_dir, issuer=server.url, count=1)
            loads[variant] = lambda duration, token=token: Load(
                "tokens", "/protected", duration, GET_CONNECTIONS, tokens=[token]
            )
            self._check_errors(
                f"/protected warm-up (metrics {variant})",
                self.measure(server, loads[variant](plan.warmup)),
            )
        rounds: list[dict[str, Any]] = []
        order = list(servers)
        for index in range(plan.rounds):
            row: dict[str, Any] = {}
            for variant in in_turn(order, index):
                server = servers[variant]
                measured = self.measure(server, loads[variant](plan.duration))
                self._check_errors(f"/protected (metrics {variant})", measured)
                row[variant] = measured.as_dict()
            row["cpu_ratio"] = row["on"]["cpu_us_per_request"] / row["off"]["cpu_us_per_request"]
            row["rps_ratio"] = row["on"]["rps"] / row["off"]["rps"]
            rounds.append(row)
            self.say(
                f"  round {index + 1}: CPU us/req off {row['off']['cpu_us_per_request']:.1f}, "
                f"on {row['on']['cpu_us_per_request']:.1f} ({row['cpu_ratio']:.3f}x); "
                f"req/s off {row['off']['rps']:.0f}, on {row['on']['rps']:.0f}"
            )
        summary = Rounds(rounds)
        cpu_ratio = summary.median("cpu_ratio")
        return {
            "rounds": rounds,
            "cpu_us_per_request": summary.medians(servers, "cpu_us_per_request"),
            "rps": summary.medians(servers, "rps"),
            "cpu_ratio": cpu_ratio,
            "rps_ratio": summary.median("rps_ratio"),
            "overhead": cpu_ratio - 1,
        }

    # -- 1c. /protected with DPoP (RFC 9449) -------------------------------------------

    def dpop_protected(self, server: Server, database_url: str, keys_dir: Path) -> dict[str, Any]:
        """/protected with a DPoP-bound token and a fresh proof per request, vs bare.

        The token comes from a real DPoP login to the server; the proofs are made by
        the client kit before each run (a proof is good once, so each run gets as many
        as it may send), and the bare peer is sent the same requests, which it ignores.
        """
        key = DPoPKey()
        data.add_user(database_url, keys_dir, DPOP_USER, rounds=SEED_BCRYPT_ROUNDS)
        proof = key.proof("POST", server.url + "/login")
        body = json.dumps({"username": DPOP_USER, "password": data.BENCH_PASSWORD}).encode()
        request = urllib.request.Request(
            server.url + "/login",
            data=body,
            headers={"Content-Type": "application/json", "DPoP": proof},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            token = json.loads(response.read())["access_token"]
        (bearer,) = data.mint_access_tokens(keys_dir, issuer=server.url, count=1)
        bare = self.start_peer("bare", "bare-dpop", peer_env_for(server, keys_dir))
        try:
            return self._dpop_protected(server, bare, key, token, bearer)
        finally:
            self.stop(bare)

    def _dpop_protected(
        self, server: Server, bare: Server, key: DPoPKey, token: str, bearer: str
    ) -> dict[str, Any]:
        plan = self.plan
        url = server.url + "/protected"
        pem = key.private_pem()
        # The bare peer checks nothing: one small list, sent round and round.
        bare_proofs = data.dpop_proofs(pem, "GET", url, 200, access_token=token)
        expected = {"dpop": 4000.0}

        def load(variant: str, duration: int) -> Load:
            if variant == "bearer":  # the same server, a plain token: what DPoP adds to it
                headers = {"Authorization": f"Bearer {bearer}"}
                return Load("get", "/protected", duration, GET_CONNECTIONS, headers=headers)
            if variant == "bare":
                proofs = bare_proofs
            else:
                count = int(expected["dpop"] * duration * 1.5) + 500
                proofs = data.dpop_proofs(pem, "GET", url, count, access_token=token)
            return Load(
                "dpop", "/protected", duration, GET_CONNECTIONS, tokens=[token], proofs=proofs
            )

        targets = {"bare": bare, "bearer": server, "dpop": server}
        for variant in targets:
            warm = self.measure(targets[variant], load(variant, plan.warmup))
            self._check_errors(f"/protected DPoP warm-up ({variant})", warm)
            if variant == "dpop" and warm.load.rps:
                expected["dpop"] = max(expected["dpop"] / 4, warm.load.rps)
        rounds: list[dict[str, Any]] = []
        for index in range(plan.dpop_rounds or plan.rounds):
            row: dict[str, Any] = {}
            # The two runs the target compares, bare and DPoP, back to back: this machine's
            # speed drifts from one run to the next, and a run between them widened the
            # spread of their ratio (0.36x to 0.56x within one full run).
            for variant in ["bearer", *in_turn(["bare", "dpop"], index)]:
                measured = self.measure(targets[variant], load(variant, plan.duration))
                row[variant] = measured.as_dict()
            expected["dpop"] = max(expected["dpop"], row["dpop"]["rps"])
            row["ratio"] = row["dpop"]["rps"] / row["bare"]["rps"]
            row["bearer_ratio"] = row["bearer"]["rps"] / row["bare"]["rps"]
            rounds.append(row)
            self.say(
                f"  round {index + 1}: bare {row['bare']['rps']:.0f}/s, "
                f"bearer {row['bearer']['rps']:.0f}/s ({row['bearer_ratio']:.2f}x), DPoP "
                f"{row['dpop']['rps']:.0f}/s ({row['ratio']:.2f}x), "
                f"{row['dpop']['errors']} errors"
            )
        summary = Rounds(rounds)
        cpu = summary.medians(targets, "cpu_us_per_request")
        return {
            "rounds": rounds,
            "rps": summary.medians(targets, "rps"),
            "cpu_us_per_request": cpu,
            "p99_ms": summary.medians(targets, "p99_ms"),
            "errors": summary.errors("dpop"),
            "ratio": summary.median("ratio"),
            "bearer_ratio": summary.median("bearer_ratio"),
            "cpu_ratio": cpu["bare"] / cpu["dpop"],
            # The server CPU a proof adds to a request with a (reused) token.
            "dpop_cpu_us": cpu["dpop"] - cpu["bearer"],
            "connections": GET_CONNECTIONS,
        }

    # -- 2. /login -------------------------------------------------------------------

    def login(self, server: Server, database_url: str, keys_dir: Path) -> dict[str, Any]:
        """/login at the configured bcrypt cost vs the bcrypt bound; /protected p99 under it."""
        plan = self.plan
        rounds_cost = data.LOGIN_BCRYPT_ROUNDS
        username = "loginuser"
        data.add_user(database_url, keys_dir, username, rounds=rounds_cost)
        password = data.BENCH_PASSWORD.encode()
        reference = bcrypt.hashpw(password, bcrypt.gensalt(rounds_cost))
        (token,) = data.mint_access_tokens(keys_dir, issuer=server.url, count=1)
        n = cores()
        body = json.dumps({"username": username, "password": data.BENCH_PASSWORD})
        # Issue 16's setting: 8 concurrent logins (more than the hashing pool: it never idles).
        logins = Load("post", "/login", plan.login_duration, connections=LOGIN_CLIENTS, body=body)
        probe = Load(
            "probe",
            "/protected",
            plan.login_duration - 1,
            headers={"Authorization": f"Bearer {token}"},
            delay_ms=plan.probe_delay_ms,
        )
        warm = self.measure(server, Load("post", "/login", 1, connections=LOGIN_CLIENTS, body=body))
        self._check_errors("/login warm-up", warm)
        rounds: list[dict[str, Any]] = []
        for index in range(plan.rounds):
            timings = [self._time_checkpw(password, reference) for _ in range(3)]
            checkpw = median([wall for wall, _ in timings])
            checkpw_cpu = median([cpu for _, cpu in timings])
            bound = n / checkpw
            idle = self.measure(server, probe)
            loaded_probe, login_run = self._concurrently(server, probe, logins)
            row = {
                "checkpw_s": checkpw,
                "checkpw_cpu_s": checkpw_cpu,
                "bound_per_s": bound,
                # How much of the machine the server got while logins ran: well under
                # `cores` means other processes took the rest.
                "server_cores_used": login_run.cpu_seconds / login_run.load.seconds,
                "login": login_run.as_dict(),
                "login_ratio": login_run.load.rps / bound,
                "idle_probe": idle.as_dict(),
                "loaded_probe": loaded_probe.as_dict(),
                "p99_ratio": loaded_probe.load.p99_ms / max(idle.load.p99_ms, 1e-6),
            }
            rounds.append(row)
            self.say(
                f"  round {index + 1}: checkpw {checkpw * 1000:.0f} ms -> bound {bound:.2f}/s; "
                f"logins {login_run.load.rps:.2f}/s ({row['login_ratio']:.2f}x, server used "
                f"{row['server_cores_used']:.2f} cores); "
                f"/protected p99 idle {idle.load.p99_ms:.2f} ms, "
                f"under logins {loaded_probe.load.p99_ms:.2f} ms ({row['p99_ratio']:.2f}x)"
            )
        summary = Rounds(rounds)
        return {
            "bcrypt_rounds": rounds_cost,
            "cores": n,
            "login_clients": LOGIN_CLIENTS,
            "probe_interval_ms": plan.probe_delay_ms,
            "rounds": rounds,
            "checkpw_ms": summary.median("checkpw_s") * 1000,
            "checkpw_cpu_ms": summary.median("checkpw_cpu_s") * 1000,
            "server_cores_used": summary.median("server_cores_used"),
            "bound_per_s": summary.median("bound_per_s"),
            "login_per_s": summary.median("login", "rps"),
            "login_ratio": summary.median("login_ratio"),
            "cpu_ms_per_login": summary.median("login", "cpu_us_per_request") / 1000,
            "idle_p99_ms": summary.median("idle_probe", "p99_ms"),
            "loaded_p99_ms": summary.median("loaded_probe", "p99_ms"),
            "p99_ratio": summary.median("p99_ratio"),
            "errors": summary.errors("login", "loaded_probe"),
        }

    @staticmethod
    def _time_checkpw(password: bytes, hashed: bytes) -> tuple[float, float]:
        """Wall-clock and CPU seconds of one `checkpw`."""
        began, cpu = time.perf_counter(), time.thread_time()
        bcrypt.checkpw(password, hashed)
        return time.perf_counter() - began, time.thread_time() - cpu

    def _concurrently(self, server: Server, probe: Load, main: Load) -> tuple[Measured, Measured]:
        """Run `main`, and `probe` inside it (starting half a second later)."""
        results: dict[str, LoadResult] = {}

        def run_main() -> None:
            results["main"] = run_load(server.url, main, client=self.client)

        before = server.cpu_seconds()
        thread = threading.Thread(target=run_main)
        thread.start()
        time.sleep(0.5)
        probed = run_load(server.url, probe, client=self.client)
        thread.join()
        cpu = server.cpu_seconds() - before
        return Measured(probed, 0.0), Measured(results["main"], cpu)

    # -- 3. /refresh -----------------------------------------------------------------

    def refresh(self, server: Server, database_url: str, keys_dir: Path) -> dict[str, Any]:
        """/refresh, 32 clients each rotating its own family, vs the sign-only peer."""
        families = self.seed_families(
            database_url, keys_dir, REFRESH_CLIENTS * (self.plan.rounds + 1)
        )
        self.stop_seeders()
        # Named after the server, as the sqlite and the PostgreSQL runs each have one.
        sign = self.start_peer("sign", f"{server.name}-sign", peer_env_for(server, keys_dir))
        try:
            return self._refresh(server, sign, families)
        finally:
            self.stop(sign)

    def _refresh(self, server: Server, sign: Server, families: list[str]) -> dict[str, Any]:
        plan = self.plan
        batches = [
            families[i : i + REFRESH_CLIENTS] for i in range(0, len(families), REFRESH_CLIENTS)
        ]
        # The sign-only app is loaded exactly as authserver is: the same script sends each
        # client's next request with the refresh token of its last answer (random ones
        # there), so the load generator does the same work for both.
        starts = [secrets.token_urlsafe(32) for _ in range(REFRESH_CLIENTS)]

        def signing(duration: int) -> Load:
            return Load("refresh", "/refresh", duration, REFRESH_CLIENTS, tokens=starts)

        def refresh(tokens: list[str], duration: int) -> Load:
            return Load("refresh", "/refresh", duration, REFRESH_CLIENTS, tokens=tokens)

        self._check_errors("sign-only warm-up", self.measure(sign, signing(plan.warmup)))
        warm = self.measure(server, refresh(batches[0], plan.warmup))
        rounds: list[dict[str, Any]] = []
        for index in range(plan.rounds):
            signed = self.measure(sign, signing(plan.duration))
            refreshed = self.measure(server, refresh(batches[index + 1], plan.duration))
            row = {
                "sign": signed.as_dict(),
                "refresh": refreshed.as_dict(),
                "ratio": refreshed.load.rps / signed.load.rps,
            }
            rounds.append(row)
            self.say(
                f"  round {index + 1}: sign {signed.load.rps:.0f}/s, refresh "
                f"{refreshed.load.rps:.0f}/s ({row['ratio']:.2f}x), "
                f"{refreshed.load.errors} errors"
            )
        summary = Rounds(rounds)
        return {
            "clients": REFRESH_CLIENTS,
            "rounds": rounds,
            "sign_per_s": summary.median("sign", "rps"),
            "refresh_per_s": summary.median("refresh", "rps"),
            "ratio": summary.median("ratio"),
            "cpu_us_per_request": summary.medians(("sign", "refresh"), "cpu_us_per_request"),
            "p99_ms": summary.median("refresh", "p99_ms"),
            "errors": warm.load.errors + summary.errors("refresh"),
            "sign_errors": summary.errors("sign"),
            "sign_peer_runs_on": sign.runs_on(),
        }

    # -- issue 12: client_credentials and introspection ------------------------------

    def clients(self, server: Server, database_url: str, keys_dir: Path) -> dict[str, Any]:
        """client_credentials vs the sign-only peer's /token; introspection of a user's valid
        access token vs the bare peer's /introspect. Both clients authenticate with HTTP
        Basic, so every request looks its client up; every answer is checked."""
        service_secret = data.add_confidential_client(database_url, keys_dir, "bench-service")
        api_secret = data.add_confidential_client(database_url, keys_dir, "bench-api")
        # A user's token, with the session (sid) introspection checks on every request,
        # from the server measured (its issuer), before the measurement; a user of its
        # own, hashed at the server's cost, so the login rehashes nothing.
        user = "bench-introspected"
        data.add_user(database_url, keys_dir, user, rounds=data.LOGIN_BCRYPT_ROUNDS)
        access_token = login_access_token(server.url, username=user)
        env = peer_env_for(server, keys_dir)
        sign = self.start_peer("sign", f"{server.name}-clients-sign", env)
        bare = self.start_peer("bare", f"{server.name}-clients-bare", env)
        try:
            return self._clients(server, sign, bare, service_secret, api_secret, access_token)
        finally:
            self.stop(sign)
            self.stop(bare)

    def _clients(
        self,
        server: Server,
        sign: Server,
        bare: Server,
        service_secret: str,
        api_secret: str,
        access_token: str,
    ) -> dict[str, Any]:
        plan = self.plan

        def basic(client_id: str, secret: str) -> dict[str, str]:
            pair = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
            return {
                "Authorization": f"Basic {pair}",
                "Content-Type": "application/x-www-form-urlencoded",
            }

        def token(duration: int) -> Load:
            return Load(
                "post",
                "/token",
                duration,
                GET_CONNECTIONS,
                headers=basic("bench-service", service_secret),
                body="grant_type=client_credentials",
                expect_body='"access_token"',
            )

        def introspect(duration: int) -> Load:
            return Load(
                "post",
                "/introspect",
                duration,
                GET_CONNECTIONS,
                headers=basic("bench-api", api_secret),
                body=f"token={access_token}",
                expect_body='"active":true',
            )

        runs = {
            "sign": (sign, token),
            "client_credentials": (server, token),
            "bare": (bare, introspect),
            "introspect": (server, introspect),
        }
        for name, (target, load) in runs.items():
            self._check_errors(f"{name} warm-up", self.measure(target, load(plan.warmup)))
        rounds: list[dict[str, Any]] = []
        for index in range(plan.rounds):
            row: dict[str, Any] = {}
            for name in in_turn(list(runs), index):
                target, load = runs[name]
                row[name] = self.measure(target, load(plan.duration)).as_dict()
            row["client_credentials_ratio"] = row["client_credentials"]["rps"] / row["sign"]["rps"]
            row["introspect_ratio"] = row["introspect"]["rps"] / row["bare"]["rps"]
            rounds.append(row)
            self.say(
                f"  round {index + 1}: sign {row['sign']['rps']:.0f}/s, client_credentials "
                f"{row['client_credentials']['rps']:.0f}/s "
                f"({row['client_credentials_ratio']:.2f}x); bare {row['bare']['rps']:.0f}/s, "
                f"introspect {row['introspect']['rps']:.0f}/s ({row['introspect_ratio']:.2f}x)"
            )
        summary = Rounds(rounds)
        return {
            "rounds": rounds,
            "connections": GET_CONNECTIONS,
            "rps": summary.medians(runs, "rps"),
            "cpu_us_per_request": summary.medians(runs, "cpu_us_per_request"),
            "client_credentials_ratio": summary.median("client_credentials_ratio"),
            "introspect_ratio": summary.median("introspect_ratio"),
            "spread": summary.spread("client_credentials_ratio", "introspect_ratio"),
            "errors": {n: summary.errors(n) for n in ("client_credentials", "introspect")},
            "peer_errors": summary.errors("sign", "bare"),
        }

    def dpop_refresh(self, server: Server, database_url: str, keys_dir: Path) -> dict[str, Any]:
        """/refresh of DPoP-bound families, a fresh proof per request, vs the sign-only peer.

        The families are bound by DPoP logins (to a seeding server); the sign-only peer
        is sent the same requests, proofs included, and ignores them.
        """
        key = DPoPKey()
        pem = key.private_pem()
        families = self.seed_families(
            database_url, keys_dir, REFRESH_CLIENTS * (self.plan.rounds + 1), dpop_key_pem=pem
        )
        self.stop_seeders()
        sign = self.start_peer("sign", f"{server.name}-sign-dpop", peer_env_for(server, keys_dir))
        try:
            return self._dpop_refresh(server, sign, families, pem)
        finally:
            self.stop(sign)

    def _dpop_refresh(
        self, server: Server, sign: Server, families: list[str], pem: bytes
    ) -> dict[str, Any]:
        plan = self.plan
        url = server.url + "/refresh"
        batches = [
            families[i : i + REFRESH_CLIENTS] for i in range(0, len(families), REFRESH_CLIENTS)
        ]
        starts = [secrets.token_urlsafe(32) for _ in range(REFRESH_CLIENTS)]
        sign_proofs = data.dpop_proofs(pem, "POST", url, 200)
        expected = 1500.0

        def proofs(duration: int) -> list[str]:
            # Each wrk thread (one connection each) takes its own share of the list, and
            # the connections are served unevenly: the busiest does 1.6 to 2.6 times the
            # mean (measured, 32 connections, 2 s runs). A thread past its share replays a
            # proof, which the server rightly refuses: the odd error of a quick run whose
            # warm-up was slower than its rounds. So shares cover four times the mean.
            count = int(expected * duration * 4) + 50 * REFRESH_CLIENTS
            return data.dpop_proofs(pem, "POST", url, count)

        def signing(duration: int) -> Load:
            return Load(
                "refresh", "/refresh", duration, REFRESH_CLIENTS, tokens=starts, proofs=sign_proofs
            )

        def refresh(tokens: list[str], duration: int) -> Load:
            return Load(
                "refresh",
                "/refresh",
                duration,
                REFRESH_CLIENTS,
                tokens=tokens,
                proofs=proofs(duration),
            )

        self._check_errors("sign-only warm-up", self.measure(sign, signing(plan.warmup)))
        warm = self.measure(server, refresh(batches[0], plan.warmup))
        expected = max(expected / 4, warm.load.rps)
        rounds: list[dict[str, Any]] = []
        for index in range(plan.rounds):
            signed = self.measure(sign, signing(plan.duration))
            refreshed = self.measure(server, refresh(batches[index + 1], plan.duration))
            expected = max(expected, refreshed.load.rps)
            row = {
                "sign": signed.as_dict(),
                "refresh": refreshed.as_dict(),
                "ratio": refreshed.load.rps / signed.load.rps,
            }
            rounds.append(row)
            self.say(
                f"  round {index + 1}: sign {signed.load.rps:.0f}/s, DPoP refresh "
                f"{refreshed.load.rps:.0f}/s ({row['ratio']:.2f}x), "
                f"{refreshed.load.errors} errors"
            )
        summary = Rounds(rounds)
        cpu = summary.medians(("sign", "refresh"), "cpu_us_per_request")
        return {
            "clients": REFRESH_CLIENTS,
            "rounds": rounds,
            "sign_per_s": summary.median("sign", "rps"),
            "refresh_per_s": summary.median("refresh", "rps"),
            "ratio": summary.median("ratio"),
            "cpu_us_per_request": cpu,
            "cpu_ratio": cpu["sign"] / cpu["refresh"],
            "p99_ms": summary.median("refresh", "p99_ms"),
            "errors": warm.load.errors + summary.errors("refresh"),
        }

    def scaling(self, servers: dict[int, Server], url: str, keys_dir: Path) -> dict[str, Any]:
        """Refresh throughput of 1, 2, 4 worker processes sharing one PostgreSQL database."""
        plan = self.plan
        runs = len(servers) * (plan.scaling_rounds + 1)
        families = self.seed_families(url, keys_dir, REFRESH_CLIENTS * runs)
        self.stop_seeders()
        batches = iter(
            families[i : i + REFRESH_CLIENTS] for i in range(0, len(families), REFRESH_CLIENTS)
        )
        for server in servers.values():
            self.measure(server, Load("refresh", "/refresh", plan.warmup, tokens=next(batches)))
        rounds: list[dict[str, Any]] = []
        for index in range(plan.scaling_rounds):
            row: dict[str, Any] = {}
            for workers, server in servers.items():
                load = Load("refresh", "/refresh", plan.duration, threads=2, tokens=next(batches))
                row[str(workers)] = self.measure(server, load).as_dict()
            rounds.append(row)
            self.say(
                f"  round {index + 1}: "
                + ", ".join(f"{w} proc {row[str(w)]['rps']:.0f}/s" for w in servers)
            )
        first = str(min(servers))
        summary = Rounds(rounds)
        return {
            "workers": list(servers),
            "rounds": rounds,
            "refresh_per_s": summary.medians(servers, "rps"),
            "speedup": {
                w: median([r[str(w)]["rps"] / r[first]["rps"] for r in rounds]) for w in servers
            },
            "cpu_us_per_request": summary.medians(servers, "cpu_us_per_request"),
            "errors": summary.errors(*servers),
        }

    # -- 4. memory and purge -----------------------------------------------------------

    def memory(self, server: Server, database_url: str, keys_dir: Path) -> dict[str, Any]:
        """RSS after N refreshes, and its growth over the second half of them."""
        plan = self.plan
        target, half = plan.memory_refreshes, plan.memory_refreshes // 2
        samples = [(0, server.rss_bytes())]
        done = errors = 0
        half_sample: tuple[int, int] | None = None
        rate = 0.0
        began = time.monotonic()
        while done < target:
            mark = half if half_sample is None else target
            duration = plan.memory_chunk
            if rate:
                duration = max(1, min(plan.memory_chunk, math.ceil((mark - done) / rate)))
            tokens = self.seed_families(database_url, keys_dir, REFRESH_CLIENTS)
            run = run_load(
                server.url,
                Load("refresh", "/refresh", duration, REFRESH_CLIENTS, tokens=tokens),
                client=self.client,
            )
            done += run.ok
            errors += run.errors
            rate = run.rps or rate
            samples.append((done, server.rss_bytes()))
            if len(samples) % 5 == 0:
                self.say(f"  {done} refreshes, RSS {samples[-1][1] / MB:.1f} MB")
            if half_sample is None and done >= half:
                half_sample = samples[-1]
            if run.ok == 0:
                raise RuntimeError(f"no refresh succeeded:\n{server.tail()}")
        end = samples[-1]
        assert half_sample is not None
        self.stop_seeders()
        rows = data.count_rows(database_url, "refresh_tokens", "refresh_families", "audit_events")
        growth = (end[1] - half_sample[1]) / half_sample[1]
        self.say(
            f"  RSS {half_sample[1] / MB:.1f} MB after {half_sample[0]} refreshes, "
            f"{end[1] / MB:.1f} MB after {end[0]} ({growth * 100:+.1f} %), {errors} errors"
        )
        return {
            "refreshes": end[0],
            "seconds": time.monotonic() - began,
            "rss_mb": end[1] / MB,
            "half_refreshes": half_sample[0],
            "half_rss_mb": half_sample[1] / MB,
            "start_rss_mb": samples[0][1] / MB,
            "growth": growth,
            "samples": [{"refreshes": n, "rss_mb": rss / MB} for n, rss in samples],
            "errors": errors,
            "rows": rows,
        }

    def purge(self) -> dict[str, Any]:
        """Expired families go: by the server's periodic task, and by `authserver db purge`."""
        database_url, keys_dir = self.sqlite_target("purge-periodic")
        ttl = 2
        port = free_port()
        env = server_env(
            database_url=database_url,
            keys_dir=keys_dir,
            port=port,
            AUTHSERVER_REFRESH_TOKEN_TTL=str(ttl),
            AUTHSERVER_PURGE_INTERVAL="0.5",
        )
        server = Server.start(
            "purge-serve",
            authserver_serve_command(port),
            env,
            cwd=self.workspace("purge-periodic"),
            port=port,
        )
        self.servers.append(server)
        try:
            server.wait_healthy()
            # The live ones first: the expiring ones must be refreshed before they expire.
            self.seed_families(database_url, keys_dir, 3)
            expiring = self.seed_families(database_url, keys_dir, 10, refresh_ttl=ttl)
            for token in expiring:  # each family gets a spent row and an active one
                self._post_json(server.url + "/refresh", {"refresh_token": token})
            tables = ("refresh_tokens", "refresh_families")
            before = data.count_rows(database_url, *tables)
            deadline = time.monotonic() + ttl + 8
            after = before
            while time.monotonic() < deadline:
                time.sleep(0.5)
                after = data.count_rows(database_url, *tables)
                if after["refresh_families"] == 3:
                    break
        finally:
            self.stop(server)
            self.stop_seeders()
        periodic = {
            "before": before,
            "after": after,
            "ok": after == {"refresh_tokens": 3, "refresh_families": 3},
        }

        database_url, keys_dir = self.sqlite_target("purge-cli")
        self.seed_families(database_url, keys_dir, 10, refresh_ttl=1)
        self.seed_families(database_url, keys_dir, 3)
        self.stop_seeders()
        cli_before = data.count_rows(database_url, *tables)
        time.sleep(1.2)
        cli_env = server_env(database_url=database_url, keys_dir=keys_dir, port=0)
        run = subprocess.run(
            [*authserver_command(), "db", "purge"],
            env=cli_env,
            cwd=self.workspace("purge-cli"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        cli_after = data.count_rows(database_url, *tables)
        cli = {
            "command": "authserver db purge",
            "exit": run.returncode,
            "output": (run.stdout + run.stderr).strip()[-300:],
            "before": cli_before,
            "after": cli_after,
            "ok": run.returncode == 0 and cli_after == {"refresh_tokens": 3, "refresh_families": 3},
        }
        self.say(
            f"  periodic task: {before} -> {after}; db purge: {cli_before} -> {cli_after} "
            f"({cli['output']!r})"
        )
        return {"periodic": periodic, "cli": cli, "ok": periodic["ok"] and cli["ok"]}

    @staticmethod
    def _post_json(url: str, body: dict[str, str]) -> int:
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            status: int = response.status
            return status

    # -- 5. start-up -------------------------------------------------------------------

    def startup(self) -> dict[str, Any]:
        """Seconds from `authserver serve` to the first 200 from /health, keys on disk."""
        work = self.workspace("startup")
        keys_dir = work / "keys"
        database_url = f"sqlite:///{work / 'authserver.db'}"
        data.make_keys(keys_dir, database_url, 3)
        data.add_user(database_url, keys_dir, data.BENCH_USER, rounds=data.LOGIN_BCRYPT_ROUNDS)
        # authserver's own modules compiled to bytecode, as an installed package's are
        # (pip compiles on install; an editable checkout run with PYTHONDONTWRITEBYTECODE
        # would otherwise compile them from source at every start, ~0.3 s).
        compileall.compile_dir(Path(authserver.__file__).parent, quiet=1)
        runs: list[dict[str, float]] = []
        for index in range(self.plan.startup_runs):
            port = free_port()
            server = Server.start(
                "startup",
                authserver_serve_command(port),
                server_env(database_url=database_url, keys_dir=keys_dir, port=port),
                cwd=work,
                port=port,
            )
            self.servers.append(server)
            try:
                seconds = server.wait_healthy(interval=0.01)
                cpu = server.cpu_seconds()
            finally:
                self.stop(server)
            runs.append({"seconds": seconds, "cpu_seconds": cpu})
            self.say(f"  run {index + 1}: /health 200 after {seconds:.2f} s ({cpu:.2f} s CPU)")
        return {
            "keys": 3,
            "runs": runs,
            "median_s": Rounds(runs).median("seconds"),
            "max_s": max(r["seconds"] for r in runs),
            "cpu_s": Rounds(runs).median("cpu_seconds"),
        }

    # -- helpers -----------------------------------------------------------------------

    def _check_errors(self, what: str, measured: Measured) -> None:
        if measured.load.errors:
            self.say(f"  WARNING: {measured.load.errors} errors in {what}")
