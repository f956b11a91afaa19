"""The process: graceful shutdown, restarts and crashes, schema policy, the CLI."""

from __future__ import annotations

import importlib.util
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cueline.v1 import executions_pb2, executions_pb2_grpc
from tests.support import ROOT, Server, auth, new_database


def worker_execution(server: Server, key: str) -> str:
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = client.post(
            "/v1/cues",
            json={"name": "c", "transport": "worker", "schedule": {"type": "recurring", "cron": "* * * * *"}},
        ).json()
        return str(client.post(f"/v1/cues/{cue['id']}/fire").json()["id"])


@contextmanager
def database_locked(database_url: str, execution_id: str) -> Iterator[None]:
    """Hold a lock that makes the server's outcome write wait."""
    if database_url.startswith("sqlite"):
        lite = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None)
        lite.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            lite.execute("ROLLBACK")
            lite.close()
    else:
        with psycopg.connect(database_url) as conn:
            conn.execute("SELECT 1 FROM executions WHERE id = %s FOR UPDATE", (execution_id,))
            yield
            conn.rollback()


def test_sigterm_drains_and_finishes_in_flight_calls(database_url: str) -> None:
    server = Server(database_url, env={"CUELINE_SHUTDOWN_DRAIN_SECONDS": "1.5"}).start()
    key = server.register()
    execution_id = worker_execution(server, key)
    result: dict[str, Any] = {}

    def report() -> None:
        response = httpx.post(
            f"{server.http_url}/v1/executions/{execution_id}/outcome",
            json={"success": True},
            headers=auth(key),
            timeout=30,
        )
        result["status"] = response.status_code

    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with database_locked(database_url, execution_id):
            in_flight = threading.Thread(target=report)
            in_flight.start()
            time.sleep(0.5)  # the report is now waiting on the lock
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            check = health.Check(health_pb2.HealthCheckRequest(service=""))
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert httpx.get(f"{server.http_url}/healthz").status_code == 503
        in_flight.join(30)
    assert result == {"status": 200}
    assert server.stop() == 0
    restarted = Server(database_url).start()
    try:
        stored = httpx.get(f"{restarted.http_url}/v1/executions/{execution_id}", headers=auth(key)).json()
        assert stored["outcome_success"] is True
    finally:
        restarted.stop()


def test_waiting_long_polls_answer_when_shutdown_begins(database_url: str) -> None:
    """A long poll waiting for work answers (with nothing) as soon as the
    shutdown begins, instead of holding it until the grace period cuts it off."""
    server = Server(database_url, env={"CUELINE_SHUTDOWN_GRACE_SECONDS": "30"}).start()
    key = server.register()
    answers: dict[str, Any] = {}

    def poll_grpc() -> None:
        with grpc.insecure_channel(server.grpc_target) as channel:
            answers["grpc"] = executions_pb2_grpc.ExecutionServiceStub(channel).ClaimExecutions(
                executions_pb2.ClaimExecutionsRequest(worker_id="w", max_executions=5, wait_seconds=60),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=60,
            )

    def poll_rest() -> None:
        answers["rest"] = httpx.post(
            f"{server.http_url}/v1/executions/claim-batch",
            json={"worker_id": "w", "max_executions": 5, "wait_seconds": 60},
            headers=auth(key),
            timeout=60,
        )

    polls = [threading.Thread(target=poll_grpc), threading.Thread(target=poll_rest)]
    for poll in polls:
        poll.start()
    time.sleep(1.0)  # both are parked in their waits
    assert server.process is not None and not answers
    assert server.stop() == 0
    for poll in polls:
        poll.join(60)
    # Held to the grace's end instead, they would be cut off: UNAVAILABLE and a 500.
    assert list(answers["grpc"].claims) == []
    assert answers["rest"].status_code == 200 and answers["rest"].json()["claims"] == []


