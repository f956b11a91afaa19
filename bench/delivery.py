"""Claims, pickup, firing and webhook delivery: G4-G9 of BENCHMARKS.md.

G4  batch claim + complete (gRPC ClaimExecutions, then one RecordOutcomes), 8 workers
G5  single claim per call over REST, 8 workers: the CueAPI worker daemon's cycle
    (list claimable, claim in listed order, report), and claim-next + report
G6  pickup: fire -> in the hands of a worker waiting in a long poll (open loop, 50/s)
G7  fire lag: execution committed - scheduled time, 1,000 cues due in one second
G8  burst: 10,000 cues due in one second; time until the last fired, one execution each
    (once cues, and again recurring cues on 24 cron schedules)
G9  webhook: fire -> first byte at a local receiver that takes 100 ms, 200 fires/s

Also the schedule lag of cues due one at a time (100, 50 ms apart), the
ordinary case, for the comparison with the CueAPI server's poller (G15).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import grpc
import httpx
from sqlalchemy import Engine, bindparam, func, literal_column, null, select

from bench.ceilings import SkipLockedClaims
from bench.common import (
    Plan,
    account_id,
    against,
    engine,
    insert_cues,
    insert_executions,
    markdown_table,
    median_of,
    percentiles,
    postgres_facts,
    running,
    share,
    write,
)
from bench.progress import phase
from bench.rawhttp import Connection
from cueline.v1 import (
    cues_pb2,
    cues_pb2_grpc,
    executions_pb2,
    executions_pb2_grpc,
    outcomes_pb2,
    outcomes_pb2_grpc,
)
from cueline_server.store.tables import executions
from tests.support import Server, auth, bearer

WORKERS = 8
# Schedule lag in the ordinary case, the one the CueAPI comparison (G15) is
# about: cues due one at a time, each STEADY_SPACING seconds after the last.
STEADY_CUES = 100
STEADY_SPACING = 0.05
# G8 again with recurring cues, which most cues are: daily to yearly cron
# expressions in several zones (so no cue comes round again during the run).
CRON_SCHEDULES = tuple(
    (cron, zone)
    for cron in ("0 3 * * *", "30 9 * * 1-5", "0 0 1 * *", "45 23 * * 0", "0 12 1 1 *", "5 4 15 */2 *")
    for zone in ("UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo")
)
# The results measured against the SKIP LOCKED claim ceiling.
CEILED = ("G4", "G5", "G5fresh", "G5next")
# The ceiling's pending rows per run assume no more than this many claims per second.
MAX_CLAIM_RATE = 20000


def _cue(server: Server, key: str, **body: Any) -> str:
    body = {
        "name": f"b-{time.monotonic_ns()}",
        "schedule": {"type": "recurring", "cron": "0 0 1 1 *"},
        **body,
    }
    response = httpx.post(f"{server.http_url}/v1/cues", json=body, headers=auth(key))
    response.raise_for_status()
    return str(response.json()["id"])


async def batch_claims(server: Server, key: str, pool: int, seconds: float) -> dict[str, Any]:
    db = engine(server)
    insert_executions(db, account_id(db, key), _cue(server, key, transport="worker"), pool)
    db.dispose()
    seen: Counter[str] = Counter()
    refused = 0  # reports of claimed executions that did not apply
    deadline = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        claims = executions_pb2_grpc.ExecutionServiceStub(channel)
        outcomes = outcomes_pb2_grpc.OutcomeServiceStub(channel)

        async def worker(index: int) -> None:
            nonlocal refused
            while time.perf_counter() < deadline:
                got = (
                    await claims.ClaimExecutions(
                        executions_pb2.ClaimExecutionsRequest(worker_id=f"w{index}", max_executions=50),
                        metadata=bearer(key),
                    )
                ).claims
                if not got:
                    return
                answer = await outcomes.RecordOutcomes(
                    outcomes_pb2.RecordOutcomesRequest(
                        outcomes=[
                            outcomes_pb2.RecordOutcomeRequest(
                                execution_id=c.execution_id, success=True, fencing_token=c.fencing_token
                            )
                            for c in got
                        ]
                    ),
                    metadata=bearer(key),
                )
                refused += sum(1 for r in answer.results if r.HasField("refused"))
                seen.update(c.execution_id for c in got)

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(WORKERS)))
        elapsed = time.perf_counter() - started
    return {
        "per_second": round(sum(seen.values()) / elapsed, 1),
        "completed": sum(seen.values()),
        "double_claims": sum(1 for n in seen.values() if n > 1),
        "errors": refused,
    }


async def claim_cycles(server: Server, key: str, pool: int, seconds: float, protocol: str) -> dict[str, Any]:
    """Single claims over REST by WORKERS workers, each on one kept connection
    (bench/rawhttp.py) unless the protocol says otherwise, each reporting
    every claim it wins.

    "daemon" is the published CueAPI worker daemon's cycle: list the claimable
    executions (the first page of 50), claim them in listed order until one
    claim succeeds (the others answer 409: another worker took them first),
    report it, list again. "daemon-fresh" is the same with a new connection
    for every request, as the daemon's HTTP client opens them. "next" asks the
    server for the oldest claimable execution instead (POST
    /v1/executions/claim), then reports it."""
    db = engine(server)
    insert_executions(db, account_id(db, key), _cue(server, key, transport="worker"), pool)
    db.dispose()
    seen: Counter[str] = Counter()
    lost = 0  # claims answered 409 because another worker had taken the execution
    errors: list[int] = []  # any other status than 200, and 409 where no race explains it
    deadline = time.perf_counter() + seconds

    async def next_claim(connection: Connection, worker_id: str) -> str | None:
        status, body = await connection.request("POST", "/v1/executions/claim", {"worker_id": worker_id})
        if status != 200:
            if status != 409:  # 409: nothing left
                errors.append(status)
            return None
        return str(json.loads(body)["execution_id"])

    async def daemon_claim(connection: Connection, worker_id: str) -> str | None:
        nonlocal lost
        while time.perf_counter() < deadline:
            status, body = await connection.request("GET", "/v1/executions/claimable")
            if status != 200:
                errors.append(status)
                return None
            listed = [str(item["execution_id"]) for item in json.loads(body)["executions"]]
            if not listed:
                return None
            for execution_id in listed:
                status, _ = await connection.request(
                    "POST", f"/v1/executions/{execution_id}/claim", {"worker_id": worker_id}
                )
                if status == 200:
                    return execution_id
                if status == 409:
                    lost += 1
                else:
                    errors.append(status)
        return None

    if protocol not in ("daemon", "daemon-fresh", "next"):
        raise ValueError(f"unknown claim protocol {protocol!r}")
    claim = next_claim if protocol == "next" else daemon_claim

    async def worker(index: int) -> None:
        connection = Connection.to(server.http_url, key, keep_alive=protocol != "daemon-fresh")
        try:
            while time.perf_counter() < deadline:
                execution_id = await claim(connection, f"w{index}")
                if execution_id is None:
                    return
                reported, _ = await connection.request(
                    "POST", f"/v1/executions/{execution_id}/outcome", {"success": True}
                )
                if reported != 200:
                    errors.append(reported)
                seen[execution_id] += 1
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(WORKERS)))
    elapsed = time.perf_counter() - started
    completed = sum(seen.values())
    return {
        "per_second": round(completed / elapsed, 1),
        "completed": completed,
        "lost_claims_per_cycle": round(lost / max(completed, 1), 2),
        "double_claims": sum(1 for n in seen.values() if n > 1),
        "errors": len(errors),
    }


async def pickup(server: Server, key: str, rate: float, seconds: float) -> dict[str, Any]:
    """Latency from the fire call's start to the claim arriving at a long-polling worker."""
    cue_id = _cue(server, key, transport="worker", payload={"task": "pickup"})
    latencies: list[float] = []
    total = int(rate * seconds)
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        cues = cues_pb2_grpc.CueServiceStub(channel)
        claims = executions_pb2_grpc.ExecutionServiceStub(channel)
        done = asyncio.Event()

        async def waiter(index: int) -> None:
            while not done.is_set():
                got = (
                    await claims.ClaimExecutions(
                        executions_pb2.ClaimExecutionsRequest(
                            worker_id=f"p{index}", task="pickup", max_executions=10, wait_seconds=2
                        ),
                        metadata=bearer(key),
                    )
                ).claims
                arrived = time.time()
                latencies.extend(arrived - json.loads(c.payload)["sent"] for c in got)
                if len(latencies) >= total:
                    done.set()

        waiters = [asyncio.create_task(waiter(i)) for i in range(4)]
        await asyncio.sleep(0.5)  # the waiters are parked in their long polls
        for _ in range(total):
            started = time.perf_counter()
            await cues.FireCue(
                cues_pb2.FireCueRequest(cue_id=cue_id, payload_override=json.dumps({"sent": time.time()})),
                metadata=bearer(key),
            )
            await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - started)))
        await asyncio.wait_for(done.wait(), 30)
        for task in waiters:
            task.cancel()
    return {"count": len(latencies), **percentiles(latencies)}


