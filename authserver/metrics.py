"""Prometheus metrics: every series the server exports, the HTTP middleware, the listener.

Every name starts with `authserver_`, and every label value comes from a bounded set:
routes are path templates (never raw paths), clients are registered ones (a request
naming an unknown client is refused before anything is counted under its name),
outcomes and grants are fixed words. The domain records its events in one place,
`Auditor.emit` (audit.py); the HTTP layer through `HttpMetrics`.

Several worker processes (`serve --workers N`) each count their own requests. With
metrics on, `serve` points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before any
worker starts (prometheus-client picks its per-process file storage at import), runs
the workers under uvicorn's supervisor even when N is 1, and serves `/metrics` from
that supervising process: a thread that sums the workers' files on every scrape
(`MultiProcessCollector`). One path for every N; the public port never serves it.

Writing those files costs a few µs per value (a lock, a pid check, an mmap write), so
what the request path counts is added up in the worker first (`BatchedCounter`,
`BatchedHistogram`) and written every `FLUSH_INTERVAL` seconds and at shutdown: the
figures at /metrics lag by up to that interval.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from time import perf_counter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger(__name__)

# -- the series ----------------------------------------------------------------

TOKENS_ISSUED = Counter(
    "authserver_tokens_issued_total",
    "Access tokens issued, by grant and (registered) client.",
    ["grant", "client_id"],
)
REFRESH_ROTATIONS = Counter(
    "authserver_refresh_rotations_total", "Refresh tokens exchanged for a successor."
)
REUSE_DETECTIONS = Counter(
    "authserver_refresh_reuse_detections_total",
    "Spent refresh tokens presented again: each revoked its whole family.",
)
LOGINS = Counter(
    "authserver_logins_total",
    "Password logins, by outcome: ok, bad_credentials, throttled.",
    ["outcome"],
)
PASSWORD_HASH_SECONDS = Histogram(
    "authserver_password_hash_seconds",
    "Time one bcrypt hash or check takes in its thread (the dummy check of unknown users too).",
    buckets=(0.001, 0.005, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0),
)
DATABASE_ERRORS = Counter(
    "authserver_database_errors_total",
    "Database operations that failed as unavailable (answered 503 when a request needed them).",
)
SIGNING_KEYS = Gauge(
    "authserver_signing_keys_loaded",
    "Verification keys loaded (the newest signs); the fewest held by any live worker.",
    multiprocess_mode="livemin",
)
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
HTTP_REQUEST_SECONDS = Histogram(
    "authserver_http_request_duration_seconds",
    "HTTP requests by route (path template) and status; _count is the number of requests.",
    ["route", "status"],
    buckets=HTTP_BUCKETS,
)
UNMATCHED_ROUTE = "unmatched"


# -- counting in the process, writing once a second -----------------------------

# How often a worker writes what it counted into prometheus-client's series: what
# /metrics shows lags by up to this much (the listener runs in another process).
FLUSH_INTERVAL = 1.0


class BatchedCounter:
    """Increments of `counter`, added up in this process and written to it by `flush`.

    In multiprocess mode prometheus-client writes every `inc` into an mmap'd file under a
    lock (after checking the pid), and `labels()` checks its arguments every time: a few
    µs, which each token issued and each refresh paid. Here an increment is a dict update
    under a lock; any thread may count (the password grant signs in a worker thread).
    """

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, ...], int] = {}
        self._children: dict[tuple[str, ...], Counter] = {}

    def inc(self, *labels: str) -> None:
        with self._lock:
            self._pending[labels] = self._pending.get(labels, 0) + 1

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for labels, n in pending.items():
            child = self._children.get(labels)
            if child is None:
                child = self._counter.labels(*labels) if labels else self._counter
                self._children[labels] = child
            child.inc(n)


class BatchedHistogram:
    """Observations of `histogram`, counted per bucket in this process and written by `flush`.

    One event loop's own (no lock): `HttpMetrics` observes on its loop and flushes there.
    The keys are the label values, str() taken only when a series is first written.
    """

    def __init__(self, histogram: Histogram, buckets: Sequence[float]) -> None:
        self._histogram = histogram
        # prometheus-client's bounds: `le` is inclusive, and +Inf takes the rest.
        self.bounds = (*(float(b) for b in buckets), math.inf)
        self._pending: dict[tuple[object, ...], list[float]] = {}
        self._children: dict[tuple[object, ...], Histogram] = {}

    def observe(self, labels: tuple[object, ...], amount: float) -> None:
        tally = self._pending.get(labels)
        if tally is None:
            # A count per bucket, then the sum.
            tally = self._pending[labels] = [0.0] * (len(self.bounds) + 1)
        tally[bisect.bisect_left(self.bounds, amount)] += 1
        tally[-1] += amount

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for labels, tally in pending.items():
            child = self._children.get(labels)
            if child is None:
                child = self._histogram.labels(*map(str, labels))
                self._children[labels] = child
            # No public call adds several observations at once; these are the values
            # `observe` itself increments, one per bucket (non-cumulative) and the sum.
            # tests/test_metrics_batching.py checks the result against `observe`.
            for value, n in zip(child._buckets, tally, strict=False):
                if n:
                    value.inc(n)
            child._sum.inc(tally[-1])


# The counters the request path increments (audit.py, grants.py). The others are
# written directly: a bcrypt hash costs milliseconds, a database error is rare.
TOKENS_ISSUED_BATCH = BatchedCounter(TOKENS_ISSUED)
REFRESH_ROTATIONS_BATCH = BatchedCounter(REFRESH_ROTATIONS)
REUSE_DETECTIONS_BATCH = BatchedCounter(REUSE_DETECTIONS)
LOGINS_BATCH = BatchedCounter(LOGINS)
_BATCHED = (TOKENS_ISSUED_BATCH, REFRESH_ROTATIONS_BATCH, REUSE_DETECTIONS_BATCH, LOGINS_BATCH)


def flush_counters() -> None:
    """Write every batched counter's pending increments into prometheus-client."""
    for batched in _BATCHED:
        batched.flush()


