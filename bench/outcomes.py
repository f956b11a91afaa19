"""Outcome ingest: RecordOutcome over gRPC and POST /v1/executions/{id}/outcome
over REST, on the embedded SQLite and on PostgreSQL with durable defaults, with
the ceilings of the same run (bench/ceilings.py).

The server runs as its own `cueline serve` process; this process is the load.
Closed loop: each of N callers sends the next request as soon as the previous
answer arrives, for `--seconds`, `--repeat` times after a warm-up; the median
run is kept. gRPC is measured at every `--callers` count (G1, G13), REST at the
largest (G14). Every request records a distinct execution's first outcome, so
each one is a real write-once commit.

Executions are inserted straight into the database before the clock starts
(setup, not measured).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
from sqlalchemy.engine import make_url

from bench.ceilings import PgbenchInserts, echo_server, sqlite_commits
from bench.common import (
    Plan,
    account_id,
    against,
    engine,
    insert_executions,
    markdown_table,
    median_of,
    percentiles,
    postgres_facts,
    running,
    share,
    throughput,
    write,
)
from bench.progress import phase
from bench.rawhttp import Connection
from cueline.v1 import outcomes_pb2, outcomes_pb2_grpc
from tests.support import Server, auth, bearer

GOALS = {("postgres", "grpc"): "G1", ("sqlite", "grpc"): "G13", ("postgres", "rest"): "G14"}
GOAL_CALLERS = 64
# The executions prepared per run assume no more than this many outcomes per second.
MAX_RATE = 5000
# A call of the open-loop generator gives up after this long (counted as an error).
CALL_TIMEOUT = 30.0
G2_RATE = 500

Call = Callable[[str], Awaitable[bool]]


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


async def _drive(call: Call, ids: Iterator[str], callers: int, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal errors
        while time.perf_counter() < deadline and (execution_id := next(ids, None)) is not None:
            started = time.perf_counter()
            ok = await call(execution_id)
            latencies.append(time.perf_counter() - started)
            errors += 0 if ok else 1

    await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies, errors


async def closed_loop(call: Call, ids: Iterator[str], callers: int, plan: Plan) -> dict[str, Any]:
    """A warm-up, then one timed run; both take their execution ids from `ids`."""
    await _drive(call, ids, callers, plan.warmup)
    started = time.perf_counter()
    latencies, errors = await _drive(call, ids, callers, plan.seconds)
    return throughput(latencies, errors, time.perf_counter() - started)


async def over_grpc(target: str, key: str, ids: Iterator[str], callers: int, plan: Plan) -> dict[str, Any]:
    """The G1 load generator: RecordOutcome on one channel, `callers` at a time."""
    md = bearer(key)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = outcomes_pb2_grpc.OutcomeServiceStub(channel)

        async def call(execution_id: str) -> bool:
            try:
                await stub.RecordOutcome(
                    outcomes_pb2.RecordOutcomeRequest(execution_id=execution_id, success=True, result="ok"),
                    metadata=md,
                )
                return True
            except grpc.aio.AioRpcError:
                return False

        return await closed_loop(call, ids, callers, plan)


async def report(connection: Connection, execution_id: str, result: str) -> int | None:
    """POST a successful outcome over REST: the status, None if the connection failed."""
    try:
        status, _ = await connection.request(
            "POST", f"/v1/executions/{execution_id}/outcome", {"success": True, "result": result}
        )
    except (OSError, asyncio.IncompleteReadError):
        return None
    return status


async def over_rest(base_url: str, key: str, ids: Iterator[str], callers: int, plan: Plan) -> dict[str, Any]:
    """The G14 load generator: POST /v1/executions/{id}/outcome on `callers`
    keep-alive connections (a lean client: see bench/rawhttp.py)."""
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(callers):
        pool.put_nowait(Connection.to(base_url, key))

    async def call(execution_id: str) -> bool:
        connection = await pool.get()
        try:
            return await report(connection, execution_id, "ok") == 200
        finally:
            pool.put_nowait(connection)

    try:
        return await closed_loop(call, ids, callers, plan)
    finally:
        while not pool.empty():
            await pool.get_nowait().close()


def ingest(
    server: Server, key: str, backend: str, transport: str, callers: int, plan: Plan
) -> dict[str, Any]:
    def once() -> dict[str, Any]:
        ids = iter(prepare(server, key, int(MAX_RATE * plan.timed) + callers))
        if transport == "grpc":
            return asyncio.run(over_grpc(server.grpc_target, key, ids, callers, plan))
        return asyncio.run(over_rest(server.http_url, key, ids, callers, plan))

    label = GOALS.get((backend, transport), "ingest")
    measured = median_of(f"{backend} {label} outcomes over {transport}, {callers} callers", plan, once)
    goal = GOALS.get((backend, transport), "") if callers == GOAL_CALLERS else ""
    return {"goal": goal, "backend": backend, "transport": transport, "callers": callers, **measured}


def echo_sweep(plan: Plan) -> list[dict[str, Any]]:
    """The gRPC framework ceiling at every caller count, driven like G1."""

    def once(target: str, callers: int) -> dict[str, Any]:
        # The echo has no rows to run out of; the count is only a bound.
        ids = itertools.repeat("echo", int(10 * MAX_RATE * plan.timed))
        return {"callers": callers, **asyncio.run(over_grpc(target, "none", ids, callers, plan))}

    with echo_server() as target:
        return [
            median_of(
                f"ceiling: gRPC echo, {callers} callers", plan, functools.partial(once, target, callers)
            )
            for callers in plan.callers
        ]


def pgbench_sweep(server: Server, synchronous_commit: str, plan: Plan) -> list[dict[str, Any]]:
    """The durable-insert ceiling on the server's own cluster, at the G1 client counts."""
    inserts = PgbenchInserts(server.database_url, synchronous_commit)
    with phase("ceiling: pgbench warm-up", expected=plan.warmup):
        inserts.run(max(plan.callers), plan.warmup)
    return [
        median_of(
            f"ceiling: pgbench durable insert, {clients} clients",
            plan,
            functools.partial(inserts.run, clients, plan.seconds),
        )
        for clients in plan.callers
    ]