def fire_lag(
    server: Server, key: str, count: int, spacing: float = 0.0, schedules: Sequence[tuple[str, str]] = ()
) -> dict[str, Any]:
    """Cues due in the same second (`spacing` 0), or one after another every
    `spacing` seconds; once cues, or recurring ones on `schedules` ((cron, zone)
    pairs). Lag = the moment each execution's transaction committed - its
    scheduled time. PostgreSQL records commit timestamps (track_commit_timestamp);
    SQLite has none, so there a second connection watches for the rows and the
    lag is when each first became visible."""
    db = engine(server)
    due = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)).replace(microsecond=0)
    gap = dt.timedelta(seconds=spacing)
    cue_ids = insert_cues(
        db, account_id(db, key), count, transport="worker", next_run=due, spacing=gap, schedules=schedules
    )
    last_due = due + (count - 1) * gap
    postgres = db.dialect.name == "postgresql"
    watcher = None if postgres else _VisibilityWatcher(db, due, count)
    if watcher is not None:
        watcher.start()
    deadline = time.monotonic() + 60 + count * spacing
    while time.monotonic() < deadline:
        time.sleep(1)
        with db.connect() as conn:
            fired = conn.execute(
                select(func.count()).select_from(executions).where(executions.c.cue_id.in_(cue_ids))
            ).scalar_one()
        if fired >= count and dt.datetime.now(dt.UTC) > last_due + dt.timedelta(seconds=2):
            break
    with db.connect() as conn:
        committed_at = func.pg_xact_commit_timestamp(literal_column("xmin")) if postgres else null()
        rows = conn.execute(
            # The slots set up here (a recurring cue's next one may come round meanwhile).
            select(executions.c.cue_id, executions.c.scheduled_for, committed_at.label("committed_at")).where(
                executions.c.cue_id.in_(cue_ids), executions.c.scheduled_for <= last_due
            )
        ).all()
    if watcher is not None:
        watcher.stop()
    db.dispose()
    per_slot = Counter((r.cue_id, r.scheduled_for) for r in rows)
    seen = watcher.first_seen if watcher else {}
    committed = [r.committed_at if postgres else seen.get(r.cue_id) for r in rows]
    lags = [(at - r.scheduled_for).total_seconds() for r, at in zip(rows, committed, strict=True) if at]
    return {
        "cues": count,
        "fired": len({cue_id for cue_id, _ in per_slot}),
        "duplicates": sum(n - 1 for n in per_slot.values()),
        "measured_at": "commit" if postgres else "first visible",
        "all_fired_within_ms": round(max(lags) * 1000, 1) if len(lags) == len(rows) and lags else None,
        **percentiles(lags),
    }


