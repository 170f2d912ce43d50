"""What a peer is told by the benchmark, through its environment."""

from __future__ import annotations

import os
from pathlib import Path

PREFIX = "BENCH_PEER_"


def peer_env(
    *, keys_dir: Path, issuer: str, audience: str, scope: str, ttl: int, subject: str
) -> dict[str, str]:
    """The variables the sign-only peer reads (the bare peer needs only `subject`)."""
    return {
        f"{PREFIX}KEYS_DIR": str(keys_dir),
        f"{PREFIX}ISSUER": issuer,
        f"{PREFIX}AUDIENCE": audience,
        f"{PREFIX}SCOPE": scope,
        f"{PREFIX}TTL": str(ttl),
        f"{PREFIX}SUBJECT": subject,
    }


def setting(name: str) -> str:
    value = os.environ.get(PREFIX + name)
    if value is None:
        raise RuntimeError(f"{PREFIX}{name} is not set: peers are started by `python -m bench`")
    return value
