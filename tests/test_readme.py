"""The README is a promise: every command in it that a reader is meant to run runs here.

The rules (the README's opening HTML comment says the same, for its writers):

- A ```sh block is run; any other fence (```text, ```python, ```json, bare) is not.
- Blocks run in the order they appear, each in its own `bash -eo pipefail` (so a failing
  command fails the block), from a scratch directory that stands for the repository
  root (`.venv` and `examples/` link to the real ones; `./authserver.db`, `./keys` and the
  `*.json` files the walk-through keeps are its own). Values pass from block to block
  in files, never in shell variables.
- The quickstart's state comes first: `.venv/bin/authserver serve --demo` runs there,
  as the quickstart says. The two quickstart blocks themselves are not run here: CI
  runs them (.ci/run). `127.0.0.1:8000` in a block means that server (the test rewrites it
  to a free port, and sets AUTHSERVER_ISSUER to match), `127.0.0.1:9000` another free
  port for the resource-server example; so the test runs beside other servers, under
  pytest-xdist, while bcrypt hashes at cost 4.
- `# -> TEXT` is a documented output: some line of the block's output (stdout and stderr
  together) must be TEXT, where `...` stands for any run of characters; several
  `# ->` lines must match in their order. A status code is shown with curl's
  `-w '%{http_code}'` (or `-i`), so that it can be checked.
- A ```python block ending in `asyncio.run(main())` is a complete program: it runs at
  its place in the order with `.venv/bin/python`, and must exit 0 (its `# ->` lines
  are checked as for a shell block).
- A block that cannot run here is listed in SKIPPED with the reason. Keep it tiny.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from authserver import audit
from tests.helpers.procs import ServerProcess, base_env, free_port, server_errors

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
QUICKSTART = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/authserver serve --demo",
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest -n 3",
)
# A fragment of each block not run here, and why.
SKIPPED: dict[str, str] = {}
BLOCK_TIMEOUT = 60
_FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```", re.M | re.S)


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    line: int
    text: str

    @property
    def expected(self) -> list[str]:
        return [
            line.strip()[len("# -> ") :]
            for line in self.text.splitlines()
            if line.strip().startswith("# -> ")
        ]

    @property
    def runnable(self) -> bool:
        if self.lang == "sh":
            return True
        return self.lang == "python" and self.text.rstrip().endswith("asyncio.run(main())")


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    return [
        Block(m[2], text.count("\n", 0, m.start()) + 1, textwrap.dedent(m[3]))
        for m in _FENCE.finditer(text)
    ]


def _matches(pattern: str, line: str) -> bool:
    regex = ".*".join(re.escape(part) for part in pattern.split("..."))
    return re.fullmatch(regex, line.strip()) is not None


def assert_documented_output(block: Block, output: str) -> None:
    lines = output.splitlines()
    at = 0
    for pattern in block.expected:
        found = next((i for i in range(at, len(lines)) if _matches(pattern, lines[i])), None)
        assert found is not None, (
            f"README.md line {block.line}: no output line matches `# -> {pattern}`"
            f" (in order); the block printed:\n{output}"
        )
        at = found + 1


@contextlib.contextmanager
def demo_server(workdir: Path, env: dict[str, str], port: int) -> Iterator[ServerProcess]:
    """The quickstart's server, as the quickstart starts it, on `port`."""
    log_path = workdir.parent / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [".venv/bin/authserver", "serve", "--demo", "--port", str(port)],
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = ServerProcess("readme", proc, port, log_path, log_file)
        try:
            server.wait_healthy()
            yield server
        finally:
            server.stop()


def _at(block: Block, ports: dict[str, str]) -> Block:
    """The block as it runs here: the documented addresses replaced by the test's."""
    text = block.text
    for documented, actual in ports.items():
        text = text.replace(documented, actual)
    return dataclasses.replace(block, text=text)


