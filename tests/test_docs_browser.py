"""The Swagger UI at /docs, driven by a real headless Chromium against a real server.

Proves three things a person would check by hand: the page works with no
internet (every request the browser tries goes to the server itself), the
OAuth2 password flow behind its Authorize button logs in at /token, and
GET /protected then succeeds from the page.

Chromium is Debian's `chromium` package, driven by Playwright's Python package
(never `playwright install`). Where it is missing the test skips with a reason,
except in CI (CI=true), where that is a failure. AUTHSERVER_TEST_SCREENSHOT
names where the final screenshot goes (default: the test's tmp_path).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Page, Response, Route, expect, sync_playwright

from tests.helpers.app import Running
from tests.helpers.procs import ServerProcess, base_env, free_port, run_cli, server_errors

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
USERNAME = "swagger"
PASSWORD = "browser password 1"
PROTECTED_MESSAGE = "Access granted for protected route."
UI_TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        reason = (
            f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture
def docs_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """`authserver serve` on a free port, with one user, on a SQLite file."""
    port = free_port()
    env = base_env(
        AUTHSERVER_DATABASE_URL=f"sqlite:///{tmp_path / 'authserver.db'}",
        AUTHSERVER_KEYS_DIR=str(tmp_path / "keys"),
        # The issuer names the URL the server really answers on, as in production.
        AUTHSERVER_ISSUER=f"http://127.0.0.1:{port}",
        AUTHSERVER_LOG_FORMAT="text",
    )
    added = run_cli(
        ["users", "add", USERNAME, "--password-stdin"], env, cwd=tmp_path, stdin=PASSWORD + "\n"
    )
    assert added.returncode == 0, added.stderr
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authserver", "serve", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = ServerProcess("docs", proc, port, log_path, log_file)
        try:
            server.wait_healthy()
            yield server
        finally:
            server.stop()


def _same_origin_only(route: Route, origin: str, outside: list[str]) -> None:
    """Let through what goes to the server itself; record and abort anything else."""
    url = route.request.url
    parts = urlsplit(url)
    if f"{parts.scheme}://{parts.netloc}" == origin:
        route.continue_()
    else:
        outside.append(url)
        route.abort()


def _authorize_and_call_protected(page: Page, origin: str) -> None:
    page.goto(f"{origin}/docs")
    page.locator(".auth-wrapper button.authorize").click()

    dialog = page.locator(".modal-ux")
    expect(dialog.locator("h4")).to_contain_text("OAuth2, password")
    dialog.locator("#oauth_username").fill(USERNAME)
    dialog.locator("#oauth_password").fill(PASSWORD)
    # Ask for one scope, as a person would tick it: the token must carry just that one.
    dialog.locator(".scopes label").filter(has_text="read").click()
    # The dialog's own Authorize (its accessible name is "Apply given OAuth2 credentials").
    dialog.locator("button.modal-btn").filter(has_text="Authorize").click()
    # Swagger UI swaps the dialog's Authorize for Logout once /token answered 200;
    # on an error it shows the error body instead.
    expect(dialog.locator("button.modal-btn").filter(has_text="Logout")).to_be_visible()
    dialog.locator("button.modal-btn").filter(has_text="Close").click()
    expect(dialog).to_have_count(0)

    operation = page.locator(".opblock-get").filter(has_text="/protected")
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()
    live = operation.locator(".live-responses-table")
    expect(live.locator("tbody .response-col_status")).to_have_text("200")
    expect(live.locator("tbody .response-col_description")).to_contain_text(PROTECTED_MESSAGE)


@pytest.mark.browser
def test_swagger_ui_logs_in_and_calls_protected_offline(
    chromium: Path, docs_server: ServerProcess, tmp_path: Path
) -> None:
    screenshot = Path(os.environ.get("AUTHSERVER_TEST_SCREENSHOT") or tmp_path / "swagger.png")
    outside: list[str] = []
    page_errors: list[str] = []
    seen: dict[str, list[Response]] = {"/token": [], "/protected": []}

    def record(response: Response) -> None:
        path = urlsplit(response.url).path
        if path in seen:
            seen[path].append(response)

    expect.set_options(timeout=UI_TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.route("**/*", lambda route: _same_origin_only(route, docs_server.url, outside))
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            page.on("response", record)
            try:
                _authorize_and_call_protected(page, docs_server.url)
            finally:
                page.screenshot(path=str(screenshot), full_page=True)
            tokens = [
                (r.status, parse_qs(r.request.post_data or ""), r.json()) for r in seen["/token"]
            ]
            protected = [
                (r.status, r.request.headers.get("authorization", "")) for r in seen["/protected"]
            ]
        finally:
            browser.close()

    assert outside == [], "the page tried to reach beyond the server (a CDN?)"
    assert page_errors == []
    assert len(tokens) == 1, docs_server.log()[-3000:]
    status, form, body = tokens[0]
    assert status == 200
    assert form["grant_type"] == ["password"]
    assert form["scope"] == ["read"]
    assert body["scope"] == "read"
    assert len(protected) == 1
    assert protected[0] == (200, f"Bearer {body['access_token']}")
    assert server_errors(docs_server.log()) == []


async def test_docs_page_loads_nothing_from_outside(server: Running) -> None:
    """The /docs HTML names only the server's own paths, and those assets are served."""
    page = await server.client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    assert not re.search(r"https?://", page.text)
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert urls, page.text
    for url in urls:
        assert url.startswith("/docs/assets/"), url
        asset = await server.client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 0
    spec = (await server.client.get("/openapi.json")).json()
    flow = spec["components"]["securitySchemes"]["OAuth2PasswordBearer"]["flows"]["password"]
    assert flow["tokenUrl"] == "/token"
    # The page Swagger UI's other OAuth2 flows return to; the password flow needs none.
    redirect = await server.client.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200
    assert "text/html" in redirect.headers["content-type"]
