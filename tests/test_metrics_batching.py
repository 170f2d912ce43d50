"""Metrics counted in the process and written to prometheus-client later (metrics.py).

The batched series must end up exactly where prometheus-client's own `observe` and `inc`
would have put them, and what a request counted must reach the exported series within
the flush interval while the app runs, and at shutdown.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from authserver.config import Settings
from authserver.metrics import (
    FLUSH_INTERVAL,
    HTTP_BUCKETS,
    BatchedCounter,
    BatchedHistogram,
)
from tests.helpers.app import running_app

HTTP_COUNT = "authserver_http_request_duration_seconds_count"
LIVE = {"route": "/health/live", "status": "200"}


def _samples(
    registry: CollectorRegistry, name: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in registry.collect()
        if family.name == name
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_a_batched_histogram_writes_what_observe_would() -> None:
    direct_registry, batched_registry = CollectorRegistry(), CollectorRegistry()
    direct = Histogram(
        "h", "direct", ["route", "status"], buckets=HTTP_BUCKETS, registry=direct_registry
    )
    target = Histogram(
        "h", "batched", ["route", "status"], buckets=HTTP_BUCKETS, registry=batched_registry
    )
    batched = BatchedHistogram(target, HTTP_BUCKETS)
    # Every bound exactly (`le` is inclusive), just above it, zero, and beyond the last.
    amounts = [0.0, 7.5, *HTTP_BUCKETS, *(b * 1.001 for b in HTTP_BUCKETS)]
    for round_ in range(2):  # the second round adds to series already written
        for i, amount in enumerate(amounts):
            labels = ("/a", 200) if i % 3 else ("/b", 404)
            direct.labels(labels[0], str(labels[1])).observe(amount)
            batched.observe(labels, amount)
        batched.flush()
        # The sums differ in the last bit (added in another order), the counts not at all.
        expected = pytest.approx(_samples(direct_registry, "h"), rel=1e-12)
        assert _samples(batched_registry, "h") == expected, round_
    batched.flush()  # nothing pending: nothing changes
    assert _samples(batched_registry, "h") == expected


def test_a_batched_counter_loses_no_increment_across_threads() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "counted", ["grant"], registry=registry)
    batched = BatchedCounter(counter)
    stop = threading.Event()
    per_thread = 20_000

    def count(grant: str) -> None:
        for _ in range(per_thread):
            batched.inc(grant)

    def flush_until_stopped() -> None:
        while not stop.is_set():
            batched.flush()

    flusher = threading.Thread(target=flush_until_stopped)
    flusher.start()
    threads = [threading.Thread(target=count, args=(g,)) for g in ("a", "a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    flusher.join()
    batched.flush()
    assert registry.get_sample_value("c_total", {"grant": "a"}) == 2 * per_thread
    assert registry.get_sample_value("c_total", {"grant": "b"}) == per_thread


def _live_count() -> float:
    return REGISTRY.get_sample_value(HTTP_COUNT, LIVE) or 0.0


async def _until(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "not written within the deadline"
        await asyncio.sleep(0.02)


async def test_a_request_is_exported_within_the_flush_interval_and_at_shutdown(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(metrics_port=9)) as running:
        before = _live_count()
        assert (await running.client.get("/health/live")).status_code == 200
        # Generous: the loop of a busy test machine may run the flush late.
        await _until(lambda: _live_count() == before + 1, within=10 * FLUSH_INTERVAL)
        for _ in range(3):
            assert (await running.client.get("/health/live")).status_code == 200
    # Shutdown wrote what the last interval counted, whenever the timer last ran.
    assert _live_count() == before + 4