def sqlite_ceiling(server: Server, plan: Plan) -> dict[str, Any]:
    """SQLite commits in a file beside the server's own database."""
    directory = Path(str(make_url(server.database_url).database)).parent
    return median_of(
        "ceiling: SQLite commits, one writer",
        plan,
        lambda: sqlite_commits(directory, plan.seconds, plan.warmup),
    )


def open_loop(
    target: str, metadata: tuple[tuple[str, str], ...], ids: Sequence[str], rate: float
) -> dict[str, Any]:
    """G2's load generator, open loop: the i-th outcome is sent at start + i/rate
    whatever the answers do, and its latency counts from that scheduled time, so
    queueing shows. The sends come from a thread that sleeps to the microsecond
    on grpc's synchronous channel, one future per call: asyncio's timers wake up
    to a millisecond late, and that lateness would be counted as the server's."""
    # Appended to from grpc's threads (list.append is atomic).
    latencies: list[float] = []
    failed: list[BaseException] = []
    answered = threading.Semaphore(0)

    def done(future: grpc.Future[Any], due: float) -> None:
        latencies.append(time.perf_counter() - due)
        if (error := future.exception()) is not None:
            failed.append(error)
        answered.release()

    with grpc.insecure_channel(target) as channel:
        record = outcomes_pb2_grpc.OutcomeServiceStub(channel).RecordOutcome
        start = time.perf_counter()
        for index, execution_id in enumerate(ids):
            due = start + index / rate
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            request = outcomes_pb2.RecordOutcomeRequest(execution_id=execution_id, success=True)
            future = record.future(request, metadata=metadata, timeout=CALL_TIMEOUT)
            future.add_done_callback(functools.partial(done, due=due))
        for _ in ids:
            answered.acquire()
    return {"rate": rate, "requests": len(ids), "errors": len(failed), **percentiles(latencies)}


