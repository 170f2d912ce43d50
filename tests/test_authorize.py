"""Browser sign-in over HTTP, in process, on both databases: /authorize, the sign-in and
consent forms, the authorization_code grant, OpenID Connect (id_token, userinfo,
discovery, end-session). The same flow in a real browser is `test_browser_sign_in.py`.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import httpx
import pytest
import sqlalchemy as sa

from authserver.audit import CLI
from authserver.clients import Registration
from authserver.jobs import purge
from authserver.store.schema import authorization_codes, browser_sessions
from authserver.store.sql import SqlStore
from authserver.tokens import verify_assertion
from tests.helpers.app import Running, StartApp
from tests.helpers.browser_flow import Flow, claims_of, hidden_fields, query_of
from tests.helpers.factories import make_client, make_user

APP = "https://app.example/callback"
OTHER_APP = "https://other.example/cb"
AFTER_LOGOUT = "https://app.example/bye"


@pytest.fixture
async def oidc(server: Running) -> tuple[Running, Flow]:
    """The server, and a confidential first-party client's flow from one browser."""
    _, secret = await make_client(
        server.store,
        "webapp",
        grants=("authorization_code", "refresh_token"),
        redirect_uris=(APP,),
        post_logout_redirect_uris=(AFTER_LOGOUT,),
        name="Team Web App",
    )
    return server, Flow(server.client, "webapp", APP, secret=secret)


async def test_code_flow_issues_tokens_an_id_token_and_userinfo(
    oidc: tuple[Running, Flow],
) -> None:
    server, flow = oidc
    page = await flow.authorize()
    assert page.status_code == 200
    assert "Team Web App" in page.text  # the client's display name
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    # No script at all, and no inline style: the policy forbids both.
    assert "<script" not in page.text and "style=" not in page.text and "<style" not in page.text
    back = await flow.sign_in(page)
    assert back.status_code == 303
    cookie = back.headers["set-cookie"]
    assert "authserver_session=" in cookie and "HttpOnly" in cookie
    assert "samesite=lax" in cookie.lower() and "Secure" not in cookie  # http issuer
    got = query_of(back.headers["location"])
    assert got["state"] == "the-state" and got["iss"] == "http://testserver"  # RFC 9207

    response = await flow.exchange(got["code"])
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    tokens = response.json()
    assert tokens["scope"] == "openid read" and tokens["refresh_token"]
    keys = server.app.state.services.auth.keys.verification_keys()
    id_claims = verify_assertion(tokens["id_token"], keys)  # signed with the server's key
    assert tokens["id_token"].split(".")[0]  # header below
    access = claims_of(tokens["access_token"])
    assert id_claims["iss"] == "http://testserver" and id_claims["aud"] == "webapp"
    assert id_claims["sub"] == "alice" and id_claims["nonce"] == "the-nonce"
    assert id_claims["exp"] > id_claims["iat"] >= id_claims["auth_time"]
    assert id_claims["sid"] and id_claims["at_hash"]
    assert access["sid"] != id_claims["sid"]  # the refresh family, and the browser session

    info = await server.client.get(
        "/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert info.status_code == 200
    assert info.json() == {"sub": "alice", "preferred_username": "alice"}
    posted = await server.client.post(
        "/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert posted.json()["sub"] == "alice"

    # The refresh token rotates like any other, for its own client only.
    rotated = await server.client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        auth=("webapp", flow.secret or ""),
    )
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["refresh_token"] != tokens["refresh_token"]

    # Stored: digests only, never the code or the session cookie's value.
    store = server.store
    assert isinstance(store, SqlStore)
    async with store.engine.connect() as conn:
        codes = (await conn.execute(sa.select(authorization_codes))).all()
        sessions = (await conn.execute(sa.select(browser_sessions))).all()
    session_value = server.client.cookies["authserver_session"]
    dumped = repr(codes) + repr(sessions)
    assert got["code"] not in dumped and session_value not in dumped
    assert len(codes) == 1 and codes[0].used_at is not None


async def test_a_second_app_signs_in_without_the_form(oidc: tuple[Running, Flow]) -> None:
    server, flow = oidc
    await make_client(
        server.store,
        "other",
        public=True,
        grants=("authorization_code", "refresh_token"),
        redirect_uris=(OTHER_APP,),
    )
    await flow.code()
    other = Flow(server.client, "other", OTHER_APP)
    back = await other.authorize()
    assert back.status_code == 303  # single sign-on: no form
    response = await other.exchange(query_of(back.headers["location"])["code"])
    assert response.status_code == 200, response.text
    # A public client's token request carries no secret; the code is bound to it alone.
    stolen = await flow.exchange(await other.code(), redirect_uri=OTHER_APP)
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"
    # prompt=login and max_age=0 ask for the password again, whatever the session.
    for ask in ({"prompt": "login"}, {"max_age": "0"}):
        page = await other.authorize(**ask)
        assert page.status_code == 200 and "/authorize/sign-in" in page.text


async def test_a_code_works_once_and_its_replay_revokes_what_it_issued(
    oidc: tuple[Running, Flow],
) -> None:
    server, flow = oidc
    code = await flow.code()
    first = await flow.exchange(code)
    assert first.status_code == 200
    again = await flow.exchange(code)
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"
    refreshed = await server.client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": first.json()["refresh_token"]},
        auth=("webapp", flow.secret or ""),
    )
    assert refreshed.status_code == 400  # the family the first use started is revoked
    info = await server.client.get(
        "/userinfo", headers={"Authorization": f"Bearer {first.json()['access_token']}"}
    )
    assert info.status_code == 401
    events = [e.event for e in await server.store.list_audit_events()]
    assert "code_reuse_detected" in events


