"""`python -m bench` runs end to end (a smoke test: the figures themselves are not judged).

`--quick` mode with shorter runs still. Marked `bench`: the suite deselects them
(they load the machine for minutes, which is the benchmark's business, not the suite's),
and CI runs them as a step of their own (`pytest -m bench`). This is the only place CI
runs the benchmark (`.ci/run` installs the `bench` extra first, so the chart is drawn
and checked too). Each test starts real server processes and a real load generator.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SHORT = ["--quick", "--rounds", "1", "--duration", "1", "--startup-runs", "1"]


def run_bench(out: Path, *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSERVER_")}
    postgres = os.environ.get("AUTHSERVER_TEST_POSTGRES_URL", "")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            *SHORT,
            "--out",
            str(out),
            "--postgres-url",
            postgres,
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=360,  # every section, the two DPoP ones included
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    if importlib.util.find_spec("matplotlib") is not None:  # the `bench` extra
        assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    return results


@pytest.mark.slow
@pytest.mark.bench
def test_every_section_is_measured(tmp_path: Path) -> None:
    results = run_bench(tmp_path, "--memory-refreshes", "300", "--fresh-tokens", "1500")

    assert results["meta"]["mode"] == "quick"
    assert results["startup"]["median_s"] > 0
    protected = results["protected"]
    assert protected["errors"] == 0
    assert set(protected["rps"]) == {"bare", "reused", "fresh"}
    assert all(v > 0 for v in protected["cpu_us_per_request"].values())
    assert results["login"]["login_per_s"] > 0
    assert results["login"]["bound_per_s"] > 0
    assert results["refresh"]["sqlite"]["errors"] == 0
    assert results["refresh"]["sqlite"]["refresh_per_s"] > 0
    dpop = results["dpop-protected"]
    assert dpop["errors"] == 0  # no proof refused: each sent once, within its window
    assert set(dpop["rps"]) == {"bare", "bearer", "dpop"}
    assert dpop["dpop_cpu_us"] > 0
    assert results["dpop-refresh"]["errors"] == 0
    assert results["dpop-refresh"]["refresh_per_s"] > 0
    assert results["memory"]["refreshes"] >= 300
    assert results["memory"]["errors"] == 0
    assert results["purge"]["ok"] is True
    for backend in (
        ("sqlite", "postgresql") if os.environ.get("AUTHSERVER_TEST_POSTGRES_URL") else ("sqlite",)
    ):
        clients = results["clients"][backend]
        assert clients["errors"] == {"client_credentials": 0, "introspect": 0}, clients
        assert clients["peer_errors"] == 0
        assert all(v > 0 for v in clients["rps"].values())
    if os.environ.get("AUTHSERVER_TEST_POSTGRES_URL"):
        assert results["refresh"]["postgresql"]["errors"] == 0
        assert set(results["scaling"]["refresh_per_s"]) == {"1", "2", "4"}
        assert results["scaling"]["errors"] == 0
    else:
        assert "skipped" in results["refresh"]["postgresql"]
    names = {t["name"] for t in results["targets"]}
    assert any("/protected" in n for n in names) and any("RSS" in n for n in names)


@pytest.mark.slow
@pytest.mark.bench
def test_python_client_rotates_families_without_errors(tmp_path: Path) -> None:
    """The load generator used where wrk is not installed."""
    results = run_bench(tmp_path, "--client", "python", "--only", "refresh", "--postgres-url", "")

    assert results["meta"]["client"] == "python"
    sqlite = results["refresh"]["sqlite"]
    assert sqlite["refresh_per_s"] > 0
    assert sqlite["errors"] == 0