def fixed_rate(server: Server, key: str, rate: float, seconds: float) -> dict[str, Any]:
    """G2: outcomes at `rate` for `seconds`, each recording a distinct execution's first outcome."""
    return open_loop(server.grpc_target, bearer(key), prepare(server, key, int(rate * seconds)), rate)


def echo_fixed_rate(rate: float, seconds: float) -> dict[str, Any]:
    """G2's ceiling: the gRPC echo driven by the same generator at the same rate."""
    with echo_server() as target:
        return open_loop(target, (), ["echo"] * int(rate * seconds), rate)


async def race(server: Server, key: str, executions: int, writers: int = 16) -> dict[str, Any]:
    """G3: every execution gets `writers` concurrent reports, half over gRPC and
    half over REST; exactly one may win, every loser must get a conflict."""
    pool = prepare(server, key, executions)
    md = bearer(key)
    wins: dict[str, int] = dict.fromkeys(pool, 0)
    tally = {"conflicts": 0, "errors": 0}
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
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

        async def over_rest(connection: Connection, execution_id: str, writer: int) -> str:
            status = await report(connection, execution_id, str(writer))
            return {200: "won", 409: "conflict"}.get(status or 0, "error")

        async def writer(index: int) -> None:
            # Even writers over gRPC (one shared channel), odd ones over REST,
            # each on its own keep-alive connection.
            connection = None if index % 2 == 0 else Connection.to(server.http_url, key)
            try:
                for execution_id in pool:
                    if connection is None:
                        result = await over_grpc(execution_id, index)
                    else:
                        result = await over_rest(connection, execution_id, index)
                    if result == "won":
                        wins[execution_id] += 1
                    else:
                        tally[result + "s" if result == "conflict" else "errors"] += 1
            finally:
                if connection is not None:
                    await connection.close()

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


