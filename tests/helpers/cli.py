"""The `authserver` command, run in-process with typer's CliRunner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

from typer.testing import CliRunner, Result

from authserver.cli import app


def cli_env(database_url: str, keys_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "AUTHSERVER_DATABASE_URL": database_url,
        "AUTHSERVER_KEYS_DIR": str(keys_dir),
        "AUTHSERVER_BCRYPT_ROUNDS": "4",
        "AUTHSERVER_LOG_FORMAT": "json",
        **extra,
    }


@contextlib.contextmanager
def restored_logging() -> Iterator[None]:
    """`serve` points the root logger at the stderr CliRunner swaps in, then closes: undo that."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def invoke(env: Mapping[str, str], *args: str, input: str | None = None) -> Result:
    with restored_logging():
        return CliRunner().invoke(app, list(args), env=dict(env), input=input)


async def ainvoke(env: Mapping[str, str], *args: str, input: str | None = None) -> Result:
    """The CLI from async tests: `asyncio.run` needs a thread without a running loop."""
    return await asyncio.to_thread(invoke, env, *args, input=input)


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def _is_log_record(line: str) -> bool:
    with contextlib.suppress(ValueError):
        return isinstance(json.loads(line), dict)
    return False


def assert_operator_error(result: Result, *fragments: str) -> str:
    """Non-zero exit, exactly one line on stderr naming the problem, no traceback.

    `serve` has configured its JSON logging by the time it fails, so the lines it
    logged on the way (keys loaded, ...) may precede the message.
    """
    assert result.exit_code != 0, result.output
    # An unhandled exception would show up here instead of a clean SystemExit.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    lines = [line for line in result.stderr.splitlines() if not _is_log_record(line)]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]
