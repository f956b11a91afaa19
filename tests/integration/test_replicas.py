"""Replicas on one PostgreSQL: three `cueline serve` never double-claim or
double-deliver; the processes of one `cueline serve` share its ports and stop
together; new work is announced from one process to the others; a gRPC
channel moves between processes as its connection ages."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cueline.v1 import accounts_pb2, accounts_pb2_grpc, executions_pb2, executions_pb2_grpc
from cueline_server.services.cues import NewWork
from cueline_server.store.database import Database
from cueline_server.store.work_signal import WorkSignal
from tests.integration.test_scheduler import wait_for
from tests.integration.test_webhooks import LOCAL
from tests.integration.test_worker_transport import fire, worker_cue
from tests.support import Receiver, Server, auth, bearer, new_database

pytestmark = pytest.mark.postgres


def test_three_replicas_never_double_claim_or_double_deliver(postgres_admin_url: str) -> None:
    url = new_database(postgres_admin_url)
    receiver = Receiver()
    replicas = [Server(url, env=LOCAL).start() for _ in range(3)]
    try:
        key = replicas[0].register()
        with httpx.Client(base_url=replicas[0].http_url, headers=auth(key)) as client:
            schedule = {"type": "recurring", "cron": "0 0 1 1 *"}
            worker = client.post(
                "/v1/cues",
                json={"name": "w", "transport": "worker", "payload": {"task": "t"}, "schedule": schedule},
            ).json()
            hook = client.post(
                "/v1/cues", json={"name": "h", "callback": {"url": receiver.url("/in")}, "schedule": schedule}
            ).json()
        claimable: set[str] = set()
        delivered: set[str] = set()
        for index in range(60):  # fires spread over the replicas
            with httpx.Client(base_url=replicas[index % 3].http_url, headers=auth(key)) as client:
                claimable.add(client.post(f"/v1/cues/{worker['id']}/fire").json()["id"])
                delivered.add(client.post(f"/v1/cues/{hook['id']}/fire").json()["id"])

        claims: Counter[str] = Counter()
        lock = threading.Lock()

        def worker_loop(index: int) -> None:
            replica = replicas[index % 3]
            with httpx.Client(base_url=replica.http_url, headers=auth(key)) as client:
                while True:
                    response = client.post("/v1/executions/claim", json={"worker_id": f"w{index}"})
                    if response.status_code == 409:
                        return
                    assert response.status_code == 200, response.text
                    execution_id = response.json()["execution_id"]
                    with lock:
                        claims[execution_id] += 1
                    client.post(f"/v1/executions/{execution_id}/outcome", json={"success": True})

        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            for finished in [pool.submit(worker_loop, i) for i in range(9)]:
                finished.result(timeout=120)  # a worker's failed assertion fails the test
        assert set(claims) == claimable and set(claims.values()) == {1}

        wait_for(
            lambda: len({r.headers["X-CueAPI-Execution-Id"] for r in receiver.to("/in")}) == 60, timeout=60
        )
        per_execution = Counter(r.headers["X-CueAPI-Execution-Id"] for r in receiver.to("/in"))
        assert set(per_execution) == delivered and set(per_execution.values()) == {1}
    finally:
        for replica in replicas:
            replica.stop()
        receiver.close()


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def test_processes_share_the_ports_and_stop_together(postgres_admin_url: str) -> None:
    """CUELINE_PROCESSES=2: two children serve the same ports with one action
    secret key; when one dies, the other is stopped and the supervisor fails."""
    server = Server(
        new_database(postgres_admin_url), env={"CUELINE_PROCESSES": "2", "CUELINE_ACCESS_LOG": "true"}
    )
    server.start()
    try:
        assert server.process is not None
        wait_for(lambda: server.log().count("cueline serving") == 2)
        children = _children(server.process.pid)
        assert len(children) == 2
        secrets = {_environment(child)["CUELINE_ACTION_SECRET_KEYS"] for child in children}
        assert len(secrets) == 1 and secrets != {""}

        key = server.register()
        for _ in range(40):  # a new connection each: the kernel spreads them over the children
            assert httpx.get(f"{server.http_url}/v1/auth/me", headers=auth(key)).status_code == 200
        for _ in range(10):
            with grpc.insecure_channel(server.grpc_target) as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
        answered_by = set(
            re.findall(r"\[pid=(\d+) [^]]*\] /cueline\.v1\.AccountService/GetAccount ok", server.log())
        )
        assert answered_by == {str(child) for child in children}

        os.kill(children[0], signal.SIGKILL)
        assert server.process.wait(30) == 1
        assert not Path(f"/proc/{children[1]}").exists()
        assert f"server process {children[0]} exited -9: stopping the others" in server.log()
    finally:
        if server.process is not None and server.process.poll() is None:
            server.stop()


def test_processes_stop_cleanly_on_sigterm(postgres_admin_url: str) -> None:
    """SIGTERM to the supervisor reaches every child; each shuts down gracefully
    and the supervisor exits 0."""
    server = Server(new_database(postgres_admin_url), env={"CUELINE_PROCESSES": "2"}).start()
    assert server.process is not None
    wait_for(lambda: server.log().count("cueline serving") == 2)
    children = _children(server.process.pid)
    assert server.stop() == 0
    assert len(re.findall(r"^.*\[pid=\d+ [^]]*\] stopped$", server.log(), re.MULTILINE)) == 2
    assert not any(Path(f"/proc/{child}").exists() for child in children)


def test_processes_stop_when_their_supervisor_is_killed(postgres_admin_url: str) -> None:
    """A supervisor killed outright (SIGKILL) cannot pass anything on: its
    children notice it is gone and stop themselves, freeing the ports."""
    server = Server(new_database(postgres_admin_url), env={"CUELINE_PROCESSES": "2"}).start()
    assert server.process is not None
    wait_for(lambda: server.log().count("cueline serving") == 2)
    children = _children(server.process.pid)
    assert len(children) == 2
    server.process.kill()
    server.process.wait(10)
    wait_for(lambda: not any(Path(f"/proc/{child}").exists() for child in children), timeout=30)
    assert server.log().count(f"the supervisor (pid {server.process.pid}) is gone: stopping") == 2


def test_new_work_is_announced_to_the_other_processes(postgres_admin_url: str) -> None:
    """WorkSignal on a real PostgreSQL: what one process announces wakes the
    other's waiters (one wake per execution), never its own; webhook work is not
    announced; a payload too large for NOTIFY becomes "everything"; a malformed
    notification is ignored and listening goes on."""
    url = new_database(postgres_admin_url)
    account = uuid.uuid4()

    async def scenario() -> tuple[list[Any], list[Any]]:
        db = Database(url)
        heard: tuple[list[Any], list[Any]] = ([], [])
        signals = [WorkSignal(db.connect_args(), heard[i].append) for i in (0, 1)]
        stopping = asyncio.Event()
        running = [asyncio.create_task(s.run(stopping)) for s in signals]

        async def until(check: Any) -> None:
            for _ in range(1000):
                if check():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"condition not met in time: {heard}")

        def tasks_heard(index: int) -> Counter[str | None]:
            return Counter(work.task for batch in heard[index] if batch for work in batch)

        try:
            await until(lambda: heard[0] == [None] and heard[1] == [None])  # listening: each wakes all once
            heard[1].clear()
            signals[0].announce([NewWork(account, "worker", "t1"), NewWork(account, "webhook", None)])
            signals[0].announce([NewWork(account, "worker", None), NewWork(account, "worker", "t1")])
            await until(lambda: tasks_heard(1) == Counter({"t1": 2, None: 1}))
            assert {work.account_id for batch in heard[1] for work in batch} == {account}

            async with await psycopg.AsyncConnection.connect(**db.connect_args(), autocommit=True) as conn:
                await conn.execute("SELECT pg_notify('cueline_work', '{\"from\": 1, \"work\": [[1, 2, 3]]}')")
            signals[0].announce([NewWork(uuid.uuid4(), "worker", "x" * 100) for _ in range(200)])
            await until(lambda: heard[1][-1] is None)

            # Notifications reach each listener in the order they were sent: once
            # process 0 hears process 1, it has had every one of its own.
            signals[1].announce([NewWork(account, "worker", "from-1")])
            await until(lambda: tasks_heard(0)["from-1"] == 1)
        finally:
            stopping.set()
            await asyncio.gather(*running)
            await db.dispose()
        return heard

    own, other = asyncio.run(scenario())
    assert own[0] is None and [work.task for work in own[1]] == ["from-1"] and len(own) == 2
    assert other[-1] is None


def test_a_long_poll_on_one_replica_wakes_for_work_fired_on_another(postgres_admin_url: str) -> None:
    """The waiting replica re-checks only every 60 s and its claim waits up to
    60 s: without the announcement, the answer could come no sooner than that,
    so the test's 30 s bound (a wide margin, not a speed goal) tells a wake-up
    from the final look."""
    url = new_database(postgres_admin_url)
    firing = Server(url).start()
    waiting = Server(url, env={"CUELINE_CLAIM_RECHECK_SECONDS": "60"}).start()
    try:
        key = firing.register()
        with httpx.Client(base_url=firing.http_url, headers=auth(key)) as client:
            cue = worker_cue(client, task="wake")
            with (
                grpc.insecure_channel(waiting.grpc_target) as channel,
                concurrent.futures.ThreadPoolExecutor(1) as pool,
            ):
                claims = executions_pb2_grpc.ExecutionServiceStub(channel)
                request = executions_pb2.ClaimExecutionsRequest(
                    worker_id="w1", task="wake", max_executions=5, wait_seconds=60
                )
                waiter = pool.submit(claims.ClaimExecutions, request, metadata=bearer(key))
                time.sleep(1)  # its first look finds nothing, and it parks
                fired = fire(client, cue["id"])
                answer = waiter.result(timeout=30)  # concurrent.futures.TimeoutError without a wake-up
        assert [c.execution_id for c in answer.claims] == [fired]
    finally:
        firing.stop()
        waiting.stop()


def test_an_aging_grpc_connection_moves_the_channel_between_processes(postgres_admin_url: str) -> None:
    """With a maximum connection age, one long-lived channel reconnects now and
    then (GOAWAY), so the kernel hands it to either process; no call fails on
    the way."""
    server = Server(
        new_database(postgres_admin_url),
        env={
            "CUELINE_PROCESSES": "2",
            "CUELINE_ACCESS_LOG": "true",
            "CUELINE_GRPC_MAX_CONNECTION_AGE_SECONDS": "0.3",
        },
    ).start()
    try:
        assert server.process is not None
        wait_for(lambda: server.log().count("cueline serving") == 2)
        children = {str(child) for child in _children(server.process.pid)}
        key = server.register()
        answered_by: set[str] = set()
        calls = 0
        with grpc.insecure_channel(server.grpc_target) as channel:
            accounts = accounts_pb2_grpc.AccountServiceStub(channel)
            deadline = time.monotonic() + 60
            while answered_by != children and time.monotonic() < deadline:
                accounts.GetAccount(accounts_pb2.GetAccountRequest(), metadata=bearer(key), timeout=10)
                calls += 1
                pattern = r"\[pid=(\d+) [^]]*\] /cueline\.v1\.AccountService/GetAccount ok"
                answered_by = set(re.findall(pattern, server.log()))
                time.sleep(0.02)
        assert answered_by == children, (calls, answered_by)
    finally:
        server.stop()