class _VisibilityWatcher(threading.Thread):
    """Polls for new executions scheduled at `due` or later (rowids past the
    last one seen) and keeps when each cue's execution was first seen."""

    def __init__(self, db: Engine, due: dt.datetime, count: int) -> None:
        super().__init__(daemon=True)
        self._db = db
        self._due = due
        self._count = count
        self._stopping = threading.Event()
        self.first_seen: dict[str, dt.datetime] = {}

    def stop(self) -> None:
        self._stopping.set()
        self.join()

    def run(self) -> None:
        rowid: Any = literal_column("rowid")
        statement = (
            select(rowid, executions.c.cue_id)
            .where(rowid > bindparam("after"), executions.c.scheduled_for >= self._due)
            .order_by(rowid)
        )
        after = 0
        with self._db.connect() as conn:
            while not self._stopping.is_set() and len(self.first_seen) < self._count:
                rows = conn.execute(statement, {"after": after}).all()
                conn.rollback()  # the next poll reads a fresh snapshot
                seen = dt.datetime.now(dt.UTC)
                for _, cue_id in rows:
                    self.first_seen.setdefault(cue_id, seen)
                if rows:
                    after = rows[-1][0]
                time.sleep(0.001)


class _BackloggedServer(http.server.ThreadingHTTPServer):
    """The listen backlog is set when the socket starts listening (in the
    constructor), so it has to be a class attribute; the default of 5 refuses
    bursts of webhook connections."""

    request_queue_size = 1024
    daemon_threads = True