def _run(block: Block, workdir: Path, env: dict[str, str]) -> str:
    text = block.text
    if block.lang == "sh":
        args = ["bash", "-eo", "pipefail", "-c", text]
    else:
        args = [".venv/bin/python", "-c", text]
    proc = subprocess.Popen(
        args,
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: whatever it leaves running is stopped below
    )
    try:
        output, _ = proc.communicate(timeout=BLOCK_TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    assert proc.returncode == 0, (
        f"README.md line {block.line}: the block exited with {proc.returncode}:\n"
        f"{block.text}\n--- output ---\n{output}"
    )
    return output


def test_readme_quickstart_is_what_ci_runs() -> None:
    blocks = [b.text.strip() for b in readme_blocks() if b.lang == "sh"]
    assert list(QUICKSTART) == blocks[: len(QUICKSTART)]
    assert QUICKSTART[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_commands_are_spelled_to_run_from_the_quickstart() -> None:
    """`.venv/bin/...` everywhere (the quickstart activates no venv), and no `...` for a
    value the reader would have to fill in."""
    for block in readme_blocks():
        if not block.runnable or block.text.strip() in QUICKSTART:
            continue
        for line in block.text.splitlines():
            command = line.split("#", 1)[0] if block.lang == "sh" else ""
            assert not re.search(r"(^|[\s;&|(])(authserver|uvicorn|python3?|pip) ", command), (
                f"README.md line {block.line}: spell .venv/bin/...: {line}"
            )
            assert "..." not in command, f"README.md line {block.line}: a placeholder: {line}"


def test_readme_lists_every_audit_event() -> None:
    """The "Audit events" table is `audit.EVENTS`, name for name and word for word."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### Audit events", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (.+?) \|$", section, re.M)
    assert dict(rows) == audit.EVENTS


@pytest.mark.slow
def test_readme_blocks_run_as_written(tmp_path: Path) -> None:
    for tool in ("curl", "jq"):
        if shutil.which(tool) is None:
            reason = f"the README's commands need {tool}: apt-get install {tool}"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(reason)
            pytest.skip(reason)
    workdir = tmp_path / "repo"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (workdir / "examples").symlink_to(ROOT / "examples")
    port, example_port = free_port(), free_port()
    ports = {
        "127.0.0.1:8000": f"127.0.0.1:{port}",
        "127.0.0.1:9000": f"127.0.0.1:{example_port}",
        "--port 9000": f"--port {example_port}",
    }
    # bcrypt at cost 4 (base_env), and keys reloaded every second rather than every 5:
    # the key-rotation blocks wait for the server to notice.
    env = base_env(
        AUTHSERVER_ISSUER=f"http://127.0.0.1:{port}", AUTHSERVER_KEYS_RELOAD_INTERVAL="1"
    )
    env.pop("AUTHSERVER_LOG_FORMAT")  # the reader's default: JSON lines from serve
    blocks = [b for b in readme_blocks() if b.runnable]
    assert [b.text.strip() for b in blocks[:2]] == list(QUICKSTART)
    ran = 0
    with demo_server(workdir, env, port) as server:
        for block in blocks[2:]:
            if any(fragment in block.text for fragment in SKIPPED):
                continue
            here = _at(block, ports)
            assert_documented_output(here, _run(here, workdir, env))
            ran += 1
        assert server_errors(server.log()) == []
    assert ran >= 10
    assert _left_in_git_status(workdir) == []
    with socket.socket() as sock:  # every background process of the blocks was stopped
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a listener still refuses
        sock.bind(("127.0.0.1", example_port))


def _left_in_git_status(workdir: Path) -> list[str]:
    """What the walk-through leaves behind (database, keys, the JSON files) that `git status`
    would show a reader in their clone: nothing, by the repository's ignore files."""
    shutil.copy(ROOT / ".gitignore", workdir / ".gitignore")
    shutil.copy(ROOT / "keys" / ".gitignore", workdir / "keys" / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    ours = {"?? .gitignore", "?? keys/.gitignore", "?? .venv", "?? examples"}
    return [line for line in status if line not in ours]