async def test_the_token_request_must_match_the_code(oidc: tuple[Running, Flow]) -> None:
    server, flow = oidc
    code = await flow.code()
    for wrong in (
        {"code_verifier": None},
        {"code_verifier": secrets.token_urlsafe(48)},
        {"code_verifier": "short"},
        {"redirect_uri": OTHER_APP},
        {"redirect_uri": None},
    ):
        refused = await flow.exchange(code, **wrong)
        assert refused.status_code == 400, wrong
        assert refused.json()["error"] in {"invalid_grant", "invalid_request"}, wrong
    assert (await flow.exchange(code + "x")).json()["error"] == "invalid_grant"
    wrong_secret = await server.client.post(
        "/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": APP,
            "code_verifier": flow.verifier,
        },
        auth=("webapp", "not-the-secret"),
    )
    assert wrong_secret.status_code == 401
    # None of those spent it.
    assert (await flow.exchange(code)).status_code == 200


async def test_a_code_expires_after_60_seconds(oidc: tuple[Running, Flow]) -> None:
    server, flow = oidc
    code = await flow.code()
    auth = server.app.state.services.auth
    real = auth.clock
    auth.clock = lambda: real() + 61
    late = await flow.exchange(code)
    assert late.status_code == 400 and late.json()["error"] == "invalid_grant"


async def test_errors_before_the_redirect_uri_is_known_are_a_page(
    oidc: tuple[Running, Flow],
) -> None:
    _, flow = oidc
    for bad in (
        {"client_id": "nobody"},
        {"client_id": None},
        {"redirect_uri": "https://evil.example/callback"},
        {"redirect_uri": APP + "/"},  # exact match only
    ):
        page = await flow.authorize(**bad)
        assert page.status_code == 400, bad
        assert "location" not in page.headers
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["x-frame-options"] == "DENY"
    repeated = await flow.browser.get(
        "/authorize", params=[*flow.params().items(), ("redirect_uri", "https://evil.example/")]
    )
    assert repeated.status_code == 400 and "location" not in repeated.headers


