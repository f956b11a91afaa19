"""Schema migrations. Alembic revisions in migrations/versions are the only
source of the schema; `cueline db upgrade` and the server's start-up apply them.

On PostgreSQL an advisory lock serialises migrations, so several replicas
starting together migrate once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, text

from cueline_server.store.database import configure_sqlite, ensure_sqlite_directory, sync_url

MIGRATIONS = Path(__file__).parent / "migrations"
ADVISORY_LOCK_KEY = 0x6375656C696E65  # "cueline"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


@contextmanager
def _connection(url: str) -> Iterator[Connection]:
    target = sync_url(url)
    ensure_sqlite_directory(target)
    engine = create_engine(target)
    if target.get_backend_name() == "sqlite":
        configure_sqlite(engine)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    with _connection(url) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str) -> str:
    """Bring the schema to the newest revision; returns it."""
    with _connection(url) as conn:
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
            conn.commit()
        try:
            command.upgrade(alembic_config(conn), "head")
            conn.commit()
        finally:
            if postgres:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
                conn.commit()
    return head_revision()
