"""Real server processes on 127.0.0.1, and what /proc says about them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parent.parent
# What every authserver of a run is configured with, and the peers sign: set, not left
# to authserver's defaults, so both sides agree by construction.
AUDIENCE = "authserver"
SCOPE = "read write"
ACCESS_TOKEN_TTL = 900
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_env(**extra: str) -> dict[str, str]:
    """The caller's environment minus its AUTHSERVER_* variables, plus `extra`.

    Dropping AUTHSERVER_* keeps a developer's own configuration out of the runs.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSERVER_")}
    env.update(
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    )
    env.update(extra)
    return env


def server_env(*, database_url: str, keys_dir: Path, port: int, **extra: str) -> dict[str, str]:
    """An authserver's environment: its database, keys and issuer, plus `extra`."""
    return base_env(
        AUTHSERVER_DATABASE_URL=database_url,
        AUTHSERVER_KEYS_DIR=str(keys_dir),
        AUTHSERVER_ISSUER=f"http://127.0.0.1:{port}",
        AUTHSERVER_AUDIENCE=AUDIENCE,
        AUTHSERVER_SCOPES=SCOPE,
        AUTHSERVER_ACCESS_TOKEN_TTL=str(ACCESS_TOKEN_TTL),
        AUTHSERVER_LOG_FORMAT="json",
        **extra,
    )


def authserver_command() -> list[str]:
    """The installed `authserver` script beside this interpreter, else `python -m authserver`."""
    script = Path(sys.executable).parent / "authserver"
    return [str(script)] if script.exists() else [sys.executable, "-m", "authserver"]


def authserver_serve_command(port: int, workers: int = 1) -> list[str]:
    """authserver exactly as operators run it: the same factory, middleware and uvicorn flags."""
    return [*authserver_command(), "serve", "--port", str(port), "--workers", str(workers)]


def peer_command(module: str, port: int) -> list[str]:
    """A baseline app of bench/peers, served as authserver serves with one worker.

    uvloop and httptools are named rather than left to uvicorn's "auto", so a peer
    cannot silently run on the slower pure-Python pieces.
    """
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        f"bench.peers.{module}:app_factory",
        "--app-dir",
        str(REPO_ROOT),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--no-server-header",
        "--no-proxy-headers",
        "--log-level",
        "warning",
    ]


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/PID/stat (0 if it is gone)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0
    # The command name may hold spaces; fields resume after its closing parenthesis.
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_rss_bytes(pid: int) -> int:
    try:
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0
    return int(statm[1]) * _PAGE


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, by walking the ppid links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        ppid = int(data[data.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Server:
    """One server process (and its uvicorn workers), stopped by `stop()`."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started_at: float
    _log: IO[bytes] = field(repr=False)
    _pids: list[int] = field(default_factory=list)

    @classmethod
    def start(
        cls, name: str, command: Sequence[str], env: Mapping[str, str], *, cwd: Path, port: int
    ) -> Server:
        cwd.mkdir(parents=True, exist_ok=True)
        log_path = cwd / f"{name}.log"
        log = open(log_path, "ab")  # closed by stop()
        started = time.monotonic()
        proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return cls(name, proc, port, log_path, started, log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 60.0, interval: float = 0.05) -> float:
        """Seconds from start until /health answered 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(OSError):
                status, _ = http_get(self.url + "/health", timeout=1.0)
                if status == 200:
                    return time.monotonic() - self.started_at
            time.sleep(interval)
        raise RuntimeError(f"{self.name} did not become healthy in {timeout:.0f}s:\n{self.tail()}")

    def pids(self) -> list[int]:
        # Worker processes are stable for a run; look them up once.
        if not self._pids or len(self._pids) == 1:
            self._pids = descendants(self.proc.pid)
        return self._pids

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid in self.pids())

    def rss_bytes(self) -> int:
        """Resident memory of the serving process(es): the workers, not a supervisor."""
        pids = self.pids()
        workers = pids[1:] if len(pids) > 1 else pids
        return sum(proc_rss_bytes(pid) for pid in workers)

    def runs_on(self) -> dict[str, bool]:
        """Whether the serving process runs on uvloop and httptools (their .so are mapped)."""
        try:
            maps = Path(f"/proc/{self.pids()[-1]}/maps").read_text()
        except OSError:
            return {}
        return {"uvloop": "uvloop" in maps, "httptools": "httptools" in maps}

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_lines(self) -> int:
        try:
            with open(self.log_path, "rb") as f:
                return sum(1 for _ in f)
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()
