"""Shared parts of the benchmark harness: servers, setup rows, statistics, output.

Setup (accounts, cues, executions) is written straight to the database before
any clock starts; only the operation named by each benchmark is measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, insert, select, text

from bench.progress import phase
from cueline_server.config import Settings
from cueline_server.eventloop import loop_factory
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

# The server's default. On the goals' two-core machines PostgreSQL and the load
# generator share the cores with the server: with a second process claim-next +
# report ran 1,180-1,330 cycles/s against 1,550-1,850 with one, and only REST ingest
# gained from it (docs/performance.md, "One server process on a shared two-core
# machine"). A gRPC channel is one connection, so the gRPC benchmarks, each on one
# channel, reach one process whatever the count.
POSTGRES_PROCESSES = 1


@contextmanager
def running(backend: str, processes: int = 1) -> Iterator[Server]:
    """A fresh `cueline serve` on SQLite (WAL, synchronous=FULL; one process) or
    on a throwaway PostgreSQL with durable defaults (fsync, synchronous_commit on)
    and `processes` server processes."""
    cluster = PostgresCluster(durable=True) if backend == "postgres" else None
    work = RESULTS / "work" / uuid.uuid4().hex
    try:
        url = new_database(cluster.admin_url) if cluster else f"sqlite:///{work / 'cueline.db'}"
        env = {**SERVER_ENV, "CUELINE_PROCESSES": str(processes if cluster else 1)}
        server = Server(url, env=env).start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def engine(server: Server) -> Engine:
    return create_engine(sync_url(server.database_url))


def account_id(db: Engine, key: str) -> uuid.UUID:
    with db.connect() as conn:
        found: uuid.UUID = conn.execute(
            select(accounts.c.id).where(accounts.c.api_key_hash == hash_api_key(key))
        ).scalar_one()
        return found


def insert_cues(
    db: Engine,
    owner: uuid.UUID,
    count: int,
    *,
    transport: str,
    next_run: dt.datetime,
    url: str | None = None,
    spacing: dt.timedelta = dt.timedelta(0),
    schedules: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """Active cues, the first due at next_run and each next one `spacing` later:
    once cues, or recurring ones taking their (cron, zone) from `schedules` in turn."""
    now = dt.datetime.now(dt.UTC)
    rows = []
    for index in range(count):
        due = next_run + index * spacing
        cron, timezone = schedules[index % len(schedules)] if schedules else (None, "UTC")
        row: dict[str, Any] = dict(DEFAULTS)
        row.update(
            id=new_cue_id(),
            account_id=owner,
            name=f"bench-{uuid.uuid4().hex[:10]}-{index}",
            description=None,
            status="active",
            transport=transport,
            schedule_type="once" if cron is None else "recurring",
            cron=cron,
            at=due if cron is None else None,
            timezone=timezone,
            callback_url=url,
            payload='{"task": "bench"}',
            next_run=due,
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
    # Fresh statistics, as autovacuum would gather for a table this size: the setup
    # inserted many rows at once, which a running system accumulates over time.
    with db.connect() as conn:
        conn.execute(text("ANALYZE executions"))
    return [str(i) for i in ids]


@dataclass(frozen=True)
class Plan:
    """How long and how often to measure; `--smoke` makes every part short."""

    smoke: bool
    backends: list[str]
    processes: int
    callers: list[int]
    seconds: float
    warmup: float
    repeat: int

    @classmethod
    def parse(cls, argv: list[str] | None, description: str) -> Plan:
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument(
            "--smoke", action="store_true", help="a few seconds each, to keep the harness working"
        )
        parser.add_argument("--backends", default="sqlite,postgres")
        parser.add_argument(
            "--processes",
            type=int,
            default=POSTGRES_PROCESSES,
            help=f"server processes on PostgreSQL (default {POSTGRES_PROCESSES}; SQLite runs one)",
        )
        parser.add_argument(
            "--callers", help="concurrent callers for the gRPC ingest sweep (default 1,4,16,64; smoke 8,64)"
        )
        parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed run")
        parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is kept")
        options = parser.parse_args(argv)
        callers = options.callers or ("8,64" if options.smoke else "1,4,16,64")
        return cls(
            smoke=options.smoke,
            backends=options.backends.split(","),
            processes=options.processes,
            callers=sorted(int(n) for n in callers.split(",")),
            seconds=1.0 if options.smoke else options.seconds,
            warmup=0.3 if options.smoke else 1.0,
            repeat=1 if options.smoke else options.repeat,
        )

    @property
    def timed(self) -> float:
        """The length of one run, warm-up included."""
        return self.seconds + self.warmup


T = TypeVar("T", bound=Mapping[str, Any])


def median_of(what: str, plan: Plan, measure: Callable[[], T]) -> T:
    """`plan.repeat` runs of `measure`, each shown as a phase; the run with the
    median `per_second` is kept."""
    runs = []
    for attempt in range(plan.repeat):
        with phase(what, expected=plan.timed, count=(attempt + 1, plan.repeat)):
            runs.append(measure())
    return sorted(runs, key=lambda r: float(r["per_second"]))[len(runs) // 2]


def throughput(latencies: Sequence[float], errors: int, elapsed: float) -> dict[str, Any]:
    """A closed-loop run: completed calls, their rate and their latency percentiles."""
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "per_second": round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        **percentiles(latencies),
    }


def against(measured: float, ceiling: str, ceiling_per_second: float) -> dict[str, Any]:
    """A result as a fraction of the ceiling it is compared with."""
    return {
        "ceiling": ceiling,
        "ceiling_per_second": ceiling_per_second,
        "fraction": round(measured / ceiling_per_second, 4) if ceiling_per_second else None,
    }


def share(comparison: Mapping[str, Any]) -> str:
    """`against(...)` for a table cell: "12.5% of 4,100/s"."""
    fraction = comparison["fraction"]
    shown = "n/a" if fraction is None else f"{fraction:.1%}"
    return f"{shown} of {comparison['ceiling_per_second']:,.0f}/s"


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    ordered = sorted(seconds) or [0.0]

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 2)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 2)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The facts a reader needs to weigh the numbers: the machine and the versions."""
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        **{name: metadata.version(name) for name in ("grpcio", "SQLAlchemy", "psycopg", "httpx")},
        "event_loop": _event_loop(),
    }


def _event_loop() -> str:
    """The loop the server and the echo ceiling run on (their default)."""
    factory = loop_factory(Settings.from_env().event_loop)
    return "asyncio" if factory is None else f"uvloop {metadata.version('uvloop')}"


POSTGRES_SETTINGS = (
    "synchronous_commit",
    "fsync",
    "shared_buffers",
    "max_connections",
    "wal_level",
    "track_commit_timestamp",
)


def postgres_facts(server: Server) -> dict[str, Any]:
    """The version and durability-relevant settings of the cluster a server runs on."""
    db = engine(server)
    try:
        with db.connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar_one()
            settings = {name: conn.execute(text(f"SHOW {name}")).scalar_one() for name in POSTGRES_SETTINGS}
    finally:
        db.dispose()
    return {"version": version, **settings}


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
