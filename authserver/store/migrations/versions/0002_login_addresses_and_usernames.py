"""Known login addresses per user, and usernames normalised (RFC 8265 UsernameCaseMapped).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

Usernames become case-insensitive: every stored name is rewritten to its
UsernameCaseMapped form (NFC, case-mapped). Two names that map to the same
form (`Alice` and `alice`) would become one account, so the upgrade stops,
naming them, and changes nothing; so does a name the profile disallows.
"""

from __future__ import annotations

from collections import defaultdict

import precis_i18n
import sqlalchemy as sa
from alembic import op

from authserver.store.protocol import UpgradeRefused

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Time = sa.Float(precision=53)


def _normalised_usernames(conn: sa.Connection) -> dict[int, str]:
    """id -> new name for every user whose name changes; refuses collisions."""
    profile = precis_i18n.get_profile("UsernameCaseMapped")
    rows = conn.execute(sa.text("SELECT id, username FROM users ORDER BY id")).all()
    by_form: dict[str, list[str]] = defaultdict(list)
    renamed: dict[int, str] = {}
    for user_id, username in rows:
        try:
            form = profile.enforce(username)
        except UnicodeError:
            raise UpgradeRefused(
                f"cannot upgrade: the username {username!r} is not allowed by RFC 8265 "
                "(UsernameCaseMapped); rename it with an older release first"
            ) from None
        by_form[form].append(username)
        if form != username:
            renamed[user_id] = form
    collisions = [names for names in by_form.values() if len(names) > 1]
    if collisions:
        listed = "; ".join(" and ".join(repr(n) for n in names) for names in collisions)
        raise UpgradeRefused(
            f"cannot upgrade: usernames become case-insensitive and these would be one "
            f"account: {listed}; rename or remove all but one of each with an older release"
        )
    return renamed


def upgrade() -> None:
    conn = op.get_bind()
    renamed = _normalised_usernames(conn)
    for user_id, username in renamed.items():
        conn.execute(
            sa.text("UPDATE users SET username = :username WHERE id = :id"),
            {"username": username, "id": user_id},
        )
    op.create_table(
        "login_addresses",
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("network_key", sa.String(80), nullable=False),
        sa.Column("last_success_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("user_id", "network_key", name="pk_login_addresses"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name="fk_login_addresses_user_id_users",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_login_addresses_last_success_at", "login_addresses", ["last_success_at"])


def downgrade() -> None:
    op.drop_index("ix_login_addresses_last_success_at", table_name="login_addresses")
    op.drop_table("login_addresses")
