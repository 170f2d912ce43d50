"""The client registry, and single-use assertion ids.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Time = sa.Float(precision=53)


def upgrade() -> None:
    op.create_table(
        "clients",
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("public", sa.Boolean, nullable=False),
        sa.Column("secret_digest", sa.String(64), nullable=True),
        sa.Column("previous_secret_digest", sa.String(64), nullable=True),
        sa.Column("previous_secret_expires_at", Time, nullable=True),
        sa.Column("jwks", sa.Text, nullable=True),
        sa.Column("grants", sa.Text, nullable=False),
        sa.Column("scopes", sa.Text, nullable=True),
        sa.Column("redirect_uris", sa.Text, nullable=False),
        sa.Column("post_logout_redirect_uris", sa.Text, nullable=False),
        sa.Column("audience", sa.String(255), nullable=True),
        sa.Column("third_party", sa.Boolean, nullable=False),
        sa.Column("require_dpop", sa.Boolean, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("client_id", name="pk_clients"),
    )
    op.create_table(
        "used_jtis",
        sa.Column("key", sa.String(80), nullable=False),
        sa.Column("expires_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_used_jtis"),
    )
    op.create_index("ix_used_jtis_expires_at", "used_jtis", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_used_jtis_expires_at", table_name="used_jtis")
    op.drop_table("used_jtis")
    op.drop_table("clients")