_REDIRECTED_ERRORS: list[tuple[dict[str, str | None], str]] = [
    ({"code_challenge": None}, "invalid_request"),
    ({"code_challenge_method": "plain"}, "invalid_request"),
    ({"code_challenge_method": None}, "invalid_request"),
    ({"code_challenge": "too-short"}, "invalid_request"),
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"response_type": None}, "invalid_request"),
    ({"scope": "openid admin"}, "invalid_scope"),
    ({"prompt": "none"}, "login_required"),
    ({"prompt": "none login"}, "invalid_request"),
    ({"max_age": "-1"}, "invalid_request"),
]


async def test_errors_after_it_go_back_to_the_client(oidc: tuple[Running, Flow]) -> None:
    _, flow = oidc
    for change, error in _REDIRECTED_ERRORS:
        back = await flow.authorize(**change)
        assert back.status_code == 303, (change, back.text)
        location = back.headers["location"]
        assert location.startswith(APP + "?")
        got = query_of(location)
        assert got["error"] == error, change
        assert got["state"] == "the-state" and got["iss"] == "http://testserver"
        assert "code" not in got


async def test_the_sign_in_form_is_csrf_protected_throttled_and_audited(
    start_app: StartApp,
) -> None:
    server = await start_app(login_max_failures=2)
    await make_user(server.store, "alice")
    await make_client(
        server.store, "webapp", public=True, grants=("authorization_code",), redirect_uris=(APP,)
    )
    flow = Flow(server.client, "webapp", APP)
    page = await flow.authorize(login_hint="alice")
    assert 'value="alice"' in page.text  # login_hint fills in the username
    form = {**hidden_fields(page.text), "username": "alice", "password": "correct horse battery"}

    for csrf in (None, "forged-value-forged-value-forged-value"):
        sent = {k: v for k, v in form.items() if k != "csrf_token"}
        if csrf is not None:
            sent["csrf_token"] = csrf
        refused = await server.client.post("/authorize/sign-in", data=sent)
        assert refused.status_code == 400
        assert (
            "set-cookie" not in refused.headers
            or "authserver_session" not in (refused.headers["set-cookie"])
        )
    events = [e.event for e in await server.store.list_audit_events()]
    assert "login_succeeded" not in events and "login_failed" not in events

    wrong = await flow.sign_in(page, password="not it")
    assert wrong.status_code == 401
    assert "username or password is not right" in wrong.text
    assert 'value="alice"' in wrong.text  # the username is kept
    await flow.sign_in(wrong, password="not it either")
    throttled = await flow.sign_in(wrong)  # the right password, past the limit: as /login
    assert throttled.status_code == 429
    assert "Too many failed sign-ins" in throttled.text
    assert int(throttled.headers["retry-after"]) > 0
    events = [e.event for e in await server.store.list_audit_events()]
    assert events.count("login_failed") == 2 and "login_throttled" in events
    login = await server.client.post(
        "/login", json={"username": "alice", "password": "correct horse battery"}
    )
    assert login.status_code == 429  # one count, the form's and /login's


async def test_third_party_clients_ask_for_consent_once_per_scope_set(
    server: Running,
) -> None:
    await make_client(
        server.store,
        "partner",
        grants=("authorization_code",),
        redirect_uris=(APP,),
        third_party=True,
        name="Partner Reports",
    )
    flow = Flow(server.client, "partner", APP)
    page = await flow.sign_in(await flow.authorize())
    assert page.status_code == 200 and "Allow Partner Reports?" in page.text
    assert "<code>openid</code>" in page.text and "<code>read</code>" in page.text
    denied = await flow.answer_consent(page, "deny")
    got = query_of(denied.headers["location"])
    assert got["error"] == "access_denied" and got["iss"] == "http://testserver"

    unattended = await flow.authorize(prompt="none")
    assert query_of(unattended.headers["location"])["error"] == "consent_required"
    allowed = await flow.answer_consent(await flow.authorize(), "allow")
    assert "code" in query_of(allowed.headers["location"])
    # Remembered for this scope set; a new set, or prompt=consent, asks again.
    assert (await flow.authorize()).status_code == 303
    assert (await flow.authorize(scope="openid")).status_code == 200
    assert (await flow.authorize(prompt="consent")).status_code == 200
    events = [e.event for e in await server.store.list_audit_events()]
    assert events.count("consent_granted") == 1 and events.count("consent_denied") == 1


