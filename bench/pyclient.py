"""The load generator used when `wrk` is not installed: asyncio over raw sockets.

Connections are spread over a few processes (each with its own event loop)
and speak HTTP/1.1 keep-alive directly, which costs far less CPU per request
than a general-purpose client would, so the load generator steals less of the
machine from the server it measures.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import multiprocessing
import re
import statistics
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from bench.load import Load, LoadResult

_REFRESH_TOKEN = re.compile(rb'"refresh_token":"([^"]+)"')
_MAX_PROCESSES = 2


def _request(method: str, host: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, close = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    body = await reader.readexactly(length) if length else b""
    return status, body, close


class _Worker:
    """One process's share of the connections."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        url = urlsplit(spec["base_url"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.hostport = f"{self.host}:{self.port}"
        self.latencies: list[float] = []
        self.requests = 0
        self.errors = 0
        self.queue: collections.deque[str] = collections.deque(spec["tokens"])
        self.position = spec["offset"]
        self.proofs = spec["proofs"]
        self.proof = 0

    def next_request(self) -> bytes:
        spec, kind = self.spec, self.spec["kind"]
        headers = dict(spec["headers"])
        if self.proofs:
            # RFC 9449: a fresh proof per request (out of them: replays, refused).
            headers["DPoP"] = self.proofs[self.proof % len(self.proofs)]
            self.proof += 1
        if kind == "dpop":
            headers["Authorization"] = f"DPoP {spec['tokens'][0]}"
            return _request("GET", self.hostport, spec["path"], headers, b"")
        if kind == "tokens":
            tokens = spec["tokens"]
            self.position = (self.position + 1) % len(tokens)
            headers["Authorization"] = f"Bearer {tokens[self.position]}"
            return _request("GET", self.hostport, spec["path"], headers, b"")
        if kind in ("post", "refresh"):
            headers.setdefault("Content-Type", "application/json")
            body = spec["body"]
            if kind == "refresh":
                # Taken off the queue for good: an answer puts the successor back.
                family = self.queue.popleft() if self.queue else "no-family-left"
                body = json.dumps({"refresh_token": family})
            return _request("POST", self.hostport, spec["path"], headers, body.encode())
        return _request("GET", self.hostport, spec["path"], headers, b"")

    async def connection(self, deadline: float) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        timeout = self.spec["timeout"]
        while time.time() < deadline:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                except OSError:
                    self.errors += 1
                    await asyncio.sleep(0.05)
                    continue
            assert reader is not None
            payload = self.next_request()
            began = time.perf_counter()
            try:
                writer.write(payload)
                status, body, close = await asyncio.wait_for(_read_response(reader), timeout)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                if time.time() < deadline:
                    self.errors += 1
                writer.close()
                writer = None
                continue
            if time.time() > deadline:
                break  # answered after the end: not counted, as wrk does
            self.latencies.append(time.perf_counter() - began)
            self.requests += 1
            good = status == self.spec["expect"]
            if self.spec["kind"] == "refresh":
                found = _REFRESH_TOKEN.search(body) if good else None
                if found:
                    self.queue.append(found.group(1).decode())
                else:
                    good = False
            expected = self.spec["expect_body"]
            if expected and expected.encode() not in body:
                good = False
            if not good:
                self.errors += 1
            if close:
                writer.close()
                writer = None
            if self.spec["delay_ms"]:
                await asyncio.sleep(self.spec["delay_ms"] / 1000)
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def run(self) -> dict[str, Any]:
        start, deadline = self.spec["start"], self.spec["start"] + self.spec["duration"]
        await asyncio.sleep(max(0.0, start - time.time()))
        await asyncio.gather(*(self.connection(deadline) for _ in range(self.spec["connections"])))
        return {"requests": self.requests, "errors": self.errors, "latencies": self.latencies}


def _work(spec: dict[str, Any]) -> dict[str, Any]:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_Worker(spec).run())


def _share(items: list[str], index: int, count: int) -> list[str]:
    return items[index::count]


def run_python(base_url: str, load: Load) -> LoadResult:
    connections = 1 if load.kind == "probe" else load.connections
    processes = max(1, min(_MAX_PROCESSES, load.threads, connections))
    start = time.time() + 0.5  # processes start, then all begin together
    specs = []
    for index in range(processes):
        specs.append(
            {
                "base_url": base_url,
                "kind": load.kind,
                "path": load.path,
                "headers": dict(load.headers),
                "body": load.body,
                "tokens": (
                    list(load.tokens)
                    if load.kind == "dpop"
                    else _share(list(load.tokens), index, processes)
                ),
                "proofs": _share(list(load.proofs), index, processes),
                "offset": load.offset // processes,
                "delay_ms": load.delay_ms if load.kind == "probe" else 0.0,
                "timeout": load.timeout,
                "expect": 200,
                "expect_body": load.expect_body,
                "connections": len(range(index, connections, processes)),
                "start": start,
                "duration": load.duration,
            }
        )
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_work, specs)
    latencies: list[float] = sorted(x for part in parts for x in part["latencies"])
    requests = sum(part["requests"] for part in parts)
    errors = sum(part["errors"] for part in parts)

    def pct(q: float) -> float:
        if not latencies:
            return 0.0
        return float(latencies[min(len(latencies) - 1, int(q * len(latencies)))]) * 1000

    return LoadResult(
        requests=requests,
        errors=errors,
        seconds=load.duration,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        mean_ms=statistics.fmean(latencies) * 1000 if latencies else 0.0,
        max_ms=latencies[-1] * 1000 if latencies else 0.0,
    )