def test_accepted_writes_survive_a_crash(database_url: str) -> None:
    server = Server(database_url).start()
    key = server.register()
    execution_id = worker_execution(server, key)
    recorded = httpx.post(
        f"{server.http_url}/v1/executions/{execution_id}/outcome",
        json={"success": True, "external_id": "job-1"},
        headers=auth(key),
    )
    assert recorded.status_code == 200
    server.stop(signal.SIGKILL)
    restarted = Server(database_url).start()
    try:
        with httpx.Client(base_url=restarted.http_url, headers=auth(key)) as client:
            stored = client.get(f"/v1/executions/{execution_id}").json()
            assert stored["outcome"]["external_id"] == "job-1"
            again = client.post(f"/v1/executions/{execution_id}/outcome", json={"success": False})
            assert again.status_code == 409
    finally:
        restarted.stop()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cueline_server", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_refuses_an_old_schema_unless_migrating(database_url: str) -> None:
    server = Server(database_url, env={"CUELINE_AUTO_MIGRATE": "false"})
    with pytest.raises(RuntimeError, match="cueline db upgrade"):
        server.start()
    assert server.process is not None and server.process.returncode == 1
    upgraded = cli("db", "upgrade", "--database-url", database_url)
    assert upgraded.returncode == 0 and "schema at revision" in upgraded.stdout
    current = cli("db", "current", "--database-url", database_url)
    assert current.stdout.strip() == upgraded.stdout.split()[-1]
    Server(database_url, env={"CUELINE_AUTO_MIGRATE": "false"}).start().stop()


def test_keys_create_works_with_registration_off(database_url: str) -> None:
    created = cli("keys", "create", "--email", "ops@example.com", "--database-url", database_url)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("cue_sk_") and len(key) == 39
    server = Server(database_url, env={"CUELINE_ALLOW_REGISTER": "false"}).start()
    try:
        assert (
            httpx.get(f"{server.http_url}/v1/auth/me", headers=auth(key)).json()["email"] == "ops@example.com"
        )
        refused = httpx.post(f"{server.http_url}/v1/auth/register", json={"email": "new@example.com"})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    finally:
        server.stop()
    duplicate = cli("keys", "create", "--email", "OPS@example.com", "--database-url", database_url)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr


@pytest.mark.parametrize("args", [[], ["serve"], ["db"], ["db", "upgrade"], ["keys", "create"]])
def test_help_everywhere(args: list[str]) -> None:
    shown = cli(*args, "--help")
    assert shown.returncode == 0 and "usage: cueline" in shown.stdout


