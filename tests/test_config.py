"""Settings: AUTHSERVER_* variables and `.env`, how lists are parsed, which values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from authserver.config import Settings
from tests.helpers.app import StartApp
from tests.helpers.databases import SQLITE_ONLY
from tests.helpers.factories import make_user


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AUTHSERVER_* variable and no `.env` from the outside world."""
    import os

    for name in list(os.environ):
        if name.startswith("AUTHSERVER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_match_the_contract() -> None:
    settings = Settings()
    assert settings.database_url == "sqlite:///./authserver.db"
    assert settings.keys_dir == Path("./keys")
    assert settings.issuer == "http://127.0.0.1:8000"
    assert settings.audience == "authserver"
    assert settings.access_token_ttl == 900
    assert settings.refresh_token_ttl == 1_209_600
    assert settings.session_max_age == 2_592_000
    assert settings.refresh_reuse_grace == 0
    assert settings.bcrypt_rounds == 12
    assert settings.scopes == ("read", "write")
    assert settings.login_max_failures == 5
    assert settings.login_window == 900
    assert settings.trusted_proxies == ()
    assert settings.log_format == "json"
    assert settings.allow_insecure_key_files is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("read write", ("read", "write")),
        ("read write admin", ("read", "write", "admin")),
        ("  read\twrite\n", ("read", "write")),
        ("read write read", ("read", "write")),
        ("openid", ("openid",)),
        ("a:b urn:x-y.z!#$%&'()*+,-./", ("a:b", "urn:x-y.z!#$%&'()*+,-./")),
    ],
)
def test_scopes_are_space_separated(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[str, ...]
) -> None:
    monkeypatch.setenv("AUTHSERVER_SCOPES", value)
    assert Settings().scopes == expected


@pytest.mark.parametrize("value", ["", "   ", 'say"hi"', "back\\slash", "café", "read\x00"])
def test_bad_scopes_are_refused(value: str) -> None:
    # RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), at least one.
    # A NUL cannot be in an environment variable, but it can be in a .env file.
    (Path.cwd() / ".env").write_text(f"AUTHSERVER_SCOPES='{value}'\n")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "scopes" in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ()),
        ("127.0.0.1", ("127.0.0.1",)),
        ("10.0.0.1, 192.168.0.0/16 ::1", ("10.0.0.1", "192.168.0.0/16", "::1")),
        ("10.0.0.1,10.0.0.2", ("10.0.0.1", "10.0.0.2")),
        ("fd00::/8", ("fd00::/8",)),
        ("*", ("*",)),
    ],
)
def test_trusted_proxies_parsing(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[str, ...]
) -> None:
    monkeypatch.setenv("AUTHSERVER_TRUSTED_PROXIES", value)
    assert Settings().trusted_proxies == expected


