"""Outcome ingest: RecordOutcome over gRPC and POST /v1/executions/{id}/outcome
over REST, on the embedded SQLite and on PostgreSQL with durable defaults.

The server runs as its own `cueline serve` process; this process is the load.
Closed loop: `--concurrency` callers each send the next request as soon as the
previous answer arrives, for `--seconds`, `--repeat` times after a warm-up;
the median run is reported. Every request records a distinct execution's first
outcome, so each one is a real write-once commit.

Executions are inserted straight into the database before the clock starts
(setup, not measured).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import httpx

from bench.common import account_id, engine, insert_executions, markdown_table, running, write
from cueline.v1 import outcomes_pb2, outcomes_pb2_grpc
from tests.support import Server, auth


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
    cue = httpx.post(
        f"{server.http_url}/v1/cues",
        json={
            "name": f"bench-{uuid.uuid4().hex[:6]}",
            "transport": "worker",
            "schedule": {"type": "recurring", "cron": "0 0 1 1 *"},
        },
        headers=auth(key),
    ).json()
    db = engine(server)
    try:
        return insert_executions(db, account_id(db, key), cue["id"], count)
    finally:
        db.dispose()


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
            try:
                response = await client.post(
                    f"/v1/executions/{execution_id}/outcome", json={"success": True, "result": "ok"}
                )
            except httpx.HTTPError:
                return False
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


def render(runs: list[Run]) -> str:
    return markdown_table(
        ["database", "transport", "callers", "outcomes/s", "p50 ms", "p99 ms", "max ms", "errors"],
        [
            (
                r.backend,
                r.transport,
                r.concurrency,
                f"{r.per_second:,.0f}",
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.errors,
            )
            for r in runs
        ],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    options = parser.parse_args(argv)
    seconds, repeat, warmup = (1.0, 1, 0.3) if options.smoke else (options.seconds, options.repeat, 1.0)
    per_run = int(5000 * (seconds + warmup)) + options.concurrency
    results: list[Run] = []
    for backend in options.backends.split(","):
        with running(backend) as server:
            key = server.register()
            for transport in ("grpc", "rest"):
                runs = []
                for attempt in range(repeat):
                    pool = prepare(server, key, per_run)
                    print(
                        f"{backend} outcomes {transport} run {attempt + 1}/{repeat} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    runs.append(
                        asyncio.run(
                            measure(server, key, transport, pool, options.concurrency, seconds, warmup)
                        )
                    )
                results.append(median_run(runs))
    return {"benchmark": "outcomes", "smoke": options.smoke, "runs": [asdict(r) for r in results]}


if __name__ == "__main__":
    document = main()
    markdown = render([Run(**r) for r in document["runs"]])
    write("outcomes", document, markdown)
    print(markdown)
