"""uvicorn as `authserver serve` runs it: slow clients cannot hold connections open.

uvicorn closes a connection that stays idle *between* requests
(`timeout_keep_alive`), but sets no limit on how long a client may take to send
a request's headers: a client that trickles one byte every few seconds
(slowloris) holds its connection, and a socket, for ever. `HeaderTimeoutProtocol`
is uvicorn's own httptools protocol with that one timer added: from the moment
a connection opens, or a new request on it begins, the request (its headers and
its body, which here is small) must be complete within `header_timeout`
seconds, or the connection is closed. The number of
connections a process serves at once is bounded by uvicorn's
`limit_concurrency` (beyond it, a request is answered 503 at once).

With metrics on, the workers (even one) run under uvicorn's supervisor, which
serves the metrics listener (see `authserver.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import resource
import socket
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from authserver import metrics as prometheus


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that closes a connection whose request headers come too slowly."""

    header_timeout: float = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_message_complete(self) -> None:
        # Headers and body both: a body trickled in byte by byte holds a connection as well.
        self._disarm_header_timer()
        super().on_message_complete()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def set_header_timeout(seconds: float) -> None:
    """Set the timeout for this process's connections. Each worker process calls it (from
    `app_factory`): uvicorn hands its workers the protocol class, not an instance."""
    HeaderTimeoutProtocol.header_timeout = seconds


# The young generation's threshold: collected every this many allocations (net of
# frees) instead of Python's 700. What a young collection walks is what is alive
# then, about the requests in flight, so a thirtyfold rarer one costs about as much
# and the collector's share of a request falls with it.
YOUNG_GC_THRESHOLD = 20_000


def settle_heap() -> None:
    """Tune this server process's garbage collector, once it has started.

    Everything alive after startup (modules, classes, functions, the services)
    lives as long as the process, yet each full collection walked all of it:
    ~150k objects, ~150 ms on a 2-core machine, a stall of every request in
    flight (DPoP /protected's p99 went from ~170 ms to ~28 ms without them).
    `gc.freeze` moves it to the permanent generation, which collections skip;
    what the server allocates later is still collected. No collection first: one
    would cost startup ~150 ms to free the little garbage startup leaves.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, old)


def _allow_open_files(wanted: int) -> None:
    """Raise this process's soft limit on open files towards `wanted` (never above the hard
    limit): each connection is a file, and 1024, a common default, is less than the bound."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@dataclass(frozen=True, slots=True)
class MetricsListener:
    host: str
    port: int


class MetricsListenerError(Exception):
    """The metrics listener could not start; the message says where."""


class PortInUse(Exception):
    """The address to listen on is taken; the message names it and the option to change."""


def check_port(host: str, port: int) -> None:
    """Bind and release the address as uvicorn will (SO_REUSEADDR), so that a busy port is
    one line naming it, rather than uvicorn's error after the whole start-up."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"cannot listen on {host}: {exc.strerror}; check --host") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {port} on {host} is already in use: stop what listens there, "
                    "or choose another port with --port"
                ) from exc
            raise PortInUse(
                f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --port"
            ) from exc


def run(
    *,
    host: str,
    port: int,
    workers: int,
    max_connections: int,
    metrics: MetricsListener | None = None,
) -> None:
    """Serve `authserver.app:app_factory` until stopped (blocking)."""
    _allow_open_files(max_connections + 256)  # the connections, and the files of the process
    options: dict[str, Any] = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        "http": HeaderTimeoutProtocol,
        "limit_concurrency": max_connections,
        "proxy_headers": False,  # AUTHSERVER_TRUSTED_PROXIES decides, in the app
        "server_header": False,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
    if metrics is None:
        uvicorn.run("authserver.app:app_factory", **options)
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(prometheus.exported(host=metrics.host, port=metrics.port))
        except OSError as exc:
            where = f"{metrics.host}:{metrics.port}"
            raise MetricsListenerError(
                f"cannot serve metrics on {where}: {exc.strerror or exc}"
            ) from exc
        # What `uvicorn.run` does for several workers, for one as well: the workers
        # start after the multiprocess directory is set, and this process sums them.
        config = uvicorn.Config("authserver.app:app_factory", **options)
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        raise SystemExit(STARTUP_FAILURE)
