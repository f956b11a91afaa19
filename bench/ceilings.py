"""Ceilings, measured in the same run as cueline and driven the same way.

- gRPC framework: `bench.echo`, a RecordOutcome that does nothing, in its own
  process on cueline's grpc.aio settings, driven by the G1 load generator.
- PostgreSQL durable insert: `pgbench`, one INSERT per transaction, against the
  cluster the cueline server of the same run uses, with its synchronous_commit,
  at the same client counts as the G1 callers.
- PostgreSQL claim: N connections, each claiming one row per transaction with
  `UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING`.
  A claim cycle of G4/G5 needs at least one such commit per execution (and
  then one more for its outcome), so this bounds both.
- SQLite commits: one INSERT per transaction on one connection with the
  pragmas cueline sets (WAL, synchronous=FULL); SQLite has one writer at a time.

The ceilings use what the database offers at its best (prepared statements,
no connection pool), so the ratio shows everything cueline adds.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import create_engine

from bench.common import throughput
from bench.echo import READY
from cueline_server.store.database import configure_sqlite
from tests.support import ROOT, new_database, pg_binary


@contextmanager
def echo_server() -> Iterator[str]:
    """A `python -m bench.echo` process; yields its gRPC target."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.echo"], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith(READY):
            raise RuntimeError(f"the echo server did not start: {line!r}")
        yield line[len(READY) :].strip()
    finally:
        process.terminate()
        process.wait(10)


def _beside(database_url: str, *statements: str) -> str:
    """A fresh database on the same PostgreSQL cluster, with `statements` run in it."""
    url = new_database(database_url.rsplit("/", 1)[0] + "/postgres")
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())
    return url


class PgbenchInserts:
    """A table of its own on the cluster of `database_url`, written by `pgbench`
    with the synchronous_commit setting that the cueline server runs with."""

    def __init__(self, database_url: str, synchronous_commit: str) -> None:
        self.url = _beside(
            database_url,
            "CREATE TABLE ceiling_inserts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " recorded_at timestamptz NOT NULL DEFAULT now(), result text NOT NULL)",
        )
        self.synchronous_commit = synchronous_commit

    def run(self, clients: int, seconds: float) -> dict[str, Any]:
        """`pgbench` with `clients` connections for `seconds` (whole seconds, at least one)."""
        with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
            script.write("INSERT INTO ceiling_inserts (result) VALUES ('ok');\n")
            script.flush()
            command = [
                pg_binary("pgbench"),
                "--no-vacuum",
                "--protocol=prepared",
                f"--file={script.name}",
                f"--client={clients}",
                f"--jobs={min(clients, os.cpu_count() or 1)}",
                f"--time={max(1, round(seconds))}",
                self.url,
            ]
            env = {**os.environ, "PGOPTIONS": f"-c synchronous_commit={self.synchronous_commit}"}
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout

        def number(pattern: str) -> float:
            found = re.search(pattern, output)
            if found is None:
                raise RuntimeError(f"unexpected pgbench output:\n{output}")
            return float(found.group(1))

        return {
            "clients": clients,
            "transactions": int(number(r"number of transactions actually processed: (\d+)")),
            "per_second": round(number(r"tps = ([\d.]+)"), 1),
            "latency_average_ms": number(r"latency average = ([\d.]+) ms"),
            "synchronous_commit": self.synchronous_commit,
        }


def sqlite_commits(directory: Path, seconds: float, warmup: float) -> dict[str, Any]:
    """One writer committing one INSERT per transaction to a new database file
    in `directory`, as fast as it can."""
    engine = create_engine(f"sqlite:///{directory / f'ceiling-{uuid.uuid4().hex}.db'}")
    configure_sqlite(engine)
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        assert isinstance(conn, sqlite3.Connection)
        conn.execute("CREATE TABLE ceiling_inserts (id INTEGER PRIMARY KEY, recorded_at REAL, result TEXT)")

        def commit_for(span: float) -> tuple[list[float], float]:
            latencies = []
            started = time.perf_counter()
            deadline = started + span
            while (now := time.perf_counter()) < deadline:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO ceiling_inserts (recorded_at, result) VALUES (?, 'ok')", (now,))
                conn.execute("COMMIT")
                latencies.append(time.perf_counter() - now)
            return latencies, time.perf_counter() - started

        commit_for(warmup)
        latencies, elapsed = commit_for(seconds)
    finally:
        raw.close()
        engine.dispose()
    return {"writers": 1, **throughput(latencies, 0, elapsed)}


class SkipLockedClaims:
    """A table of pending jobs on the cluster of `database_url`, claimed by raw SQL."""

    CLAIM = (
        "UPDATE ceiling_jobs SET status = 'claimed', claimed_by = %s, claimed_at = now()"
        " WHERE id = (SELECT id FROM ceiling_jobs WHERE status = 'pending'"
        " ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id"
    )

    def __init__(self, database_url: str) -> None:
        self.url = _beside(
            database_url,
            "CREATE TABLE ceiling_jobs (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " status text NOT NULL DEFAULT 'pending', claimed_by text, claimed_at timestamptz)",
            "CREATE INDEX ceiling_jobs_pending ON ceiling_jobs (id) WHERE status = 'pending'",
        )

    def run(self, workers: int, jobs: int, seconds: float, warmup: float) -> dict[str, Any]:
        """Insert `jobs` pending rows (not timed), then claim for `seconds` after a warm-up."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO ceiling_jobs (status) SELECT 'pending' FROM generate_series(1, %s)", (jobs,)
            )
        return asyncio.run(self._claim(workers, seconds, warmup))

    async def _claim(self, workers: int, seconds: float, warmup: float) -> dict[str, Any]:
        connections = [
            await psycopg.AsyncConnection.connect(self.url, autocommit=True) for _ in range(workers)
        ]
        try:

            async def claim_for(span: float) -> tuple[list[float], float]:
                latencies: list[float] = []
                started = time.perf_counter()
                deadline = started + span

                async def worker(index: int, conn: psycopg.AsyncConnection[Any]) -> None:
                    while (begun := time.perf_counter()) < deadline:
                        claimed = await (await conn.execute(self.CLAIM, (f"w{index}",))).fetchone()
                        if claimed is None:
                            return
                        latencies.append(time.perf_counter() - begun)

                await asyncio.gather(*(worker(i, c) for i, c in enumerate(connections)))
                return latencies, time.perf_counter() - started

            await claim_for(warmup)
            latencies, elapsed = await claim_for(seconds)
        finally:
            for conn in connections:
                await conn.close()
        return {"workers": workers, **throughput(latencies, 0, elapsed)}