@pytest.mark.parametrize("value", ["proxy.example.com", "10.0.0.300", "10.0.0.0/33", "1.2.3.4;5"])
def test_bad_trusted_proxies_are_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("AUTHSERVER_TRUSTED_PROXIES", value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "trusted_proxies" in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AUTHSERVER_BCRYPT_ROUNDS", "3"),
        ("AUTHSERVER_BCRYPT_ROUNDS", "32"),
        ("AUTHSERVER_BCRYPT_ROUNDS", "twelve"),
        ("AUTHSERVER_DATABASE_URL", "mysql://root@localhost/db"),
        ("AUTHSERVER_DATABASE_URL", "authserver.db"),
        ("AUTHSERVER_LOG_FORMAT", "xml"),
        ("AUTHSERVER_LOG_LEVEL", "loud"),
        ("AUTHSERVER_ACCESS_TOKEN_TTL", "0"),
        ("AUTHSERVER_ACCESS_TOKEN_TTL", "-900"),
        ("AUTHSERVER_REFRESH_TOKEN_TTL", "0"),
        ("AUTHSERVER_SESSION_MAX_AGE", "0"),
        ("AUTHSERVER_REFRESH_REUSE_GRACE", "-1"),
        ("AUTHSERVER_LOGIN_MAX_FAILURES", "0"),
        ("AUTHSERVER_LOGIN_WINDOW", "0"),
        ("AUTHSERVER_KEYS_RELOAD_INTERVAL", "0"),
        ("AUTHSERVER_KEYS_RELOAD_INTERVAL", "61"),
        ("AUTHSERVER_ALLOW_INSECURE_KEY_FILES", "maybe"),
        ("AUTHSERVER_ISSUER", ""),
        ("AUTHSERVER_ISSUER", "not a url"),
        ("AUTHSERVER_ISSUER", "auth.example.com"),
        ("AUTHSERVER_ISSUER", "ftp://auth.example.com"),
        ("AUTHSERVER_ISSUER", "https://auth.example.com/?tenant=1"),
        ("AUTHSERVER_ISSUER", "https://auth.example.com#x"),
        ("AUTHSERVER_DATABASE_URL", "sqlite://"),
        ("AUTHSERVER_DATABASE_URL", "postgresql://postgres@127.0.0.1:notaport/x"),
    ],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    (error,) = info.value.errors()
    assert "AUTHSERVER_" + "_".join(str(p) for p in error["loc"]).upper() == variable


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("true", True), ("0", False)])
def test_allow_insecure_key_files_flag(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    monkeypatch.setenv("AUTHSERVER_ALLOW_INSECURE_KEY_FILES", value)
    assert Settings().allow_insecure_key_files is expected


def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHSERVER_LOG_LEVEL", "warning")
    assert Settings().log_level == "WARNING"


def test_dotenv_file_then_environment_then_arguments(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text(
        "AUTHSERVER_AUDIENCE=from-dotenv\nAUTHSERVER_SCOPES=alpha beta\nAUTHSERVER_ISSUER=https://a.example/\n"
    )
    settings = Settings()
    assert settings.audience == "from-dotenv"
    assert settings.scopes == ("alpha", "beta")
    assert settings.issuer == "https://a.example"  # no trailing slash: URLs are built on it

    monkeypatch.setenv("AUTHSERVER_AUDIENCE", "from-env")
    assert Settings().audience == "from-env"
    assert Settings(audience="from-argument").audience == "from-argument"


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.bcrypt_rounds = 4  # type: ignore[misc]


# -- the values take effect -----------------------------------------------------------------


@SQLITE_ONLY
async def test_configured_scopes_are_published_granted_and_enforced(
    start_app: StartApp,
) -> None:
    running = await start_app(scopes="read write admin")
    await make_user(running.store, "alice")
    metadata = (await running.client.get("/.well-known/oauth-authorization-server")).json()
    assert metadata["scopes_supported"] == ["openid", "read", "write", "admin"]  # openid: always
    # The Swagger UI's Authorize dialog offers the same scopes.
    schemes = (await running.client.get("/openapi.json")).json()["components"]["securitySchemes"]
    (password_flow,) = (s["flows"]["password"] for s in schemes.values() if "flows" in s)
    assert list(password_flow["scopes"]) == ["read", "write", "admin"]
    assert (await running.login())["scope"] == "read write admin"
    assert (await running.login(scope="admin"))["scope"] == "admin"
    r = await running.client.post(
        "/login", json={"username": "alice", "password": "correct horse battery", "scope": "root"}
    )
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_scope"


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("trusted", "expected"),
    [("", "127.0.0.1"), ("127.0.0.1", "203.0.113.9"), ("10.0.0.0/8", "127.0.0.1")],
)
async def test_x_forwarded_for_is_believed_only_from_trusted_proxies(
    start_app: StartApp, trusted: str, expected: str
) -> None:
    running = await start_app(trusted_proxies=trusted)
    await make_user(running.store, "alice")
    r = await running.client.post(
        "/login",
        json={"username": "alice", "password": "correct horse battery"},
        headers={"X-Forwarded-For": "203.0.113.9"},
    )
    assert r.status_code == 200
    (event,) = await running.store.list_audit_events(event="login_succeeded")
    assert event.client_addr == expected
