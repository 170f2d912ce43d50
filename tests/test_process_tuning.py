"""What a server process sets up for itself: its garbage collector, and FastAPI's
OpenTelemetry, off unless asked for."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest
from asgi_lifespan import LifespanManager

from authserver.app import create_app
from authserver.config import Settings
from authserver.serving import YOUNG_GC_THRESHOLD, settle_heap
from tests.helpers.databases import SQLITE_ONLY


@pytest.fixture
def collector() -> Iterator[None]:
    """The test process's collector as it was, whatever the test did to it."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("collector")
def test_settle_heap_freezes_what_is_alive_and_collects_the_young_less_often() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    _, middle, old = gc.get_threshold()
    settle_heap()
    # Everything alive now (this module included) is skipped by every later collection.
    assert gc.get_freeze_count() > 1000
    assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, middle, old)
    frozen = gc.get_freeze_count()
    later: list[list[int]] = [
        [] for _ in range(100)
    ]  # what is allocated afterwards is still the collector's
    assert all(gc.is_tracked(item) for item in later)
    assert gc.get_freeze_count() == frozen


@SQLITE_ONLY
async def test_the_lifespan_calls_started_once_the_services_are_open(
    make_settings: Callable[..., Settings],
) -> None:
    seen: list[bool] = []
    app = create_app(make_settings(), started=lambda: seen.append(hasattr(app.state, "services")))
    assert seen == []
    async with LifespanManager(app, startup_timeout=60):
        assert seen == [True]
    assert seen == [True]


@SQLITE_ONLY
@pytest.mark.parametrize("on", [False, True])
async def test_fastapi_opentelemetry_only_when_asked_for(
    make_settings: Callable[..., Settings], on: bool
) -> None:
    app = create_app(make_settings(opentelemetry=on))
    config = app._telemetry  # FastAPI's own configuration: no public reader
    assert (config["tracing"], config["metrics"], config["logs"]) == (on, on, on)


def test_opentelemetry_setting_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHSERVER_OPENTELEMETRY", "true")
    assert Settings().opentelemetry is True
    monkeypatch.setenv("AUTHSERVER_OPENTELEMETRY", "false")
    assert Settings().opentelemetry is False
