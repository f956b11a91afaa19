"""Fixtures: the database backends, and one `cueline serve` per backend.

Integration tests run against SQLite and PostgreSQL. PostgreSQL comes from
CUELINE_TEST_DATABASE_URL (an admin URL; each server gets a fresh database
there) or from a throwaway cluster started from the installed binaries.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import PostgresCluster, Server, new_database


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    configured = os.environ.get("CUELINE_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    cluster = PostgresCluster()
    try:
        yield cluster.admin_url
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of the backend under test."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'cueline.db'}"
    admin: str = request.getfixturevalue("postgres_admin_url")
    return new_database(admin)


@pytest.fixture(scope="session")
def server(backend: str, request: pytest.FixtureRequest) -> Iterator[Server]:
    """One running server per backend, shared by the tests; tests isolate by account."""
    if backend == "sqlite":
        url = f"sqlite:///{tempfile.mkdtemp(prefix='cueline-test-')}/cueline.db"
    else:
        url = new_database(request.getfixturevalue("postgres_admin_url"))
    running = Server(url).start()
    yield running
    code = running.stop()
    assert code == 0, running.log()
