"""Properties of the hot statements that keep them cheap to run."""

from __future__ import annotations

from psycopg import _queries
from sqlalchemy.dialects import postgresql

from cueline_server.store.repositories import _BATCH_COLUMNS, _RECORD_OUTCOMES


def test_the_batch_write_once_statement_fits_psycopgs_parse_cache() -> None:
    """psycopg caches the parsing of statements up to a size and a number of
    parameters; beyond, a statement is re-parsed in Python on every call."""
    compiled = str(_RECORD_OUTCOMES.compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]
    assert len(compiled.encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH
    assert len(_BATCH_COLUMNS) <= _queries.MAX_CACHED_STATEMENT_PARAMS
    assert set(_RECORD_OUTCOMES.compile().params) == {name for name, _ in _BATCH_COLUMNS}
