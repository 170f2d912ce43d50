"""`python -m bench`: run the sections, print the table, write results.json and results.png."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report
from bench.load import wrk_path
from bench.runs import FULL, QUICK, Bench, Plan, cores
from bench.server import Server

SECTIONS = (
    "startup",
    "protected",
    "dpop-protected",
    "login",
    "refresh",
    "dpop-refresh",
    "clients",
    "memory",
    "scaling",
    "purge",
)
# Run only when named: what metrics cost /protected (issue 15).
EXTRA_SECTIONS = ("metrics",)
DEFAULT_OUT = Path(__file__).resolve().parent
README = DEFAULT_OUT.parent / "README.md"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark authserver against baseline apps measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="short runs (< 2 minutes)")
    parser.add_argument("--rounds", type=int, help="A/B rounds per comparison")
    parser.add_argument("--duration", type=int, help="seconds per measured run")
    parser.add_argument("--memory-refreshes", type=int, help="refreshes in the memory run")
    parser.add_argument("--startup-runs", type=int, help="server starts timed")
    parser.add_argument(
        "--fresh-tokens",
        type=int,
        help="access tokens minted for the fresh-token runs (default: more than the server "
        "caches; fewer makes that figure optimistic, which is fine for a smoke test)",
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)}; "
        "also metrics: /protected with --metrics-port off and on, in alternating rounds)",
    )
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator (auto: wrk if installed)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("AUTHSERVER_BENCH_POSTGRES_URL")
        or os.environ.get("AUTHSERVER_TEST_POSTGRES_URL")
        or DEFAULT_PG,
        help="an existing PostgreSQL database to create the bench databases from "
        "('' to skip PostgreSQL)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where results go")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--readme",
        choices=("auto", "yes", "no"),
        default="auto",
        help="write the figures into README.md's benchmark results (auto: after a full run "
        "of every section to the default --out)",
    )
    parser.add_argument(
        "--render-readme",
        action="store_true",
        help="run nothing: write --out's results.json into README.md's benchmark results",
    )
    return parser.parse_args(argv)


def idle_share(seconds: float = 3.0) -> float:
    """The share of the machine's CPU time that was idle over `seconds` (/proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (idle1 - idle0) / max(1, total1 - total0)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.rounds:
        changes["rounds"] = args.rounds
        changes["scaling_rounds"] = min(plan.scaling_rounds, args.rounds)
        changes["dpop_rounds"] = args.rounds
    if args.duration:
        changes["duration"] = args.duration
        changes["login_duration"] = max(2, min(plan.login_duration, args.duration + 1))
        changes["memory_chunk"] = min(plan.memory_chunk, args.duration)
    if args.memory_refreshes:
        changes["memory_refreshes"] = args.memory_refreshes
    if args.startup_runs:
        changes["startup_runs"] = args.startup_runs
    if args.fresh_tokens:
        changes["fresh_tokens"] = args.fresh_tokens
    return replace(plan, **changes) if changes else plan


