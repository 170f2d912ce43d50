"""The tables, as SQLAlchemy Core metadata shared by the queries and the migrations.

Times are Unix seconds (double precision): one representation on every backend,
cheap to compare, and free of time-zone surprises.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Time = sa.Float(precision=53)

# A login's User-Agent is kept up to this many characters.
USER_AGENT_LENGTH = 256

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(150), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(128), nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
)

# A family is everything descended from one login (RFC 9700 §4.14.2).
refresh_families = sa.Table(
    "refresh_families",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("client_id", sa.String(255), nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("expires_at", Time, nullable=False),
    sa.Column("revoked_at", Time, nullable=True),
    sa.Column("revoked_reason", sa.String(32), nullable=True),
    # Where the login that began the session came from, for the session list (NULL for
    # sessions older than migration 0006). When it was last used is not stored here: it
    # is the `created_at` of the family's active token, which each rotation writes anyway.
    sa.Column("ip", sa.String(64), nullable=True),
    sa.Column("user_agent", sa.String(USER_AGENT_LENGTH), nullable=True),
    # RFC 9449 §5: a public client's family bound to its DPoP key (the RFC 7638
    # thumbprint); every refresh must then prove possession of that key.
    sa.Column("dpop_jkt", sa.String(64), nullable=True),
    # Since when: its tokens issued before (a family bound at a refresh, not at its
    # login) are not bound, so a spent one replayed still triggers reuse detection.
    sa.Column("dpop_bound_at", Time, nullable=True),
    sa.Index("ix_refresh_families_user_id", "user_id"),
)

# Only a SHA-256 digest of each refresh token is stored: a dump lets no one refresh.
refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column(
        "family_id",
        sa.String(36),
        sa.ForeignKey("refresh_families.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("parent_hash", sa.String(64), nullable=True),
    sa.Column("successor_hash", sa.String(64), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("expires_at", Time, nullable=False),
    sa.Column("spent_at", Time, nullable=True),
    sa.Index("ix_refresh_tokens_family_id", "family_id"),
    sa.Index("ix_refresh_tokens_expires_at", "expires_at"),
)

login_failures = sa.Table(
    "login_failures",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(300), nullable=False),
    sa.Column("failed_at", Time, nullable=False),
    sa.Index("ix_login_failures_key_failed_at", "key", "failed_at"),
)

# Where each user has logged in successfully: the throttle never locks a user out of
# these. An address is stored as a digest of its network, like the failure keys.
login_addresses = sa.Table(
    "login_addresses",
    metadata,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("network_key", sa.String(80), nullable=False),
    sa.Column("last_success_at", Time, nullable=False),
    sa.PrimaryKeyConstraint("user_id", "network_key", name="pk_login_addresses"),
    sa.Index("ix_login_addresses_last_success_at", "last_success_at"),
)

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", Time, nullable=False),
    sa.Column("event", sa.String(64), nullable=False),
    sa.Column("username", sa.String(150), nullable=True),
    sa.Column("client_addr", sa.String(64), nullable=True),
    sa.Column("request_id", sa.String(64), nullable=True),
    sa.Column("details", sa.Text, nullable=False, default="{}"),
    sa.Index("ix_audit_events_at", "at"),
    sa.Index("ix_audit_events_username_at", "username", "at"),
    sa.Index("ix_audit_events_event_at", "event", "at"),
)

# The built-in public client: never stored, it always exists (`clients.py`), and it is
# the client of every request that names none.
BUILTIN_CLIENT_ID = "authserver"

# The client registry (RFC 6749 §2). A confidential client's secret is stored as a
# SHA-256 digest only: it is 256 random bits, which no dictionary reaches, so a fast
# digest is as good as a slow hash and costs microseconds to check.
clients = sa.Table(
    "clients",
    metadata,
    sa.Column("client_id", sa.String(255), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("public", sa.Boolean, nullable=False),
    sa.Column("secret_digest", sa.String(64), nullable=True),
    # The secret before the last rotation, valid until `previous_secret_expires_at`.
    sa.Column("previous_secret_digest", sa.String(64), nullable=True),
    sa.Column("previous_secret_expires_at", Time, nullable=True),
    sa.Column("jwks", sa.Text, nullable=True),  # private_key_jwt: the client's public keys
    sa.Column("grants", sa.Text, nullable=False),  # JSON lists, in the order given
    sa.Column("scopes", sa.Text, nullable=True),  # NULL: every configured scope
    sa.Column("redirect_uris", sa.Text, nullable=False),
    sa.Column("post_logout_redirect_uris", sa.Text, nullable=False),
    sa.Column("audience", sa.String(255), nullable=True),  # NULL: AUTHSERVER_AUDIENCE
    sa.Column("third_party", sa.Boolean, nullable=False),
    sa.Column("require_dpop", sa.Boolean, nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
)

# One row: a counter that triggers on `clients` bump on every change, by any writer
# (migration 0007), so a process knows when the clients it remembers are stale.
registry_version = sa.Table(
    "registry_version",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False),
)

# Single-use assertion ids (RFC 7523 §3 `jti`), kept until the assertion expires: a
# replay finds its row, on every process that shares the database.
used_jtis = sa.Table(
    "used_jtis",
    metadata,
    sa.Column("key", sa.String(80), primary_key=True),
    sa.Column("expires_at", Time, nullable=False),
    sa.Index("ix_used_jtis_expires_at", "expires_at"),
)

# A signed-in browser (the OpenID Connect session at the server): the cookie's value is
# stored as a SHA-256 digest only; `id` is public, the id_token's `sid`.
browser_sessions = sa.Table(
    "browser_sessions",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("auth_time", Time, nullable=False),
    sa.Column("expires_at", Time, nullable=False),
    sa.Column("ended_at", Time, nullable=True),
    sa.Index("ix_browser_sessions_expires_at", "expires_at"),
)

# Authorization codes (RFC 6749 §4.1), stored as SHA-256 digests, bound to everything
# the token request must match. `family_id` is the refresh family the code was exchanged
# for: a replay revokes it, and ending the browser session revokes it too.
authorization_codes = sa.Table(
    "authorization_codes",
    metadata,
    sa.Column("code_hash", sa.String(64), primary_key=True),
    sa.Column("client_id", sa.String(255), nullable=False),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("browser_session_id", sa.String(36), nullable=False),
    sa.Column("redirect_uri", sa.Text, nullable=False),
    sa.Column("code_challenge", sa.String(128), nullable=False),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("nonce", sa.Text, nullable=True),
    sa.Column("auth_time", Time, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("expires_at", Time, nullable=False),
    sa.Column("used_at", Time, nullable=True),
    sa.Column("family_id", sa.String(36), nullable=True),
    sa.Index("ix_authorization_codes_browser_session_id", "browser_session_id"),
    sa.Index("ix_authorization_codes_expires_at", "expires_at"),
)

# What a user allowed a third-party client (a consent page's answer), per scope set.
consents = sa.Table(
    "consents",
    metadata,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("client_id", sa.String(255), nullable=False),
    sa.Column("scope", sa.String(1000), nullable=False),
    sa.Column("granted_at", Time, nullable=False),
    sa.PrimaryKeyConstraint("user_id", "client_id", "scope", name="pk_consents"),
)
