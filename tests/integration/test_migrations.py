"""The schema comes only from the migrations, and they agree with the query metadata."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

import meterd.store.usage_schema  # noqa: F401
from meterd.store.database import open_database
from meterd.store.schema import metadata


async def test_migrated_schema_matches_the_tables_the_code_queries(database):
    def differences(connection):
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, metadata)

    async with database.read() as connection:
        diff = await connection.run_sync(differences)
    assert diff == []


async def test_upgrading_twice_changes_nothing(database, database_url):
    again = await open_database(database_url)
    try:
        async with again.read() as connection:
            version = (
                await connection.execute(text("SELECT version_num FROM alembic_version"))
            ).scalar_one()
        assert version == "0005"
    finally:
        await again.close()
