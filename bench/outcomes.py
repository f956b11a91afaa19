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

from bench.common import account_id, engine, insert_executions, markdown_table, percentiles, running, write
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


async def fixed_rate(server: Server, key: str, rate: float, seconds: float) -> dict[str, Any]:
    """G2, open loop: one outcome every 1/rate s whatever the answers do; each
    latency counts from the request's scheduled send time, so queueing shows."""
    total = int(rate * seconds)
    pool = prepare(server, key, total)
    md = (("authorization", f"Bearer {key}"),)
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = outcomes_pb2_grpc.OutcomeServiceStub(channel)

        async def one(execution_id: str, due: float) -> None:
            nonlocal errors
            try:
                await stub.RecordOutcome(
                    outcomes_pb2.RecordOutcomeRequest(execution_id=execution_id, success=True), metadata=md
                )
            except grpc.aio.AioRpcError:
                errors += 1
            latencies.append(time.perf_counter() - due)

        start = time.perf_counter()
        tasks = []
        for index, execution_id in enumerate(pool):
            due = start + index / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(execution_id, due)))
        await asyncio.gather(*tasks)
    return {"rate": rate, "requests": total, "errors": errors, **percentiles(latencies)}


async def race(server: Server, key: str, executions: int, writers: int = 16) -> dict[str, Any]:
    """G3: every execution gets `writers` concurrent reports, half over gRPC and
    half over REST; exactly one may win, every loser must get a conflict."""
    pool = prepare(server, key, executions)
    md = (("authorization", f"Bearer {key}"),)
    wins: dict[str, int] = dict.fromkeys(pool, 0)
    tally = {"conflicts": 0, "errors": 0}
    async with (
        grpc.aio.insecure_channel(server.grpc_target) as channel,
        httpx.AsyncClient(base_url=server.http_url, headers=auth(key), timeout=60) as client,
    ):
        stub = outcomes_pb2_grpc.OutcomeServiceStub(channel)

        async def over_grpc(execution_id: str, writer: int) -> str:
            try:
                await stub.RecordOutcome(
                    outcomes_pb2.RecordOutcomeRequest(
                        execution_id=execution_id, success=True, result=str(writer)
                    ),
                    metadata=md,
                )
                return "won"
            except grpc.aio.AioRpcError as error:
                return "conflict" if error.code() == grpc.StatusCode.ALREADY_EXISTS else "error"

        async def over_rest(execution_id: str, writer: int) -> str:
            try:
                response = await client.post(
                    f"/v1/executions/{execution_id}/outcome", json={"success": True, "result": str(writer)}
                )
            except httpx.HTTPError:
                return "error"
            return {200: "won", 409: "conflict"}.get(response.status_code, "error")

        async def writer(index: int) -> None:
            send = over_grpc if index % 2 == 0 else over_rest
            for execution_id in pool:
                result = await send(execution_id, index)
                if result == "won":
                    wins[execution_id] += 1
                else:
                    tally[result + "s" if result == "conflict" else "errors"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(writer(i) for i in range(writers)))
        elapsed = time.perf_counter() - started
    attempts = executions * writers
    return {
        "executions": executions,
        "writers": writers,
        "attempts_per_second": round(attempts / elapsed, 1),
        "exactly_one_winner": sum(1 for n in wins.values() if n == 1),
        "conflicts": tally["conflicts"],
        "errors": tally["errors"],
    }


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.per_second)[len(runs) // 2]


def render_more(document: dict[str, Any]) -> str:
    rows = []
    for backend, g2 in document["fixed_rate"].items():
        g3 = document["race"][backend]
        rows.append(
            (
                backend,
                f"G2 outcome latency at {g2['rate']:.0f}/s (open loop)",
                f"p50 {g2['p50_ms']} ms, p99 {g2['p99_ms']} ms",
                f"errors {g2['errors']}",
            )
        )
        rows.append(
            (
                backend,
                f"G3 write-once race, {g3['executions']} x {g3['writers']} writers",
                f"{g3['attempts_per_second']:,} attempts/s",
                f"one winner {g3['exactly_one_winner']}/{g3['executions']}, "
                f"conflicts {g3['conflicts']}, errors {g3['errors']}",
            )
        )
    return markdown_table(["database", "benchmark", "result", "checks"], rows)


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
    latency: dict[str, Any] = {}
    races: dict[str, Any] = {}
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
            print(f"{backend} G2 fixed rate ...", file=sys.stderr, flush=True)
            latency[backend] = asyncio.run(fixed_rate(server, key, 500, seconds + 1))
            print(f"{backend} G3 write-once race ...", file=sys.stderr, flush=True)
            races[backend] = asyncio.run(race(server, key, 50 if options.smoke else 500))
    return {
        "benchmark": "outcomes",
        "smoke": options.smoke,
        "runs": [asdict(r) for r in results],
        "fixed_rate": latency,
        "race": races,
    }


if __name__ == "__main__":
    document = main()
    markdown = render([Run(**r) for r in document["runs"]]) + "\n\n" + render_more(document)
    write("outcomes", document, markdown)
    print(markdown)
