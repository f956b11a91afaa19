"""The migrations are the only source of the schema: after `upgrade`, the
database matches the table definitions exactly, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from cueline_server.store import migrate
from cueline_server.store.database import sync_url
from cueline_server.store.tables import metadata


def test_migrated_schema_equals_the_models(database_url: str) -> None:
    assert migrate.current_revision(database_url) is None
    assert migrate.upgrade(database_url) == migrate.head_revision()
    engine = create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
            names = {i["name"] for i in inspect(conn).get_indexes("executions")}
            assert "uq_executions_scheduled_slot" in names
    finally:
        engine.dispose()
    assert migrate.upgrade(database_url) == migrate.head_revision()  # idempotent