class _SlowReceiver:
    """200 deliveries/s to a receiver that takes 100 ms: threads, one per request."""

    def __init__(self, secret: str, count: int) -> None:
        self.arrivals: list[tuple[float, str, bool]] = []
        self.complete = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived = time.time()
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                stamp = self.headers["X-CueAPI-Timestamp"]
                signature = (
                    "v1=" + hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
                )
                valid = self.headers["X-CueAPI-Signature"] == signature
                outer.arrivals.append((arrived, self.headers["X-CueAPI-Scheduled-For"], valid))
                if len(outer.arrivals) >= count:
                    outer.complete.set()
                time.sleep(0.1)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _BackloggedServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"


async def webhooks(server: Server, key: str, secret: str, rate: float, seconds: float) -> dict[str, Any]:
    total = int(rate * seconds)
    receiver = _SlowReceiver(secret, total)
    cue_id = _cue(server, key, callback={"url": receiver.url})
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        cues = cues_pb2_grpc.CueServiceStub(channel)
        started = time.perf_counter()
        pending = []
        for index in range(total):
            pending.append(
                asyncio.ensure_future(
                    cues.FireCue(cues_pb2.FireCueRequest(cue_id=cue_id), metadata=bearer(key))
                )
            )
            await asyncio.sleep(max(0.0, started + (index + 1) / rate - time.perf_counter()))
        await asyncio.gather(*pending)
    await asyncio.to_thread(receiver.complete.wait, 60)
    receiver.server.shutdown()
    lags = [
        arrived - dt.datetime.fromisoformat(sent.replace("Z", "+00:00")).timestamp()
        for arrived, sent, _ in receiver.arrivals
    ]
    return {
        "deliveries": len(receiver.arrivals),
        "fired": total,
        "bad_signatures": sum(1 for *_, ok in receiver.arrivals if not ok),
        **percentiles(lags),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    plan = Plan.parse(argv, __doc__.splitlines()[0])
    scale = 0.1 if plan.smoke else 1.0
    document: dict[str, Any] = {
        "benchmark": "delivery",
        "smoke": plan.smoke,
        "postgres_processes": plan.processes,
        "results": {},
        "ceilings": {},
    }
    for backend in plan.backends:
        with running(backend, plan.processes) as server:
            key = server.register()
            secret = httpx.get(f"{server.http_url}/v1/auth/webhook-secret", headers=auth(key)).json()
            results: dict[str, Any] = {}
            claim_seconds = 5 * scale + 1
            with phase(f"{backend} G4 batch claim + complete, {WORKERS} workers", expected=claim_seconds):
                results["G4"] = asyncio.run(batch_claims(server, key, int(20000 * scale), claim_seconds))
            for goal, protocol, label in (
                ("G5", "daemon", "the CueAPI worker daemon's cycle (list, claim, report)"),
                ("G5fresh", "daemon-fresh", "the daemon's cycle, a new connection per request"),
                ("G5next", "next", "claim-next + report"),
            ):
                with phase(f"{backend} {goal} {label} over REST, {WORKERS} workers", expected=claim_seconds):
                    results[goal] = asyncio.run(
                        claim_cycles(server, key, int(5000 * scale), claim_seconds, protocol)
                    )
            with phase(f"{backend} G6 pickup by a long-polling worker", expected=4 * scale + 1.5):
                results["G6"] = asyncio.run(pickup(server, key, 50, 4 * scale + 1))
            for goal, cues, schedules in (
                ("G7", int(1000 * scale), ()),
                ("G8", int(10000 * scale), ()),
                ("G8cron", int(10000 * scale), CRON_SCHEDULES),
            ):
                kind = f"recurring cues on {len(schedules)} schedules" if schedules else "cues"
                with phase(f"{backend} {goal} fire lag, {cues} {kind} due in one second", expected=7):
                    results[goal] = fire_lag(server, key, cues, schedules=schedules)
            cues = int(STEADY_CUES * scale)
            with phase(
                f"{backend} schedule lag, {cues} cues due one at a time",
                expected=7 + cues * STEADY_SPACING,
            ):
                results["steady"] = fire_lag(server, key, cues, STEADY_SPACING)
            with phase(f"{backend} G9 webhooks at 200/s, receiver takes 100 ms", expected=3 * scale + 1):
                results["G9"] = asyncio.run(
                    webhooks(server, key, secret["webhook_secret"], 200, 3 * scale + 1)
                )
            if backend == "postgres":
                document["postgres"] = postgres_facts(server)
                claims = SkipLockedClaims(server.database_url)
                ceiling = median_of(
                    f"ceiling: SKIP LOCKED claim loop, {WORKERS} connections",
                    plan,
                    functools.partial(
                        claims.run, WORKERS, int(MAX_CLAIM_RATE * plan.timed), plan.seconds, plan.warmup
                    ),
                )
                document["ceilings"]["postgres_claim"] = ceiling
                for goal in CEILED:
                    results[goal]["of_ceiling"] = against(
                        results[goal]["per_second"], "postgres_claim", ceiling["per_second"]
                    )
            document["results"][backend] = results
    return document


# The claim results as the table names them, and whether their cycle can lose claims.
CLAIM_LABELS = (
    ("G4", "G4 batch claim + complete", False),
    ("G5", "G5 CueAPI worker daemon's cycle (REST: list, claim, report)", True),
    ("G5fresh", "G5 the same, a new connection per request (as the daemon's client opens them)", True),
    ("G5next", "G5 claim-next + report (REST)", False),
)


def _claim_row(backend: str, label: str, result: dict[str, Any], losing: bool) -> tuple[str, ...]:
    checks = f"double claims {result['double_claims']}"
    if losing:
        checks = f"lost claims (409) per cycle {result['lost_claims_per_cycle']}, {checks}"
    ceiling = share(result["of_ceiling"]) if "of_ceiling" in result else ""
    return (backend, label, f"{result['per_second']:,}/s", checks, ceiling)


def render(document: dict[str, Any]) -> str:
    rows = []
    for backend, r in document["results"].items():
        g6, g7, g8, g9 = (r[g] for g in ("G6", "G7", "G8", "G9"))
        steady, g8cron = r["steady"], r["G8cron"]
        rows += [_claim_row(backend, label, r[goal], losing) for goal, label, losing in CLAIM_LABELS]
        rows += [
            (backend, "G6 pickup (long poll)", f"p50 {g6['p50_ms']} ms", f"p99 {g6['p99_ms']} ms", ""),
            (
                backend,
                f"G7 fire lag, {g7['cues']} cues",
                f"p50 {g7['p50_ms']} ms, p99 {g7['p99_ms']} ms",
                f"max {g7['max_ms']} ms, duplicates {g7['duplicates']}",
                "",
            ),
            (
                backend,
                f"schedule lag, {steady['cues']} cues due one at a time, {STEADY_SPACING:g} s apart",
                f"p50 {steady['p50_ms']} ms, p99 {steady['p99_ms']} ms",
                f"max {steady['max_ms']} ms, fired {steady['fired']}, duplicates {steady['duplicates']}",
                "",
            ),
            (
                backend,
                f"G8 burst, {g8['cues']} cues",
                f"all fired within {g8['all_fired_within_ms']} ms",
                f"fired {g8['fired']}, duplicates {g8['duplicates']}",
                "",
            ),
            (
                backend,
                f"G8 burst, {g8cron['cues']} recurring cues on {len(CRON_SCHEDULES)} cron schedules",
                f"all fired within {g8cron['all_fired_within_ms']} ms",
                f"fired {g8cron['fired']}, duplicates {g8cron['duplicates']}",
                "",
            ),
            (
                backend,
                "G9 webhook start (receiver 100 ms)",
                f"p50 {g9['p50_ms']} ms, p99 {g9['p99_ms']} ms",
                f"{g9['deliveries']}/{g9['fired']} delivered, bad signatures {g9['bad_signatures']}",
                "",
            ),
        ]
    table = markdown_table(["database", "benchmark", "result", "checks", "of ceiling"], rows)
    claim = document["ceilings"].get("postgres_claim")
    if claim is None:
        return table
    ceiling = markdown_table(
        ["ceiling", "clients", "per second", "latency"],
        [
            (
                "PostgreSQL: one row claimed per transaction with FOR UPDATE SKIP LOCKED",
                claim["workers"],
                f"{claim['per_second']:,.0f}",
                f"p50 {claim['p50_ms']} ms, p99 {claim['p99_ms']} ms",
            )
        ],
    )
    return f"{table}\n\n{ceiling}"


if __name__ == "__main__":
    document = main()
    markdown = render(document)
    write("delivery", document, markdown)
    print(markdown)
