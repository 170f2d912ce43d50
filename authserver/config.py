"""Settings: the only module that reads the environment."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from authserver.scopes import is_scope_token

_DATABASE_SCHEMES = {"sqlite", "sqlite+aiosqlite", "postgresql", "postgres", "postgresql+asyncpg"}


class Settings(BaseSettings):
    """Every knob of the server, from `AUTHSERVER_*` variables or a `.env` file.

    Init arguments win over the environment, so tests build exactly the
    settings they need: `Settings(database_url=..., keys_dir=...)`.
    """

    model_config = SettingsConfigDict(
        env_prefix="AUTHSERVER_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    database_url: str = "sqlite:///./authserver.db"
    database_pool_size: int = Field(default=10, ge=1, le=1000)
    database_max_overflow: int = Field(default=10, ge=0, le=1000)
    database_pool_timeout: float = Field(default=10.0, gt=0)
    # Short, so that a database behind a network partition costs a request a few
    # seconds and a 503, not a hung client: every query here is a small OLTP one.
    database_connect_timeout: float = Field(default=3.0, gt=0)
    database_statement_timeout: float = Field(default=5.0, gt=0)
    keys_dir: Path = Path("./keys")
    keys_reload_interval: float = Field(default=5.0, gt=0, le=60)
    allow_insecure_key_files: bool = False
    issuer: str = "http://127.0.0.1:8000"
    audience: str = "authserver"
    access_token_ttl: int = Field(default=900, ge=1)
    refresh_token_ttl: int = Field(default=1_209_600, ge=1)
    session_max_age: int = Field(default=2_592_000, ge=1)
    refresh_reuse_grace: int = Field(default=0, ge=0)
    bcrypt_rounds: int = Field(default=12, ge=4, le=31)
    # NIST SP 800-63B §5.1.1.2: at least 8; 72 bytes is bcrypt's own ceiling.
    password_min_length: int = Field(default=8, ge=8, le=72)
    bcrypt_threads: int = Field(default=0, ge=0, le=64)
    scopes: Annotated[tuple[str, ...], NoDecode] = ("read", "write")
    login_max_failures: int = Field(default=5, ge=1)
    login_max_failures_per_user: int = Field(default=20, ge=1)
    login_max_failures_per_address: int = Field(default=100, ge=1)
    login_window: int = Field(default=900, ge=1)
    login_known_address_ttl: int = Field(default=30 * 86_400, ge=0)
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = ()
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    purge_interval: float = Field(default=3600.0, gt=0)
    header_timeout: float = Field(default=5.0, gt=0, le=300)
    max_connections: int = Field(default=2048, ge=1)
    # Prometheus metrics on a listener of their own (off unless a port is given), on
    # loopback unless told otherwise: the public port never serves them.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    # RFC 9449: how far a DPoP proof's `iat` may be from now, and server nonces.
    dpop_proof_window: int = Field(default=60, ge=1, le=3600)
    dpop_nonce: bool = False
    # FastAPI's own OpenTelemetry (traces, metrics and logs to the globally configured
    # providers). Off unless asked for: looking for providers costs ~7 µs a request.
    opentelemetry: bool = False

    @field_validator("scopes", mode="before")
    @classmethod
    def _split_scopes(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(value.split())
        return value

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one scope is required")
        for scope in value:
            if not is_scope_token(scope):
                raise ValueError(f"invalid scope token {scope!r}")
        return tuple(dict.fromkeys(value))

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(p for p in value.replace(",", " ").split() if p)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for proxy in value:
            if proxy != "*":
                ipaddress.ip_network(proxy, strict=False)
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if value.split(":", 1)[0] not in _DATABASE_SCHEMES:
            raise ValueError("must start with sqlite:/// or postgresql://")
        try:
            url = make_url(value)
            url.port  # noqa: B018  (parsed lazily: a port that is not a number raises here)
        except (ArgumentError, ValueError) as exc:
            raise ValueError(f"not a valid database URL ({exc})") from None
        if value.startswith("sqlite") and (not url.database or url.database == ":memory:"):
            # Every process and connection must see the same data: a file it is.
            raise ValueError("SQLite needs a file: sqlite:///PATH")
        return value

    @field_validator("issuer")
    @classmethod
    def _check_issuer(cls, value: str) -> str:
        # RFC 8414 §2: a URL with no query or fragment; it is the base of every
        # metadata URL, so it must be absolute. (http is allowed, for development.)
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError("must be an absolute http(s) URL, such as https://auth.example.com")
        if "?" in value or "#" in value:
            raise ValueError("must have no query or fragment")
        return value.rstrip("/")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
