"""Reading a Prometheus exposition (a server's /metrics) in tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from authserver.metrics import FLUSH_INTERVAL

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample at `url`, by name and labels."""
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 if it is absent (a counter no one has counted yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_until(url: str, condition: Callable[[Samples], bool], within: float = 15.0) -> Samples:
    """Scrape `url` until `condition` holds, or `within` seconds pass: the last scrape.

    The workers write what they counted every `FLUSH_INTERVAL` (metrics.py), so a count
    shows up to that late. The caller asserts on what this returns, so a count that never
    comes fails there, with the values in the message.
    """
    deadline = time.monotonic() + within
    while True:
        samples = scrape(url)
        if condition(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(FLUSH_INTERVAL / 10)
