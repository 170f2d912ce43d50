"""Browser sign-in in a real browser: Chromium, authserver, and two relying-party apps.

The apps are `examples/oidc_relying_party.py` (Authlib's Starlette client,
unmodified), each a uvicorn process of its own on `localhost`, while authserver is
on `127.0.0.1`: different sites, as in production, so the session cookie's
SameSite=Lax is really put to the test. One server, two apps and one Chromium serve
the whole module.

- "webapp": confidential, third-party (a consent page), scope openid read.
- "spa": public (PKCE alone), first-party, signing in without the form once the
  browser is signed in.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright

from tests.helpers.browser_flow import pkce, query_of
from tests.helpers.chromium import CHROMIUM_ARGS, UI_TIMEOUT_MS, require_chromium
from tests.helpers.cli import assert_ok, invoke
from tests.helpers.procs import ServerPool, ServerProcess, base_env, free_port, server_errors

pytestmark = pytest.mark.browser

USER, PASSWORD = "browser-user", "browser password 1"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass
class Party:
    """A relying-party app: its process and the client it is registered as."""

    client_id: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class World:
    server: ServerProcess
    webapp: Party
    spa: Party
    webapp_secret: str
    browser: Browser


def _start_party(
    workdir: Path, issuer: str, client_id: str, secret: str | None, port: int
) -> Party:
    url = f"http://localhost:{port}"
    log_path = workdir / f"{client_id}.log"
    env = base_env(
        RP_ISSUER=issuer,
        RP_CLIENT_ID=client_id,
        RP_CLIENT_SECRET=secret or "",
        RP_BASE_URL=url,
        RP_TITLE=f"App {client_id}",
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(EXAMPLES),
                "oidc_relying_party:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Party(client_id, url, proc, log_path)


def _wait_up(party: Party) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if party.proc.poll() is not None:
            raise RuntimeError(f"{party.client_id} exited:\n{party.log()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{party.url.rsplit(':', 1)[1]}/").status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{party.client_id} did not start:\n{party.log()[-3000:]}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    chromium = require_chromium()
    workdir = tmp_path_factory.mktemp("browser-sign-in")
    port, web_port, spa_port = free_port(), free_port(), free_port()
    issuer = f"http://127.0.0.1:{port}"
    env = base_env(
        AUTHSERVER_DATABASE_URL=f"sqlite:///{workdir / 'authserver.db'}",
        AUTHSERVER_KEYS_DIR=str(workdir / "keys"),
        AUTHSERVER_ISSUER=issuer,
        AUTHSERVER_LOG_FORMAT="text",
    )
    # The CLI in-process (a process each would cost seconds): its registry options.
    cli = {k: v for k, v in env.items() if k.startswith("AUTHSERVER_")}
    assert_ok(invoke(cli, "users", "add", USER, "--password-stdin", input=PASSWORD))
    web = f"http://localhost:{web_port}"
    spa = f"http://localhost:{spa_port}"
    registered = invoke(
        cli,
        "clients", "add", "webapp", "--third-party", "--name", "Team Reports",
        "--scope", "read", "--redirect-uri", f"{web}/callback",
        "--post-logout-redirect-uri", f"{web}/logged-out",
    )  # fmt: skip
    assert_ok(registered)
    secret = registered.stdout.strip()
    assert_ok(
        invoke(
            cli,
            "clients", "add", "spa", "--public", "--name", "Team SPA",
            "--redirect-uri", f"{spa}/callback",
            "--post-logout-redirect-uri", f"{spa}/logged-out",
        )
    )  # fmt: skip
    pool = ServerPool(workdir)
    server = pool.spawn(env, name="authserver", port=port)
    parties: list[Party] = []
    try:
        # The apps read the server's metadata at their first sign-in: all three start at once.
        parties = [
            _start_party(workdir, issuer, "webapp", secret, web_port),
            _start_party(workdir, issuer, "spa", None, spa_port),
        ]
        server.wait_healthy()
        for party in parties:
            _wait_up(party)
        expect.set_options(timeout=UI_TIMEOUT_MS)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
            )
            try:
                yield World(server, parties[0], parties[1], secret, browser)
            finally:
                browser.close()
    finally:
        for party in parties:
            party.proc.terminate()
            party.proc.wait(15)
        pool.stop_all()


@contextlib.contextmanager
def _context(world: World) -> Iterator[tuple[BrowserContext, Page]]:
    """A fresh browser profile (no cookies), and a page in it."""
    context = world.browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        yield context, page
    finally:
        context.close()


def _sign_in_form(page: Page, username: str = USER, password: str = PASSWORD) -> None:
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def test_sign_in_consent_api_refresh_single_sign_on_and_sign_out(world: World) -> None:
    server = world.server.url
    errors: list[str] = []
    documents: dict[str, dict[str, str]] = {}
    visited: list[str] = []
    with _context(world) as (context, page):
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on(
            "console",
            lambda msg: errors.append(msg.text) if "Content Security" in msg.text else None,
        )

        def record(response: object) -> None:
            url = response.url  # type: ignore[attr-defined]
            visited.append(url)
            if response.request.resource_type == "document" and url.startswith(server):  # type: ignore[attr-defined]
                documents[url] = response.headers  # type: ignore[attr-defined]

        page.on("response", record)

        # 1. Sign in to the third-party app: the form, then consent.
        page.goto(world.webapp.url)
        page.locator("#login").click()
        expect(page.get_by_text("to continue to Team Reports")).to_be_visible()
        page.get_by_label("Username").fill(USER)
        page.get_by_label("Password").fill("wrong password")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_contain_text("username or password is not right")
        expect(page.get_by_label("Username")).to_have_value(USER)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Allow Team Reports?")).to_be_visible()
        expect(page.locator(".scopes")).to_contain_text("openid")
        page.get_by_role("button", name="Allow").click()
        expect(page.locator("#user")).to_have_text(USER)
        claims = json.loads(page.locator("#claims").inner_text())
        # Authlib checked the id_token (signature, iss, aud, exp, nonce, at_hash); its claims:
        assert claims["iss"] == server and claims["aud"] == "webapp"
        assert claims["sub"] == USER and claims["nonce"] and claims["at_hash"] and claims["sid"]
        session = [c for c in context.cookies() if c["name"] == "authserver_session"]
        assert len(session) == 1
        assert session[0]["httpOnly"] and session[0]["sameSite"] == "Lax"

        # 2. Call an API with the access token; refresh it.
        page.locator("#api").click()
        result = json.loads(page.locator("#result").inner_text())
        assert result["/protected"]["status"] == 200
        assert result["/userinfo"]["body"] == {"sub": USER, "preferred_username": USER}
        page.goto(f"{world.webapp.url}/refresh")
        expect(page.locator("#refreshed")).to_be_visible()
        page.goto(f"{world.webapp.url}/api")
        assert json.loads(page.locator("#result").inner_text())["/protected"]["status"] == 200

        # 3. The second app: signed in at once, no form, no consent (first-party).
        visited.clear()
        page.goto(world.spa.url)
        page.locator("#login").click()
        expect(page.locator("#user")).to_have_text(USER)
        assert not [u for u in visited if "/authorize/" in u], visited
        spa_claims = json.loads(page.locator("#claims").inner_text())
        assert spa_claims["aud"] == "spa" and spa_claims["sid"] == claims["sid"]

        # 4. Sign out of the first app: the browser session ends, and with it every
        # session begun from it, the second app's too.
        page.goto(world.webapp.url)
        page.locator("#logout").click()
        expect(page.locator("#status")).to_have_text("Signed out.")
        assert not [c for c in context.cookies() if c["name"] == "authserver_session"]
        page.goto(f"{world.spa.url}/refresh")
        expect(page.locator("#error")).to_have_text("refresh refused: invalid_grant")
        page.goto(world.spa.url)
        page.locator("#logout").click()
        expect(page.locator("#status")).to_have_text("Signed out.")
        # Signed out everywhere: the next sign-in asks for the password again.
        page.locator("#login").click()
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

    assert errors == []
    assert documents
    for url, headers in documents.items():
        if headers.get("content-type", "").startswith("text/html"):
            assert "frame-ancestors 'none'" in headers["content-security-policy"], url
            assert headers["x-frame-options"] == "DENY", url
    assert server_errors(world.server.log()) == []
    for party in (world.webapp, world.spa):
        assert "Traceback" not in party.log()


def _callbacks(page: Page, party: Party) -> list[str]:
    """Every URL the browser is sent back to the app with (the app refuses those of
    flows it did not start, by their state, and spends none of their codes)."""
    caught: list[str] = []
    callback = f"{party.url}/callback"
    page.on("request", lambda r: caught.append(r.url) if r.url.startswith(callback) else None)
    return caught


def test_negative_paths_in_the_browser(world: World) -> None:
    server, spa = world.server.url, world.spa
    verifier, challenge = pkce()
    params = {
        "response_type": "code",
        "client_id": "spa",
        "redirect_uri": f"{spa.url}/callback",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "scope": "openid",
        "state": "st",
    }
    with _context(world) as (context, page):
        # A redirect URI that is not registered: our page, and the browser stays here.
        evil = {**params, "redirect_uri": "http://localhost:1/steal"}
        response = page.goto(f"{server}/authorize?{urlencode(evil)}")
        assert response is not None and response.status == 400
        expect(page.get_by_role("heading")).to_have_text("This sign-in request cannot be completed")
        assert page.url.startswith(server)

        # prompt=none without a session: back to the app with login_required.
        caught = _callbacks(page, spa)
        page.goto(f"{server}/authorize?{urlencode({**params, 'prompt': 'none'})}")
        assert len(caught) == 1
        assert query_of(caught[0])["error"] == "login_required"
        assert query_of(caught[0])["iss"] == server

        # The form without its CSRF cookie: refused, nothing signed in.
        page.goto(f"{server}/authorize?{urlencode(params)}")
        context.clear_cookies(name="authserver_csrf")
        _sign_in_form(page)
        expect(page.get_by_role("heading")).to_have_text("Please try again")
        assert not [c for c in context.cookies() if c["name"] == "authserver_session"]

        # Sign in for real and catch the code the browser brings back.
        page.goto(f"{server}/authorize?{urlencode(params)}")
        _sign_in_form(page)
        page.wait_for_url(f"{spa.url}/callback**")
        code = query_of(caught[-1])["code"]

        # The app saw a state it never sent, and refused it (spending nothing).
        expect(page.locator("#error")).to_be_visible()

        # The sign-in page refuses to be framed (X-Frame-Options, frame-ancestors).
        refused: list[str] = []
        page.on("console", lambda msg: refused.append(msg.text))
        page.goto(spa.url)
        page.set_content(f'<iframe id="f" src="{server}/authorize?{urlencode(params)}"></iframe>')
        page.wait_for_timeout(500)
        framed = page.frames[1]
        assert "Sign in" not in framed.content() and "code=" not in framed.url
        assert any("frame" in m and "ancestors" in m or "X-Frame-Options" in m for m in refused)

    token = f"{server}/token"
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": f"{spa.url}/callback",
        "client_id": "spa",
    }
    missing = httpx.post(token, data=form)
    wrong = httpx.post(token, data={**form, "code_verifier": pkce()[0]})
    assert (missing.status_code, wrong.status_code) == (400, 400)
    assert missing.json()["error"] == wrong.json()["error"] == "invalid_grant"
    first = httpx.post(token, data={**form, "code_verifier": verifier})
    assert first.status_code == 200, first.text
    replay = httpx.post(token, data={**form, "code_verifier": verifier})
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    refreshed = httpx.post(
        token,
        data={
            "grant_type": "refresh_token",
            "refresh_token": first.json()["refresh_token"],
            "client_id": "spa",
        },
    )
    assert refreshed.status_code == 400  # the replay revoked what the code had issued
    assert server_errors(world.server.log()) == []


def test_swagger_ui_signs_in_with_the_authorization_code_and_pkce(world: World) -> None:
    """The Swagger UI's Authorize, authorization code flow: a popup with the sign-in form,
    back to /docs with a code, exchanged with PKCE as the built-in public client; then
    /protected from the page. Nothing leaves the server (no CDN)."""
    server = world.server.url
    outside: list[str] = []
    tokens: list[tuple[int, str]] = []
    with _context(world) as (context, page):

        def same_origin(route: Route) -> None:
            if route.request.url.startswith(server):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", same_origin)
        page.on(
            "response",
            lambda r: (
                tokens.append((r.status, r.request.post_data or ""))
                if r.url == f"{server}/token"
                else None
            ),
        )
        page.goto(f"{server}/docs")
        page.locator(".auth-wrapper button.authorize").click()
        dialog = page.locator(".modal-ux")
        form = dialog.locator(".auth-container").filter(has_text="authorizationCode with PKCE")
        form.locator("input#client_id_authorizationCode").fill("authserver")
        form.locator(".scopes label").filter(has_text="read").click()
        with page.expect_popup() as popup_info:
            form.locator("button.modal-btn").filter(has_text="Authorize").click()
        popup = popup_info.value
        _sign_in_form(popup)
        popup.wait_for_event("close")
        expect(form.locator("button.modal-btn").filter(has_text="Logout")).to_be_visible()
        dialog.locator("button.modal-btn").filter(has_text="Close").first.click()

        operation = page.locator(".opblock-get").filter(has_text="/protected")
        operation.locator(".opblock-summary").click()
        operation.get_by_role("button", name="Try it out").click()
        operation.get_by_role("button", name="Execute").click()
        live = operation.locator(".live-responses-table")
        expect(live.locator("tbody .response-col_status")).to_have_text("200")

    assert outside == []
    assert len(tokens) == 1
    status, body = tokens[0]
    assert status == 200
    sent = query_of("?" + body)
    assert sent["grant_type"] == "authorization_code" and sent["code_verifier"]
    assert server_errors(world.server.log()) == []
