"""Migrations that carry data forward: what a database made by an older release holds
after `authserver db upgrade`, on both databases."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from authserver.config import Settings
from authserver.store.migrate import upgrade_async
from authserver.store.schema import refresh_families
from authserver.store.sql import create_engine


@pytest.mark.empty_database
async def test_families_bound_before_the_bound_at_column_are_bound_from_their_start(
    settings: Settings,
) -> None:
    """Migration 0008: every family bound before it was bound at its login."""
    engine = create_engine(settings)
    try:
        await upgrade_async(engine, "0007")
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO users (username, password_hash, disabled, created_at,"
                    " updated_at) VALUES ('alice', 'x', false, 0, 0)"
                )
            )
            user_id = (await conn.execute(sa.text("SELECT id FROM users"))).scalar_one()
            for family, jkt in (("bound", "thumbprint"), ("plain", None)):
                await conn.execute(
                    sa.text(
                        "INSERT INTO refresh_families (id, user_id, client_id, created_at,"
                        " expires_at, dpop_jkt) VALUES (:id, :user, 'authserver', 100, 200, :jkt)"
                    ),
                    {"id": family, "user": user_id, "jkt": jkt},
                )
        await upgrade_async(engine)
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(refresh_families.c.id, refresh_families.c.dpop_bound_at)
            )
            assert {row[0]: row[1] for row in rows} == {"bound": 100.0, "plain": None}
    finally:
        await engine.dispose()
