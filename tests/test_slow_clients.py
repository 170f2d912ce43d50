"""Slow clients (slowloris) cannot hold a server's connections: real server processes.

uvicorn alone never times out a request whose headers trickle in; `serving.py`
closes such a connection after AUTHSERVER_HEADER_TIMEOUT, and bounds the
connections a process serves at once (AUTHSERVER_MAX_CONNECTIONS).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.procs import ServerPool, ServerProcess, base_env

pytestmark = pytest.mark.slow
HEADER_TIMEOUT = 1.0


def sqlite_env(tmp_path: Path, keys_dir: Path, **extra: str) -> dict[str, str]:
    return base_env(
        AUTHSERVER_DATABASE_URL=f"sqlite:///{tmp_path / 'slow.db'}",
        AUTHSERVER_KEYS_DIR=str(keys_dir),
        AUTHSERVER_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        **extra,
    )


@contextlib.contextmanager
def connections(
    server: ServerProcess, count: int, first_bytes: bytes
) -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if first_bytes:
                sock.sendall(first_bytes)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within `within` seconds (reading, and
    dropping, whatever it still sends before that)."""
    deadline = time.monotonic() + within
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if sock.recv(65536) == b"":
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


def seconds_until_closed(sock: socket.socket, pieces: list[bytes]) -> float:
    """Send `pieces` one every 0.2 s or so; how long until the server closed the
    connection (it must, before they run out)."""
    started = time.monotonic()
    for piece in pieces:
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
        if closed_by_server(sock, 0.2):
            return time.monotonic() - started
    raise AssertionError("the server kept a trickling connection open")


def test_a_thousand_idle_or_half_sent_connections_leave_health_answering(
    tmp_path: Path, keys_dir: Path
) -> None:
    with ServerPool(tmp_path) as pool:
        server = pool.start(sqlite_env(tmp_path, keys_dir))
        half_sent = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "
        with (
            connections(server, 500, b"") as idle,
            connections(server, 500, half_sent) as slow,
        ):
            started = time.monotonic()
            r = httpx.get(f"{server.url}/health", timeout=10)
            answered = time.monotonic() - started
            assert r.status_code == 200, r.text
            # Answered while all thousand were still open (they close after the timeout).
            assert answered < HEADER_TIMEOUT, answered
            # Then the server closes every one of them.
            assert all(closed_by_server(s, HEADER_TIMEOUT + 5) for s in idle[:20] + slow[:20])
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_headers_trickled_in_byte_by_byte_do_not_keep_a_connection(
    tmp_path: Path, keys_dir: Path
) -> None:
    with ServerPool(tmp_path) as pool:
        server = pool.start(sqlite_env(tmp_path, keys_dir))
        with connections(server, 1, b"G") as (sock,):
            trickled = b"ET /health HTTP/1.1\r\nHost: x\r\n" * 20
            assert seconds_until_closed(sock, [bytes([b]) for b in trickled]) < HEADER_TIMEOUT + 3
        # A keep-alive connection gets the same timer for its next request.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" in sock.recv(4096)
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            assert closed_by_server(sock, HEADER_TIMEOUT + 5)


def test_connections_beyond_the_bound_are_answered_503(tmp_path: Path, keys_dir: Path) -> None:
    with ServerPool(tmp_path) as pool:
        server = pool.start(sqlite_env(tmp_path, keys_dir, AUTHSERVER_MAX_CONNECTIONS="20"))
        with connections(server, 25, b""):
            r = httpx.get(f"{server.url}/health", timeout=10)
            assert r.status_code == 503
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_a_body_trickled_in_does_not_keep_a_connection(tmp_path: Path, keys_dir: Path) -> None:
    with ServerPool(tmp_path) as pool:
        server = pool.start(sqlite_env(tmp_path, keys_dir))
        head = (
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        with connections(server, 1, head) as (sock,):
            assert seconds_until_closed(sock, [b" "] * 40) < HEADER_TIMEOUT + 3
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