def versions() -> dict[str, str]:
    found = {}
    for name in (
        "uvicorn",
        "uvloop",
        "httptools",
        "fastapi",
        "starlette",
        "python-jose",
        "sqlalchemy",
        "aiosqlite",
        "asyncpg",
        "bcrypt",
        "orjson",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def after_quiet(
    bench: Bench, server: Server, run: Callable[[], dict[str, Any]]
) -> Callable[[], dict[str, Any]]:
    """`run`, once `server` has settled after what ran on it before (`Bench.settle`)."""

    def settled() -> dict[str, Any]:
        bench.settle(server)
        return run()

    return settled


class Runner:
    def __init__(self, args: argparse.Namespace, argv: list[str] | None = None) -> None:
        self.args = args
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.plan = make_plan(args)
        self.only = set(args.only.split(",")) if args.only else set(SECTIONS)
        unknown = self.only - set(SECTIONS) - set(EXTRA_SECTIONS)
        if unknown:
            raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))}")
        client = args.client
        if client == "auto":
            client = "wrk" if wrk_path() else "python"
        if client == "wrk" and not wrk_path():
            raise SystemExit("wrk is not installed (apt-get install wrk), or use --client python")
        self.client = client
        self.results: dict[str, Any] = {}
        self.began = time.monotonic()

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.began:6.1f}s] {message}", flush=True)

    def section(self, name: str, work: Callable[[], Any], *keys: str) -> None:
        """Run one section; a failure is recorded in the results, and the run goes on."""
        self.say(f"{name}{' ' + '/'.join(keys) if keys else ''}")
        target = self.results
        for key in keys[:-1] if keys else ():
            target = target.setdefault(key, {})
        slot = keys[-1] if keys else name
        try:
            target[slot] = work()
        except Exception as exc:
            self.say(f"  FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            target[slot] = {"error": f"{type(exc).__name__}: {exc}"}

    def run(self) -> dict[str, Any]:
        root = Path(tempfile.mkdtemp(prefix="authserver-bench-"))
        bench = Bench(
            self.plan,
            client=self.client,
            root=root,
            postgres_url=self.args.postgres_url or None,
            say=self.say,
        )
        self.results["meta"] = {
            "mode": self.plan.name,
            "plan": self.plan.__dict__,
            "client": self.client,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "cores": cores(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "versions": versions(),
            "loadavg_before": os.getloadavg(),
            "command": " ".join(["python -m bench", *self.argv]),
            # How much of the machine was free before the run: figures from a machine
            # that other jobs share are low and noisy (ratios much less so).
            "idle_share_before": idle_share(1.0 if self.plan.name == "quick" else 3.0),
        }
        self.say(
            f"mode {self.plan.name}, client {self.client}, {cores()} cores, "
            f"load average {os.getloadavg()[0]:.2f}; working in {root}"
        )
        try:
            self._run_all(bench)
        finally:
            bench.close()
            if not self.args.keep:
                shutil.rmtree(root, ignore_errors=True)
        self.results["meta"]["loadavg_after"] = os.getloadavg()
        self.results["meta"]["seconds"] = round(time.monotonic() - self.began, 1)
        return self.results

    def _run_all(self, bench: Bench) -> None:
        if "startup" in self.only:
            self.section("startup", bench.startup)
        if self.only & {"protected", "login", "refresh", "clients", "dpop-refresh"}:
            url, keys_dir = bench.sqlite_target("sqlite")
            server = bench.start_authserver("sqlite", url, keys_dir)
            self.results["meta"]["server_runs_on"] = server.runs_on()
            # These sections share one server: each starts once the last has settled.
            settled = functools.partial(after_quiet, bench, server)

            if "protected" in self.only:
                self.section("protected", settled(lambda: bench.protected(server, keys_dir)))
            if "login" in self.only:
                self.section("login", settled(lambda: bench.login(server, url, keys_dir)))
            if "refresh" in self.only:
                self.section(
                    "refresh",
                    settled(lambda: bench.refresh(server, url, keys_dir)),
                    "refresh",
                    "sqlite",
                )
            if "clients" in self.only:
                self.section(
                    "clients",
                    settled(lambda: bench.clients(server, url, keys_dir)),
                    "clients",
                    "sqlite",
                )
            if "dpop-refresh" in self.only:
                self.section(
                    "dpop-refresh", settled(lambda: bench.dpop_refresh(server, url, keys_dir))
                )
            bench.stop(server)
        if "dpop-protected" in self.only:
            # A server and database of its own: every request records its proof's id, and
            # purging them a minute later would land in the next section's figures.
            url, keys_dir = bench.sqlite_target("sqlite-dpop")
            server = bench.start_authserver("sqlite-dpop", url, keys_dir)
            self.section("dpop-protected", lambda: bench.dpop_protected(server, url, keys_dir))
            bench.stop(server)
        if "metrics" in self.only:
            url, keys_dir = bench.sqlite_target("sqlite")
            self.section("metrics", lambda: bench.metrics_overhead(url, keys_dir))
        if "memory" in self.only:

            def memory() -> dict[str, Any]:
                url, keys_dir = bench.sqlite_target("memory")
                server = bench.start_authserver("memory", url, keys_dir)
                try:
                    return bench.memory(server, url, keys_dir)
                finally:
                    bench.stop(server)

            self.section("memory", memory)
        if self.only & {"refresh", "scaling", "clients"}:
            self._postgres(bench)
        if "purge" in self.only:
            self.section("purge", bench.purge)

    def _postgres(self, bench: Bench) -> None:
        from bench import data

        why = (
            "no --postgres-url" if not bench.postgres_url else data.pg_reachable(bench.postgres_url)
        )
        if why:
            self.say(f"PostgreSQL skipped: {why}")
            for name in ("refresh", "clients"):
                if name in self.only:
                    self.results.setdefault(name, {})["postgresql"] = {"skipped": why}
            if "scaling" in self.only:
                self.results["scaling"] = {"skipped": why}
            return
        url = bench.pg_database()
        keys_dir = bench.workspace("postgresql") / "keys"
        data.make_keys(keys_dir, url)
        workers = self.plan.workers if "scaling" in self.only else (1,)
        servers = {}
        for n in workers:
            servers[n] = bench.start_authserver(f"pg-{n}", url, keys_dir, workers=n)
        try:
            if "refresh" in self.only:
                self.section(
                    "refresh",
                    lambda: bench.refresh(servers[1], url, keys_dir),
                    "refresh",
                    "postgresql",
                )
            if "clients" in self.only:
                self.section(
                    "clients",
                    after_quiet(
                        bench, servers[1], lambda: bench.clients(servers[1], url, keys_dir)
                    ),
                    "clients",
                    "postgresql",
                )
            if "scaling" in self.only:
                self.section("scaling", lambda: bench.scaling(servers, url, keys_dir))
        finally:
            for server in servers.values():
                bench.stop(server)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render_readme:
        results = json.loads((args.out / "results.json").read_text())
        report.update_readme(results, README)
        print(f"wrote {args.out / 'results.json'} into {README}")
        return
    runner = Runner(args, argv)
    results = runner.run()
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, args.out / "results.json")
    try:
        report.chart(results, args.out / "results.png")
        wrote = f"{args.out / 'results.json'} and {args.out / 'results.png'}"
    except ImportError:
        wrote = f"{args.out / 'results.json'} (no chart: pip install -e '.[bench]' for matplotlib)"
    print()
    print(report.table(results))
    print()
    print(report.details(results))
    print(f"\nwrote {wrote} in {results['meta']['seconds']:.0f} s")
    whole = args.out == DEFAULT_OUT and runner.only == set(SECTIONS) and not args.quick
    if args.readme == "yes" or (args.readme == "auto" and whole):
        report.update_readme(results, README)
        print(f"wrote the figures into {README}")
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    failed += [
        f"{section}/{k}"
        for section in ("refresh", "clients")
        for k, v in (results.get(section) or {}).items()
        if isinstance(v, dict) and "error" in v
    ]
    if failed:
        print(f"sections that failed to run: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(2)