async def test_openid_is_granted_only_when_asked_for(oidc: tuple[Running, Flow]) -> None:
    _, flow = oidc
    response = await flow.exchange(await flow.code(scope=None))
    body = response.json()
    assert body["scope"] == "read write" and "id_token" not in body


async def test_end_session_signs_the_browser_out_and_revokes_its_sessions(
    oidc: tuple[Running, Flow],
) -> None:
    server, flow = oidc
    tokens = (await flow.exchange(await flow.code())).json()
    hint = tokens["id_token"]
    refused = await server.client.get(
        "/end-session",
        params={"id_token_hint": hint, "post_logout_redirect_uri": "https://evil.example/"},
    )
    assert refused.status_code == 400 and "location" not in refused.headers
    assert (await flow.authorize()).status_code == 303  # still signed in
    for bad in ("", "not-a-jwt", tokens["access_token"]):
        page = await server.client.get("/end-session", params={"id_token_hint": bad})
        assert page.status_code == 400
    long = await server.client.get("/end-session", params={"id_token_hint": "a." * 20_000})
    assert long.status_code == 400

    out = await server.client.get(
        "/end-session",
        params={"id_token_hint": hint, "post_logout_redirect_uri": AFTER_LOGOUT, "state": "s1"},
    )
    assert out.status_code == 303
    assert out.headers["location"] == AFTER_LOGOUT + "?state=s1"
    assert "authserver_session" not in server.client.cookies
    refreshed = await server.client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        auth=("webapp", flow.secret or ""),
    )
    assert refreshed.status_code == 400
    assert (await flow.authorize()).status_code == 200  # the form again
    assert (await flow.authorize(prompt="none")).status_code == 303


async def test_discovery_documents_the_browser_flow(server: Running) -> None:
    config = (await server.client.get("/.well-known/openid-configuration")).json()
    assert config["issuer"] == "http://testserver"
    assert config["response_types_supported"] == ["code"]
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert config["authorization_response_iss_parameter_supported"] is True
    assert "openid" in config["scopes_supported"]
    assert "authorization_code" in config["grant_types_supported"]
    for name in ("authorization_endpoint", "userinfo_endpoint", "end_session_endpoint"):
        url = config[name].removeprefix("http://testserver")
        answer = await server.client.get(url)
        assert answer.status_code in {400, 401}, name  # it answers: no parameters, no token
    oauth = (await server.client.get("/.well-known/oauth-authorization-server")).json()
    assert oauth["authorization_endpoint"] == config["authorization_endpoint"]


