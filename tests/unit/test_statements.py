"""Properties of the hot statements that keep them cheap to run."""

from __future__ import annotations

from psycopg import _queries
from sqlalchemy.dialects import postgresql

from cueline_server.store.repositories import _record_outcome_and_settle_statement


def test_the_write_once_statement_fits_psycopgs_parse_cache() -> None:
    """psycopg caches the parsing of statements up to a size; a longer one is
    re-parsed in Python on every call, which the outcome path cannot afford."""
    text = str(_record_outcome_and_settle_statement().compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]
    assert len(text.encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH
    assert "IN (" not in text  # no expanding parameters, which are re-rendered per call