# -- HTTP ------------------------------------------------------------------------


class HttpMetrics:
    """Times every HTTP request and counts it under its route's path template and status.

    Pure ASGI (not `BaseHTTPMiddleware`): it wraps `send` to see the status and reads
    the route the router put in the scope, so a request costs two timer reads and a
    bucket count in a dict (`BatchedHistogram`). A path no route matches counts as
    `unmatched`. Through the app's lifespan it runs a task that writes the counts into
    prometheus-client every `FLUSH_INTERVAL` seconds, with the `BatchedCounter`s, and
    once more at shutdown.

    Not prometheus-fastapi-instrumentator or starlette-exporter: both match the route a
    second time and build Request objects for every request. On a small FastAPI app they
    added 30-190 µs of CPU per request. This added about 3.3 µs around a bare ASGI app
    while it observed prometheus-client's histogram per request (multiprocess mode), and
    1.3 µs batched; inside the app, on /protected, about 8 µs then and 3 µs now.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests = BatchedHistogram(HTTP_REQUEST_SECONDS, HTTP_BUCKETS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = perf_counter() - start
            path = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            self.requests.observe((path, status), elapsed)

    def flush(self) -> None:
        """Write what this process counted into prometheus-client's series."""
        self.requests.flush()
        flush_counters()

    async def _flush_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.flush()
            except Exception:
                log.exception("metrics not written")

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        flusher: asyncio.Task[None] | None = None

        async def send_and_flush(message: Message) -> None:
            nonlocal flusher
            if message["type"] == "lifespan.startup.complete":
                flusher = asyncio.create_task(self._flush_every(FLUSH_INTERVAL))
            elif message["type"].startswith("lifespan.shutdown") and flusher is not None:
                # Before the server hears that shutdown is done, and the process exits.
                flusher.cancel()
                self.flush()
            await send(message)

        try:
            await self.app(scope, receive, send_and_flush)
        finally:
            if flusher is not None:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher


# -- the listener ----------------------------------------------------------------

_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w+_(\d+)\.db$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkersCollector(Collector):
    """The sum over every worker's files in `directory`; a dead worker's live gauges dropped.

    uvicorn's supervisor replaces a worker that dies without telling anyone, so each
    scrape first marks dead every process whose live-gauge file outlived it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._workers = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        for name in os.listdir(self.directory):
            match = _LIVE_GAUGE_FILE.match(name)
            if match and not _alive(int(match.group(1))):
                mark_process_dead(int(match.group(1)), str(self.directory))  # type: ignore[no-untyped-call]
        metrics: Iterable[Metric] = self._workers.collect()  # type: ignore[no-untyped-call]
        return metrics


@contextlib.contextmanager
def exported(*, host: str, port: int) -> Iterator[Path]:
    """Serve the workers' metrics at http://HOST:PORT/metrics until the block ends.

    Makes the fresh multiprocess directory and sets `PROMETHEUS_MULTIPROC_DIR` for the
    worker processes started inside the block (they inherit the environment); removes
    the directory afterwards. Raises OSError if the port cannot be bound.
    """
    with tempfile.TemporaryDirectory(prefix="authserver-metrics-") as name:
        directory = Path(name)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkersCollector(directory))
        server, thread = start_http_server(port, addr=host, registry=registry)
        previous = os.environ.get(MULTIPROC_ENV)
        os.environ[MULTIPROC_ENV] = name
        try:
            yield directory
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            if previous is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = previous