async def test_userinfo_needs_the_openid_scope(server: Running) -> None:
    tokens = await server.login()
    info = await server.client.get(
        "/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert info.status_code == 403
    assert 'scope="openid"' in info.headers["www-authenticate"]


async def test_cli_registered_client_with_an_https_issuer_gets_secure_cookies(
    start_app: StartApp,
) -> None:
    server = await start_app(issuer="https://auth.example")
    await make_user(server.store, "alice")
    clients = server.app.state.services.clients
    await clients.register(
        CLI,
        Registration(
            client_id="spa",
            public=True,
            redirect_uris=(APP,),
            name="Single Page",
        ),
    )
    browser = httpx.AsyncClient(transport=server.client._transport, base_url="https://auth.example")
    async with browser:
        flow = Flow(browser, "spa", APP)
        page = await flow.authorize()
        assert "__Host-authserver_csrf=" in page.headers["set-cookie"]
        back = await flow.sign_in(page)
        cookie = back.headers["set-cookie"]
        assert cookie.startswith("__Host-authserver_session=")
        assert "Secure" in cookie and "HttpOnly" in cookie and "Path=/" in cookie
        assert query_of(back.headers["location"])["iss"] == "https://auth.example"
        # A fresh session id at every sign-in.
        again = await flow.sign_in(await flow.authorize(prompt="login"))
        assert again.headers["set-cookie"].split(";")[0] != cookie.split(";")[0]


_BAD_QUERIES = [
    "response_type=code&client_id=%00",
    "client_id=" + "x" * 5000,
    "response_type=code&client_id=webapp&redirect_uri=%ff%fe",
    "response_type=code&client_id=webapp&state=" + "s" * 5000,
    "response_type=code&client_id=webapp&max_age=99999999999999999999999",
    "response_type=code&client_id=webapp&prompt=bogus&scope=%22",
]


async def test_bad_authorization_requests_never_fail_the_server(
    oidc: tuple[Running, Flow],
) -> None:
    server, _ = oidc
    form = {"content-type": "application/x-www-form-urlencoded"}
    for query in _BAD_QUERIES:
        answer = await server.client.get("/authorize?" + query)
        assert answer.status_code in {303, 400}, query
        for path in ("/authorize/sign-in", "/authorize/consent"):
            posted = await server.client.post(path, content=query.encode(), headers=form)
            assert posted.status_code in {303, 400}, (path, posted.text)


async def test_a_password_change_ends_browser_sessions_and_voids_their_codes(
    oidc: tuple[Running, Flow],
) -> None:
    server, flow = oidc
    code = await flow.code()
    assert (await flow.authorize()).status_code == 303  # signed in
    await server.app.state.services.users.set_password(CLI, "alice", "a new password 2")
    assert (await flow.authorize()).status_code == 200  # the form again
    refused = await flow.exchange(code)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"


async def test_purge_keeps_what_a_live_session_needs_and_drops_the_rest(
    oidc: tuple[Running, Flow],
) -> None:
    server, flow = oidc
    store = server.store
    assert isinstance(store, SqlStore)
    spent = await flow.code()
    assert (await flow.exchange(spent)).status_code == 200
    await flow.code()  # never exchanged

    async def rows() -> tuple[int, int]:
        async with store.engine.connect() as conn:
            codes = (await conn.execute(sa.select(authorization_codes))).all()
            sessions = (await conn.execute(sa.select(browser_sessions))).all()
        return len(codes), len(sessions)

    now = time.time()
    await purge(store, now=now + 120, login_window=900, known_address_ttl=0)
    # The unused code expired; the spent one stays while its session may still end.
    assert await rows() == (1, 1)
    await purge(
        store, now=now + server.settings.session_max_age + 1, login_window=900, known_address_ttl=0
    )
    assert await rows() == (0, 0)


async def test_concurrent_exchanges_of_one_code_issue_one_session_then_revoke_it(
    oidc: tuple[Running, Flow],
) -> None:
    server, flow = oidc
    code = await flow.code()
    answers = await asyncio.gather(*(flow.exchange(code) for _ in range(4)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200, 400, 400, 400], [a.text for a in answers]
    (winner,) = [a.json() for a in answers if a.status_code == 200]
    refreshed = await server.client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": winner["refresh_token"]},
        auth=("webapp", flow.secret or ""),
    )
    assert refreshed.status_code == 400  # every other use was a replay


async def test_a_removed_client_takes_its_consents_along(server: Running) -> None:
    clients = server.app.state.services.clients
    registration = Registration(
        client_id="partner", redirect_uris=(APP,), third_party=True, name="Partner"
    )
    _, secret = await clients.register(CLI, registration)
    flow = Flow(server.client, "partner", APP, secret=secret)
    allowed = await flow.answer_consent(await flow.sign_in(await flow.authorize()), "allow")
    assert allowed.status_code == 303
    assert (await flow.authorize()).status_code == 303  # remembered
    await clients.remove(CLI, "partner")
    await clients.register(CLI, registration)
    page = await flow.authorize()
    assert page.status_code == 200 and "Allow Partner?" in page.text  # asked again
