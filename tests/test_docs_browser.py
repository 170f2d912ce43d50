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

import base64
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, Page, Response, Route, expect, sync_playwright

from tests.helpers.chromium import CHROMIUM_ARGS, UI_TIMEOUT_MS, require_chromium
from tests.helpers.procs import ServerProcess, base_env, free_port, run_cli, server_errors
from tests.helpers.tokens import jwt_parts

USERNAME = "swagger"
ROBOT = "swagger-robot"  # a confidential client, for the client_credentials flow
PASSWORD = "browser password 1"
PROTECTED_MESSAGE = "Access granted for protected route."
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module (a launch costs seconds); each test has a
    fresh profile of its own (`_docs_page`)."""
    chromium = require_chromium()
    expect.set_options(timeout=UI_TIMEOUT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def docs_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docs-server")


@pytest.fixture(scope="module")
def docs_server(docs_workdir: Path) -> Iterator[ServerProcess]:
    """`authserver serve` on a free port, with one user and one confidential client (its
    secret in robot-secret), on a SQLite file in `docs_workdir`: shared by the module's
    browser tests, which sign in as different identities and look only at the requests
    of their own page."""
    tmp_path = docs_workdir
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
    robot = run_cli(["clients", "add", ROBOT, "--scope", "read"], env, cwd=tmp_path)
    assert robot.returncode == 0, robot.stderr
    (tmp_path / "robot-secret").write_text(robot.stdout.strip())
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


@contextlib.contextmanager
def _docs_page(browser: Browser, origin: str, outside: list[str]) -> Iterator[Page]:
    """A page in a fresh browser profile (no cookies, no storage) that may reach `origin`
    only (`outside` records the rest), closed with its profile at the end."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.route("**/*", lambda route: _same_origin_only(route, origin, outside))
        yield page
    finally:
        context.close()


def _authorize_and_call_protected(
    page: Page, origin: str, *, client: tuple[str, str] | None = None
) -> None:
    """Authorize in the dialog, with the password flow, or with client_credentials as
    `client` (id, secret); then call /protected."""
    page.goto(f"{origin}/docs")
    page.locator(".auth-wrapper button.authorize").click()

    dialog = page.locator(".modal-ux")
    flow = "clientCredentials" if client else "password"
    form = dialog.locator(".auth-container").filter(has_text=f"OAuth2, {flow}")
    expect(form.locator("h4")).to_contain_text(f"OAuth2, {flow}")
    if client is None:
        # The built-in public client is filled in, with no secret: a person types only
        # a username and a password.
        expect(form.locator("input#client_id_password")).to_have_value("authserver")
        expect(form.locator("input#client_secret_password")).to_have_value("")
        form.locator("#oauth_username").fill(USERNAME)
        form.locator("#oauth_password").fill(PASSWORD)
    else:
        form.locator("input#client_id_clientCredentials").fill(client[0])
        form.locator("input#client_secret_clientCredentials").fill(client[1])
    # Ask for one scope, as a person would tick it: the token must carry just that one.
    form.locator(".scopes label").filter(has_text="read").click()
    # The dialog's own Authorize (its accessible name is "Apply given OAuth2 credentials").
    form.locator("button.modal-btn").filter(has_text="Authorize").click()
    # Swagger UI swaps the dialog's Authorize for Logout once /token answered 200;
    # on an error it shows the error body instead.
    expect(form.locator("button.modal-btn").filter(has_text="Logout")).to_be_visible()
    dialog.locator("button.modal-btn").filter(has_text="Close").first.click()
    expect(dialog).to_have_count(0)

    operation = page.locator(".opblock-get").filter(has_text="/protected")
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()
    live = operation.locator(".live-responses-table")
    expect(live.locator("tbody .response-col_status")).to_have_text("200")
    expect(live.locator("tbody .response-col_description")).to_contain_text(PROTECTED_MESSAGE)


def test_swagger_ui_logs_in_and_calls_protected_offline(
    browser: Browser, docs_server: ServerProcess, tmp_path: Path
) -> None:
    screenshot = Path(os.environ.get("AUTHSERVER_TEST_SCREENSHOT") or tmp_path / "swagger.png")
    outside: list[str] = []
    page_errors: list[str] = []
    csp_violations: list[str] = []
    documents: list[Response] = []
    seen: dict[str, list[Response]] = {"/token": [], "/protected": []}

    def record(response: Response) -> None:
        path = urlsplit(response.url).path
        if path in seen:
            seen[path].append(response)
        if response.request.resource_type == "document":
            documents.append(response)

    with _docs_page(browser, docs_server.url, outside) as page:
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        page.on(
            "console",
            lambda msg: (
                csp_violations.append(msg.text) if "Content Security Policy" in msg.text else None
            ),
        )
        page.on("response", record)
        try:
            _authorize_and_call_protected(page, docs_server.url)
        finally:
            page.screenshot(path=str(screenshot), full_page=True)
        tokens = [(r.status, parse_qs(r.request.post_data or ""), r.json()) for r in seen["/token"]]
        basic = [r.request.headers.get("authorization", "") for r in seen["/token"]]
        protected = [
            (r.status, r.request.headers.get("authorization", "")) for r in seen["/protected"]
        ]
        policies = [r.headers.get("content-security-policy", "") for r in documents]

    assert outside == [], "the page tried to reach beyond the server (a CDN?)"
    assert page_errors == []
    # The page works under its policy, which it does not break even once.
    assert policies and all("default-src 'self'" in p for p in policies), policies
    assert csp_violations == []
    assert len(tokens) == 1, docs_server.log()[-3000:]
    status, form, body = tokens[0]
    assert status == 200
    assert form["grant_type"] == ["password"]
    assert form["scope"] == ["read"]
    assert body["scope"] == "read"
    # The pre-filled client, as HTTP Basic with an empty secret: the token is the built-in
    # client's.
    assert basic == ["Basic " + base64.b64encode(b"authserver:").decode()]
    assert jwt_parts(body["access_token"])[1]["client_id"] == "authserver"
    assert len(protected) == 1
    assert protected[0] == (200, f"Bearer {body['access_token']}")
    assert server_errors(docs_server.log()) == []


def test_swagger_ui_authorizes_a_confidential_client_and_calls_protected(
    browser: Browser, docs_server: ServerProcess, docs_workdir: Path
) -> None:
    secret = (docs_workdir / "robot-secret").read_text()
    outside: list[str] = []
    tokens: list[Response] = []
    with _docs_page(browser, docs_server.url, outside) as page:
        page.on(
            "response",
            lambda r: tokens.append(r) if urlsplit(r.url).path == "/token" else None,
        )
        _authorize_and_call_protected(page, docs_server.url, client=(ROBOT, secret))
        sent = [(r.status, parse_qs(r.request.post_data or "")) for r in tokens]
    assert outside == []
    assert len(sent) == 1
    status, form = sent[0]
    assert status == 200
    assert form["grant_type"] == ["client_credentials"]
    assert server_errors(docs_server.log()) == []
