"""Properties of the hot statements that keep them cheap to run."""

from __future__ import annotations

import itertools

from psycopg import _queries

from cueline_server.store.repositories import (
    _BATCH_COLUMNS,
    _EXECUTION_BY_ID_DIRECT,
    _RECORD_OUTCOMES_DIRECT,
    _claim_each_statement_postgres,
    _claim_next_statement_postgres,
    _claimable_page_direct,
    _record_outcomes,
    _write_once_states_direct,
)


def test_the_statements_run_on_the_driver_fit_psycopgs_parse_cache() -> None:
    """psycopg caches the parsing of statements up to a size and a number of
    parameters; beyond, a statement is re-parsed in Python on every call."""
    shapes = list(itertools.product((False, True), repeat=2))
    direct = [
        *_RECORD_OUTCOMES_DIRECT.values(),
        _claim_each_statement_postgres(),
        *(_claim_next_statement_postgres(*shape) for shape in shapes),
        *(_claimable_page_direct(*shape) for shape in shapes),
        _write_once_states_direct(),
        _EXECUTION_BY_ID_DIRECT,
    ]
    for statement in direct:
        assert len(statement.sql.encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH, statement.sql
        assert statement.sql.count("%(") <= _queries.MAX_CACHED_STATEMENT_PARAMS, statement.sql
    batch = {name for name, _ in _BATCH_COLUMNS}
    assert set(_record_outcomes(leave_held=False).compile().params) == batch
    assert set(_record_outcomes(leave_held=True).compile().params) == batch | {"held_by"}


def test_the_claim_statements_look_for_lapsed_leases_by_recover_after_alone() -> None:
    """Given the lease's end as well, PostgreSQL's generic plan found lapsed
    leases through the (status, lease_expires_at) index: every expired lease,
    those of live claimers included, on every claim (docs/performance.md)."""
    shapes = list(itertools.product((False, True), repeat=2))
    for statement in (
        _claim_each_statement_postgres(),
        *(_claim_next_statement_postgres(*shape) for shape in shapes),
        *(_claimable_page_direct(*shape) for shape in shapes),
    ):
        assert "recover_after <=" in statement.sql
        assert "lease_expires_at <=" not in statement.sql
