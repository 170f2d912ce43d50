"""Real server processes for tests: `python -m authserver serve` on free ports.

Each process gets exactly the environment a test gives it (plus PATH and the
like, never the caller's own `AUTHSERVER_*`), runs in its own directory so no
`.env` file leaks in, and writes its stderr to a file the test can read and
show when something fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_env(**overrides: str) -> dict[str, str]:
    """The caller's environment without its AUTHSERVER_* variables, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSERVER_")}
    env.update(
        AUTHSERVER_BCRYPT_ROUNDS="4",
        AUTHSERVER_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


def run_cli(
    args: Sequence[str], env: Mapping[str, str], *, cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m authserver ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "authserver", *args],
        env=dict(env),
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass
class ServerProcess:
    """One running `authserver serve` (with its uvicorn workers, if any)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    log_file: IO[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the process wrote to stderr (and stdout) so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/health").status_code == 200:
                        return
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} not healthy after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> int:
        """SIGTERM (uvicorn shuts down gracefully and stops its workers), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # The process leads its own group: this reaches its workers, nothing else.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        self.log_file.close()
        return self.proc.returncode


class ServerPool:
    """Starts servers for one test and stops every one of them at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[ServerProcess] = []

    def spawn(
        self,
        env: Mapping[str, str],
        *,
        name: str | None = None,
        workers: int = 1,
        args: Sequence[str] = (),
        port: int | None = None,
    ) -> ServerProcess:
        """Start a server without waiting for it (start several, then `wait_healthy`);
        `args` are more options of `serve`, `port` when its issuer must name it."""
        name = name or f"server{len(self.servers)}"
        port = port or free_port()
        log_path = self.workdir / f"{name}.log"
        log_file = open(log_path, "wb")  # closed by ServerProcess.stop
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "authserver",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
                *args,
            ],
            env=dict(env),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = ServerProcess(name, proc, port, log_path, log_file)
        self.servers.append(server)
        return server

    def start(
        self,
        env: Mapping[str, str],
        *,
        name: str | None = None,
        workers: int = 1,
        args: Sequence[str] = (),
    ) -> ServerProcess:
        server = self.spawn(env, name=name, workers=workers, args=args)
        server.wait_healthy()
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def server_errors(log: str) -> list[str]:
    """Log lines that show a server-side failure: tracebacks, unhandled errors, locks."""
    markers = ("Traceback", "unhandled error", "database is locked", '"level": "ERROR"')
    return [line for line in log.splitlines() if any(m in line for m in markers)]