def compare(document: dict[str, Any]) -> None:
    """Each run against its ceilings: the gRPC echo at the same caller count
    (gRPC runs), and the database's own durable commits (pgbench at the same
    client count on PostgreSQL; one SQLite writer)."""
    ceilings = document["ceilings"]
    echo = {p["callers"]: p["per_second"] for p in ceilings["grpc_echo"]}
    inserts = {p["clients"]: p["per_second"] for p in ceilings.get("postgres_insert", [])}
    for run in document["runs"]:
        measured, callers = run["per_second"], run["callers"]
        run["of_ceilings"] = {}
        if run["transport"] == "grpc" and callers in echo:
            run["of_ceilings"]["framework"] = against(measured, "grpc_echo", echo[callers])
        if run["backend"] == "postgres" and callers in inserts:
            run["of_ceilings"]["database"] = against(measured, "postgres_insert", inserts[callers])
        if run["backend"] == "sqlite" and "sqlite_commit" in ceilings:
            run["of_ceilings"]["database"] = against(
                measured, "sqlite_commit", ceilings["sqlite_commit"]["per_second"]
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    plan = Plan.parse(argv, "Outcome ingest benchmark (gRPC and REST, SQLite and PostgreSQL).")
    document: dict[str, Any] = {
        "benchmark": "outcomes",
        "smoke": plan.smoke,
        "postgres_processes": plan.processes,
        "callers": plan.callers,
        "runs": [],
        "fixed_rate": {},
        "race": {},
        "ceilings": {"grpc_echo": echo_sweep(plan)},
    }
    with phase(f"ceiling: gRPC echo at a fixed {G2_RATE}/s", expected=plan.seconds + 1):
        document["ceilings"]["grpc_echo_fixed_rate"] = echo_fixed_rate(G2_RATE, plan.seconds + 1)
    for backend in plan.backends:
        with running(backend, plan.processes) as server:
            key = server.register()
            for callers in plan.callers:
                document["runs"].append(ingest(server, key, backend, "grpc", callers, plan))
            document["runs"].append(ingest(server, key, backend, "rest", max(plan.callers), plan))
            with phase(f"{backend} G2 outcome latency at a fixed {G2_RATE}/s", expected=plan.seconds + 1):
                document["fixed_rate"][backend] = fixed_rate(server, key, G2_RATE, plan.seconds + 1)
            executions = 50 if plan.smoke else 500
            with phase(f"{backend} G3 write-once race, {executions} executions x 16 writers"):
                document["race"][backend] = asyncio.run(race(server, key, executions))
            if backend == "postgres":
                document["postgres"] = postgres_facts(server)
                document["ceilings"]["postgres_insert"] = pgbench_sweep(
                    server, document["postgres"]["synchronous_commit"], plan
                )
            else:
                document["ceilings"]["sqlite_commit"] = sqlite_ceiling(server, plan)
    compare(document)
    return document


CEILING_NAMES = {
    "grpc_echo": "gRPC echo (same server settings, same load generator)",
    "postgres_insert": "pgbench: one durable INSERT per transaction",
    "sqlite_commit": "SQLite: one INSERT per transaction, WAL, synchronous=FULL",
}


def render(document: dict[str, Any]) -> str:
    """The ingest runs with their fractions of the ceilings, then G2 and G3."""
    runs = markdown_table(
        [
            "goal",
            "database",
            "transport",
            "callers",
            "outcomes/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "errors",
            "of gRPC echo",
            "of database ceiling",
        ],
        [
            (
                r["goal"],
                r["backend"],
                r["transport"],
                r["callers"],
                f"{r['per_second']:,.0f}",
                r["p50_ms"],
                r["p99_ms"],
                r["max_ms"],
                r["errors"],
                *(
                    share(r["of_ceilings"][kind]) if kind in r["of_ceilings"] else ""
                    for kind in ("framework", "database")
                ),
            )
            for r in document["runs"]
        ],
    )
    rows = []
    echo = document["ceilings"]["grpc_echo_fixed_rate"]
    for backend, g2 in document["fixed_rate"].items():
        g3 = document["race"][backend]
        rows.append(
            (
                backend,
                f"G2 outcome latency at {g2['rate']:.0f}/s (open loop)",
                f"p50 {g2['p50_ms']} ms, p99 {g2['p99_ms']} ms "
                f"(gRPC echo at that rate: p50 {echo['p50_ms']} ms, p99 {echo['p99_ms']} ms)",
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
    more = markdown_table(["database", "benchmark", "result", "checks"], rows)
    return "\n\n".join((runs, more, render_ceilings(document["ceilings"])))


def render_ceilings(ceilings: dict[str, Any]) -> str:
    rows = [
        (
            CEILING_NAMES["grpc_echo"],
            p["callers"],
            f"{p['per_second']:,.0f}",
            f"p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms",
        )
        for p in ceilings["grpc_echo"]
    ]
    echo = ceilings["grpc_echo_fixed_rate"]
    rows.append(
        (
            f"gRPC echo at a fixed {echo['rate']:.0f}/s (G2's load generator)",
            "open loop",
            f"{echo['rate']:,.0f}",
            f"p50 {echo['p50_ms']} ms, p99 {echo['p99_ms']} ms",
        )
    )
    rows += [
        (
            CEILING_NAMES["postgres_insert"] + f", synchronous_commit={p['synchronous_commit']}",
            p["clients"],
            f"{p['per_second']:,.0f}",
            f"average {p['latency_average_ms']} ms",
        )
        for p in ceilings.get("postgres_insert", [])
    ]
    if "sqlite_commit" in ceilings:
        p = ceilings["sqlite_commit"]
        rows.append(
            (
                CEILING_NAMES["sqlite_commit"],
                1,
                f"{p['per_second']:,.0f}",
                f"p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms",
            )
        )
    return markdown_table(["ceiling", "clients", "per second", "latency"], rows)


if __name__ == "__main__":
    document = main()
    markdown = render(document)
    write("outcomes", document, markdown)
    print(markdown)
