"""Shared parts of the benchmark harness: servers, setup rows, statistics, output.

Setup (accounts, cues, executions) is written straight to the database before
any clock starts; only the operation named by each benchmark is measured.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, insert, select

from cueline_server.services.cues import DEFAULTS
from cueline_server.services.identifiers import hash_api_key, new_cue_id
from cueline_server.store.database import sync_url
from cueline_server.store.tables import accounts, cues, executions
from tests.support import PostgresCluster, Server, new_database

RESULTS = Path(__file__).parent / "results"
SERVER_ENV = {
    "CUELINE_DEFAULT_ACTIVE_CUE_LIMIT": "1000000",
    # The limiter stays in the measured path without ever refusing.
    "CUELINE_DEFAULT_RATE_LIMIT_PER_MINUTE": "1000000000",
    "CUELINE_ALLOW_PRIVATE_CALLBACKS": "true",
    "CUELINE_ALLOW_HTTP_CALLBACKS": "true",
}


@contextmanager
def running(backend: str) -> Iterator[Server]:
    """A fresh `cueline serve` on SQLite (WAL, synchronous=FULL) or on a
    throwaway PostgreSQL with durable defaults (fsync, synchronous_commit on)."""
    cluster = PostgresCluster(durable=True) if backend == "postgres" else None
    try:
        if cluster is not None:
            url = new_database(cluster.admin_url)
        else:
            url = f"sqlite:///{RESULTS / 'work' / uuid.uuid4().hex / 'cueline.db'}"
        server = Server(url, env=SERVER_ENV).start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        if cluster is not None:
            cluster.stop()


def engine(server: Server) -> Engine:
    return create_engine(sync_url(server.database_url))


def account_id(db: Engine, key: str) -> uuid.UUID:
    with db.connect() as conn:
        found: uuid.UUID = conn.execute(
            select(accounts.c.id).where(accounts.c.api_key_hash == hash_api_key(key))
        ).scalar_one()
        return found


def insert_cues(
    db: Engine, owner: uuid.UUID, count: int, *, transport: str, next_run: dt.datetime, url: str | None = None
) -> list[str]:
    """Active once cues due at next_run."""
    now = dt.datetime.now(dt.UTC)
    rows = []
    for index in range(count):
        row: dict[str, Any] = dict(DEFAULTS)
        row.update(
            id=new_cue_id(),
            account_id=owner,
            name=f"bench-{uuid.uuid4().hex[:10]}-{index}",
            description=None,
            status="active",
            transport=transport,
            schedule_type="once",
            cron=None,
            at=next_run,
            timezone="UTC",
            callback_url=url,
            payload='{"task": "bench"}',
            next_run=next_run,
            last_run=None,
            run_count=0,
            fired_count=0,
            created_at=now,
            updated_at=now,
        )
        rows.append(row)
    with db.begin() as conn:
        for start in range(0, count, 1000):
            conn.execute(insert(cues), rows[start : start + 1000])
    return [r["id"] for r in rows]


def insert_executions(
    db: Engine, owner: uuid.UUID, cue_id: str, count: int, transport: str = "worker"
) -> list[str]:
    """Pending executions of one cue, claimable (worker) or due (webhook) now."""
    now = dt.datetime.now(dt.UTC)
    ids = [uuid.uuid4() for _ in range(count)]
    with db.begin() as conn:
        for start in range(0, count, 2000):
            conn.execute(
                insert(executions),
                [
                    {
                        "id": i,
                        "account_id": owner,
                        "cue_id": cue_id,
                        "transport": transport,
                        "scheduled_for": now,
                        "status": "pending",
                        "triggered_by": "manual_fire",
                        "payload": '{"task": "bench"}',
                        "task": "bench",
                        "attempts": 0,
                        "available_at": now,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for i in ids[start : start + 2000]
                ],
            )
    return [str(i) for i in ids]


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    ordered = sorted(seconds) or [0.0]

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 2)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 2)}


def machine() -> dict[str, Any]:
    pg = subprocess.run(["postgres", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres": pg or None,
    }


def write(name: str, document: dict[str, Any], markdown: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps({**document, "machine": machine()}, indent=2))
    (RESULTS / f"{name}-latest.md").write_text(markdown + "\n")
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