@pytest.mark.postgres
def test_recovers_when_postgresql_drops_its_connections(postgres_admin_url: str) -> None:
    """Every server connection is terminated (a failover, a restarted
    database). A call that meets a dead connection gets 503, never 500, and
    its retry is served; once one call has met a dead connection, the others
    idle beside it are not handed out again."""
    database_url = new_database(postgres_admin_url)
    server = Server(database_url).start()
    try:
        key = server.register()
        with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
            schedule = {"type": "recurring", "cron": "0 0 1 1 *"}
            cue = client.post("/v1/cues", json={"name": "c", "transport": "worker", "schedule": schedule})
            fire = f"/v1/cues/{cue.json()['id']}/fire"
            first, second = (client.post(fire).json()["id"] for _ in range(2))
            assert client.post(f"/v1/executions/{first}/claim", json={"worker_id": "w"}).status_code == 200

            def burst() -> set[int]:
                """Eight concurrent calls, so that several connections are in use."""
                with ThreadPoolExecutor(8) as pool:
                    calls = [pool.submit(client.get, "/v1/executions/claimable") for _ in range(8)]
                    return {call.result().status_code for call in calls}

            assert burst() == {200}
            with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (database_url.rsplit("/", 1)[1],),
                ).fetchone()
            assert killed is not None and killed[0] > 1

            def served(method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
                response = client.request(method, path, json=body)
                if response.status_code == 503:
                    assert response.json()["error"]["code"] == "service_unavailable"
                    response = client.request(method, path, json=body)
                assert response.status_code == 200, response.text
                return response

            served("POST", f"/v1/executions/{first}/outcome", {"success": True})
            assert burst() == {200}
            served("POST", f"/v1/executions/{second}/claim", {"worker_id": "w"})
            served("POST", f"/v1/executions/{second}/outcome", {"success": False})
            stored = [served("GET", f"/v1/executions/{e}").json()["outcome"] for e in (first, second)]
            assert [outcome["success"] for outcome in stored] == [True, False]
    finally:
        server.stop()


def test_several_processes_need_postgresql(tmp_path: Path) -> None:
    server = Server(f"sqlite:///{tmp_path / 'cueline.db'}", env={"CUELINE_PROCESSES": "2"})
    with pytest.raises(RuntimeError, match="CUELINE_PROCESSES above 1 needs PostgreSQL"):
        server.start()
    assert server.process is not None and server.process.returncode == 1
    server = Server(f"sqlite:///{tmp_path / 'cueline.db'}", env={"CUELINE_PROCESSES": "0"})
    with pytest.raises(RuntimeError, match="CUELINE_PROCESSES must be at least 1"):
        server.start()


def test_a_negative_connection_age_is_refused(tmp_path: Path) -> None:
    server = Server(
        f"sqlite:///{tmp_path / 'cueline.db'}", env={"CUELINE_GRPC_MAX_CONNECTION_AGE_SECONDS": "-1"}
    )
    with pytest.raises(RuntimeError, match="CUELINE_GRPC_MAX_CONNECTION_AGE_SECONDS must be 0"):
        server.start()
    assert server.process is not None and server.process.returncode == 1


def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    """A port another program holds stops the start with a message naming it,
    for either transport."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for transport, variable in (("gRPC", "CUELINE_GRPC_PORT"), ("HTTP", "CUELINE_HTTP_PORT")):
            server = Server(f"sqlite:///{tmp_path / 'cueline.db'}", env={variable: str(port)})
            with pytest.raises(RuntimeError, match=f"cannot serve {transport} on 127.0.0.1:{port}"):
                server.start()
            assert server.process is not None and server.process.returncode == 1


def test_a_database_it_cannot_reach_is_named() -> None:
    """A database that refuses the connection stops the start, and the schema
    commands, with one line saying so and the driver's reason, without a
    traceback."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        url = f"postgresql://cueline@127.0.0.1:{port}/cueline"
        server = Server(url)
        with pytest.raises(RuntimeError) as stopped:
            server.start()
        upgrade = cli("db", "upgrade", "--database-url", url)
    assert "cueline: cannot use the database: connection failed" in str(stopped.value)
    assert "Traceback" not in str(stopped.value)
    assert server.process is not None and server.process.returncode == 1
    assert upgrade.returncode == 1
    assert upgrade.stderr.startswith("cueline: cannot use the database: connection failed")
    assert upgrade.stderr.count("\n") == 1  # one line


def test_the_event_loop_is_chosen_and_an_unknown_one_refused(tmp_path: Path) -> None:
    """uvloop by default where it is installed; asyncio's own loop on request,
    serving both transports the same; an unknown name is refused at start."""
    url = f"sqlite:///{tmp_path / 'cueline.db'}"
    installed = importlib.util.find_spec("uvloop") is not None
    choices = [("auto", "loop=uvloop" if installed else "loop=asyncio"), ("asyncio", "loop=asyncio")]
    if installed:
        choices.append(("uvloop", "loop=uvloop"))
    for choice, expected in choices:
        server = Server(url, env={"CUELINE_EVENT_LOOP": choice}).start()
        try:
            assert expected in server.log_path.read_text()
            key = server.register()
            with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
                assert client.get("/v1/auth/me").status_code == 200
            with grpc.insecure_channel(server.grpc_target) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            server.stop()
    server = Server(url, env={"CUELINE_EVENT_LOOP": "trio"})
    with pytest.raises(RuntimeError, match="CUELINE_EVENT_LOOP must be one of auto, uvloop, asyncio"):
        server.start()
    assert server.process is not None and server.process.returncode == 1
