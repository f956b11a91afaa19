"""Outcome ingest: RecordOutcome over gRPC and POST /v1/executions/{id}/outcome
over REST, on the embedded SQLite and on PostgreSQL with durable defaults.

The server runs as its own `cueline serve` process; this process is the load.
Closed loop: `--concurrency` callers each send the next request as soon as the
previous answer arrives, for `--seconds`, `--repeat` times after a warm-up;
the median run is reported. Every request records a distinct execution's first
outcome, so each one is a real write-once commit.

Executions are inserted straight into the database before the clock starts
(setup, not measured). Results go to bench/results/ as JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from sqlalchemy import create_engine, insert, select

from cueline.v1 import outcomes_pb2, outcomes_pb2_grpc
from cueline_server.services.identifiers import hash_api_key
from cueline_server.store.database import sync_url
from tests.support import PostgresCluster, Server, auth, new_database

RESULTS = Path(__file__).parent / "results"


@dataclass
class Run:
    backend: str
    transport: str
    concurrency: int
    seconds: float
    requests: int
    errors: int
    per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float


def prepare(server: Server, key: str, count: int) -> list[str]:
    """A worker cue and `count` pending executions of it, inserted directly."""
    from cueline_server.store.tables import accounts, executions

    cue = httpx.post(
        f"{server.http_url}/v1/cues",
        json={"name": f"bench-{uuid.uuid4().hex[:6]}", "transport": "worker",
              "schedule": {"type": "recurring", "cron": "0 0 1 1 *"}},
        headers=auth(key),
    ).json()  # fmt: skip
    engine = create_engine(sync_url(server.database_url))
    ids = [uuid.uuid4() for _ in range(count)]
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        account_id = conn.execute(
            select(accounts.c.id).where(accounts.c.api_key_hash == hash_api_key(key))
        ).scalar()
        for start in range(0, count, 2000):
            conn.execute(
                insert(executions),
                [
                    {"id": i, "account_id": account_id, "cue_id": cue["id"], "transport": "worker",
                     "scheduled_for": now, "status": "pending", "triggered_by": "manual_fire",
                     "payload": "{}", "attempts": 0, "created_at": now, "updated_at": now}
                    for i in ids[start : start + 2000]
                ],
            )  # fmt: skip
    engine.dispose()
    return [str(i) for i in ids]


async def _drive(call: Any, pool: list[str], concurrency: int, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal errors
        while pool and time.perf_counter() < deadline:
            execution_id = pool.pop()
            started = time.perf_counter()
            ok = await call(execution_id)
            latencies.append(time.perf_counter() - started)
            errors += 0 if ok else 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, errors


async def measure(
    server: Server, key: str, transport: str, pool: list[str], concurrency: int, seconds: float, warmup: float
) -> Run:
    md = (("authorization", f"Bearer {key}"),)
    async with (
        grpc.aio.insecure_channel(server.grpc_target) as channel,
        httpx.AsyncClient(
            base_url=server.http_url,
            headers=auth(key),
            limits=httpx.Limits(max_connections=concurrency),
            timeout=30,
        ) as client,
    ):
        stub = outcomes_pb2_grpc.OutcomeServiceStub(channel)

        async def over_grpc(execution_id: str) -> bool:
            try:
                await stub.RecordOutcome(
                    outcomes_pb2.RecordOutcomeRequest(execution_id=execution_id, success=True, result="ok"),
                    metadata=md,
                )
                return True
            except grpc.aio.AioRpcError:
                return False

        async def over_rest(execution_id: str) -> bool:
            response = await client.post(
                f"/v1/executions/{execution_id}/outcome", json={"success": True, "result": "ok"}
            )
            return response.status_code == 200

        call = over_grpc if transport == "grpc" else over_rest
        await _drive(call, pool, concurrency, warmup)
        started = time.perf_counter()
        latencies, errors = await _drive(call, pool, concurrency, seconds)
        elapsed = time.perf_counter() - started
    latencies.sort()
    ms = [x * 1000 for x in latencies] or [0.0]
    return Run(
        backend=server.database_url.split(":", 1)[0],
        transport=transport,
        concurrency=concurrency,
        seconds=round(elapsed, 2),
        requests=len(latencies),
        errors=errors,
        per_second=round(len(latencies) / elapsed, 1),
        p50_ms=round(ms[len(ms) // 2], 2),
        p99_ms=round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
        max_ms=round(ms[-1], 2),
    )


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.per_second)[len(runs) // 2]


def table(runs: list[Run]) -> str:
    lines = [
        "| database | transport | callers | outcomes/s | p50 ms | p99 ms | max ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.backend} | {r.transport} | {r.concurrency} | {r.per_second:,.0f} "
            f"| {r.p50_ms} | {r.p99_ms} | {r.max_ms} | {r.errors} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Outcome ingest benchmark (gRPC and REST, SQLite and PostgreSQL)."
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a few seconds in all, to keep the harness working"
    )
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    seconds, repeat, warmup = (1.0, 1, 0.3) if options.smoke else (options.seconds, options.repeat, 1.0)
    per_run = int(5000 * (seconds + warmup)) + options.concurrency
    results: list[Run] = []
    for backend in options.backends.split(","):
        cluster = PostgresCluster(durable=True) if backend == "postgres" else None
        try:
            if cluster is not None:
                url = new_database(cluster.admin_url)
            else:
                url = f"sqlite:///{RESULTS / 'work' / uuid.uuid4().hex / 'cueline.db'}"
            server = Server(url).start()
            try:
                key = server.register()
                for transport in ("grpc", "rest"):
                    runs = []
                    for attempt in range(repeat):
                        pool = prepare(server, key, per_run)
                        print(
                            f"{backend} {transport} run {attempt + 1}/{repeat} ...",
                            file=sys.stderr,
                            flush=True,
                        )
                        runs.append(
                            asyncio.run(
                                measure(server, key, transport, pool, options.concurrency, seconds, warmup)
                            )
                        )
                    results.append(median_run(runs))
            finally:
                server.stop()
        finally:
            if cluster is not None:
                cluster.stop()
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    machine = {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    document = {
        "benchmark": "outcomes",
        "smoke": options.smoke,
        "machine": machine,
        "runs": [asdict(r) for r in results],
    }
    (RESULTS / f"outcomes-{stamp}.json").write_text(json.dumps(document, indent=2))
    print(table(results))
    failed = sum(r.errors for r in results)
    if failed:
        print(f"{failed} requests failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
