"""Since when a refresh family is bound to its DPoP key (RFC 9449 §5).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

A family bound at its login is bound from its start; one begun without a proof is
bound by the first refresh that sends one, and the tokens it issued before stay
unbound (a spent one replayed meets reuse detection). Families bound before this
revision were all bound at their login.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

Time = sa.Float(precision=53)


def upgrade() -> None:
    with op.batch_alter_table("refresh_families") as batch:
        batch.add_column(sa.Column("dpop_bound_at", Time, nullable=True))
    op.execute("UPDATE refresh_families SET dpop_bound_at = created_at WHERE dpop_jkt IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("refresh_families") as batch:
        batch.drop_column("dpop_bound_at")
