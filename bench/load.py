"""Load generation: `wrk` with the Lua scripts of bench/lua, or the Python client.

A `Load` says what to send; `run_load` returns a `LoadResult` either way.
Kinds:

- `get`: GET `path` with fixed `headers`, as fast as `connections` allow;
- `tokens`: GET `path` with a different access token from `tokens` per request;
- `post`: POST `body` (JSON, unless `headers` name a Content-Type) to `path`; with
  `expect_body`, an answer that does not contain it counts as an error;
- `refresh`: POST /refresh, `tokens` being one refresh token per family; each
  family is rotated by one request at a time, its successor taken from the answer;
- `probe`: like `get` on one connection, pausing `delay_ms` between requests;
- `dpop`: GET `path` with the DPoP-bound access token `tokens[0]` and the next of
  `proofs` per request (RFC 9449); `refresh` with `proofs` sends one per request too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

LUA_DIR = Path(__file__).resolve().parent / "lua"
Kind = Literal["get", "tokens", "post", "refresh", "probe", "dpop"]


@dataclass(frozen=True)
class Load:
    kind: Kind
    path: str
    duration: float
    connections: int = 32
    threads: int = 1
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = ""
    tokens: Sequence[str] = ()
    proofs: Sequence[str] = ()
    offset: int = 0
    delay_ms: float = 0.0
    timeout: float = 10.0
    expect_body: str = ""


@dataclass(frozen=True)
class LoadResult:
    requests: int  # answers received
    errors: int  # wrong status or body, socket errors, timeouts
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @property
    def ok(self) -> int:
        return max(0, self.requests - self.errors)

    @property
    def rps(self) -> float:
        """Good answers per second."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_load(base_url: str, load: Load, *, client: str) -> LoadResult:
    if client == "wrk":
        return run_wrk(base_url, load)
    from bench.pyclient import run_python

    return run_python(base_url, load)


def run_wrk(base_url: str, load: Load) -> LoadResult:
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError("wrk is not installed")
    connections = 1 if load.kind == "probe" else load.connections
    threads = max(1, min(load.threads, connections))
    if load.kind == "refresh":
        threads = connections  # see refresh.lua: one connection per thread
    script = LUA_DIR / f"{load.kind}.lua"
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        args: list[str] = []
        if load.kind in ("tokens", "refresh"):
            tokens_file = Path(tmp) / "tokens.txt"
            tokens_file.write_text("\n".join(load.tokens) + "\n")
            args = [str(tokens_file), str(threads), str(load.offset // threads)]
        if load.proofs:
            proofs_file = Path(tmp) / "proofs.txt"
            proofs_file.write_text("\n".join(load.proofs) + "\n")
            if load.kind == "dpop":
                args = [str(proofs_file), str(threads), load.tokens[0]]
            else:
                args.append(str(proofs_file))
        elif load.kind == "post":
            args = [load.body, load.expect_body]
        elif load.kind == "probe":
            args = [str(max(0, round(load.delay_ms)))]
        command = [
            wrk,
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(load.duration))}s",
            "--timeout",
            f"{max(1, round(load.timeout))}s",
            "-s",
            str(script),
        ]
        for name, value in load.headers.items():
            command += ["-H", f"{name}: {value}"]
        command += [base_url + load.path, "--", *args]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=load.duration + 60, check=False
        )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            r = json.loads(line.removeprefix("BENCH_RESULT "))
            socket_errors = (
                r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
            )
            # A body judged wrong may also have had a wrong status: count it once.
            wrong = max(r["status_errors"], r["bad"])
            return LoadResult(
                requests=r["requests"],
                errors=wrong + socket_errors,
                seconds=r["duration_us"] / 1e6,
                p50_ms=r["p50_us"] / 1000,
                p99_ms=r["p99_us"] / 1000,
                mean_ms=r["mean_us"] / 1000,
                max_ms=r["max_us"] / 1000,
            )
    raise RuntimeError(
        f"wrk gave no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    )
