"""The delivery paths under concurrency, against the real server on both
databases: webhooks over kept-alive connections, results of concurrent
deliveries stored together, long polls woken for their own work, and
scheduler passes that fire many cues in parallel batches."""

from __future__ import annotations

import concurrent.futures
import http.server
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from cueline.v1 import executions_pb2, executions_pb2_grpc
from tests.integration.test_scheduler import executions_of, once_cue, soon, wait_for
from tests.integration.test_webhooks import execution, webhook_cue
from tests.integration.test_worker_transport import fire, worker_cue
from tests.support import Server, auth, bearer, signed

LOCAL = {
    "CUELINE_ALLOW_PRIVATE_CALLBACKS": "true",
    "CUELINE_ALLOW_HTTP_CALLBACKS": "true",
    "CUELINE_SCHEDULER_POLL_SECONDS": "0.2",
    "CUELINE_DEFAULT_ACTIVE_CUE_LIMIT": "1000",
}


@pytest.fixture
def local(database_url: str) -> Iterator[Server]:
    running = Server(database_url, env=LOCAL).start()
    yield running
    running.stop()


class KeepAliveReceiver:
    """An HTTP/1.1 receiver that counts connections. With `drop_idle` it closes
    each connection right after answering, without saying so (no
    `Connection: close`), as receivers with a short idle timeout do."""

    def __init__(self, reply: bytes = b"{}", *, drop_idle: bool = False) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.connections = 0
        lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                with lock:
                    outer.connections += 1
                super().setup()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with lock:
                    outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                self.wfile.flush()
                if drop_idle:
                    self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_webhooks_reuse_a_kept_alive_connection(local: Server) -> None:
    receiver = KeepAliveReceiver()
    key = local.register()
    try:
        with httpx.Client(base_url=local.http_url, headers=auth(key)) as client:
            secret = client.get("/v1/auth/webhook-secret").json()["webhook_secret"]
            cue = webhook_cue(client, receiver.url)
            for _ in range(3):
                fired = client.post(f"/v1/cues/{cue['id']}/fire").json()
                wait_for(lambda fired=fired: execution(client, fired["id"])["status"] == "success")
        assert len(receiver.requests) == 3
        assert all(signed(secret, headers, body) for headers, body in receiver.requests)
        assert receiver.connections == 1
    finally:
        receiver.close()


def test_a_connection_the_receiver_dropped_is_not_a_failed_attempt(local: Server) -> None:
    receiver = KeepAliveReceiver(drop_idle=True)
    key = local.register()
    try:
        with httpx.Client(base_url=local.http_url, headers=auth(key)) as client:
            cue = webhook_cue(client, receiver.url)
            ids = []
            for _ in range(3):
                fired = client.post(f"/v1/cues/{cue['id']}/fire").json()
                wait_for(lambda fired=fired: execution(client, fired["id"])["status"] == "success")
                ids.append(fired["id"])
            for execution_id in ids:
                stored = execution(client, execution_id)
                assert stored["attempts"] == 1 and stored["error_message"] is None
        assert len(receiver.requests) == 3 and receiver.connections == 3
    finally:
        receiver.close()


def test_concurrent_deliveries_are_each_sent_and_stored_once(local: Server) -> None:
    receiver = KeepAliveReceiver(reply=b'{"success": true, "external_id": "batch"}')
    key = local.register()
    try:
        with httpx.Client(base_url=local.http_url, headers=auth(key)) as client:
            secret = client.get("/v1/auth/webhook-secret").json()["webhook_secret"]
            cue = webhook_cue(client, receiver.url)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                ids = list(
                    pool.map(
                        lambda _: httpx.post(
                            f"{local.http_url}/v1/cues/{cue['id']}/fire", headers=auth(key)
                        ).json()["id"],
                        range(40),
                    )
                )

            def stored() -> list[dict[str, Any]]:
                page = client.get(f"/v1/executions?cue_id={cue['id']}&limit=100").json()["executions"]
                return list(page)

            wait_for(lambda: sum(1 for e in stored() if e["outcome"] is not None) == 40)
            for item in stored():
                assert item["status"] == "success" and item["attempts"] == 1 and item["http_status"] == 200
                assert item["outcome"]["success"] is True and item["outcome"]["external_id"] == "batch"
            assert client.get(f"/v1/cues/{cue['id']}").json()["run_count"] == 40
        sent = Counter(headers["x-cueapi-execution-id"] for headers, _ in receiver.requests)
        assert sent == Counter(ids)
        assert all(signed(secret, headers, body) for headers, body in receiver.requests)
    finally:
        receiver.close()


def _long_poll(server: Server, key: str, worker: str, task: str, wait: float) -> list[str]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = executions_pb2_grpc.ExecutionServiceStub(channel)
        response = stub.ClaimExecutions(
            executions_pb2.ClaimExecutionsRequest(
                worker_id=worker, task=task, max_executions=1, wait_seconds=int(wait)
            ),
            metadata=bearer(key),
        )
    return [claim.execution_id for claim in response.claims]


def test_a_long_poll_receives_work_of_its_own_task(local: Server) -> None:
    key = local.register()
    with (
        httpx.Client(base_url=local.http_url, headers=auth(key)) as client,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        reports = worker_cue(client, name="reports", task="report")
        exports = worker_cue(client, name="exports", task="export")
        waiting_report = pool.submit(_long_poll, local, key, "w-report", "report", 20)
        waiting_export = pool.submit(_long_poll, local, key, "w-export", "export", 20)
        time.sleep(0.5)  # both parked in their long polls
        report = fire(client, reports["id"])
        assert waiting_report.result(timeout=30) == [report]
        assert not waiting_export.done()
        export = fire(client, exports["id"])
        assert waiting_export.result(timeout=30) == [export]


def test_waiting_workers_share_new_work_without_double_claims(local: Server) -> None:
    key = local.register()
    with (
        httpx.Client(base_url=local.http_url, headers=auth(key)) as client,
        concurrent.futures.ThreadPoolExecutor(6) as pool,
    ):
        cue = worker_cue(client, name="shared", task="shared")
        waiting = [pool.submit(_long_poll, local, key, f"w{i}", "shared", 20) for i in range(6)]
        time.sleep(0.5)
        fired = [fire(client, cue["id"]) for _ in range(6)]
        claimed = [execution_id for future in waiting for execution_id in future.result(timeout=30)]
    assert sorted(claimed) == sorted(fired)


def test_cues_due_together_beyond_one_batch_each_fire_once(local: Server) -> None:
    key = local.register()
    at = soon(20)  # far enough ahead for 260 creations on a slow machine; the cues still fire together
    with httpx.Client(base_url=local.http_url, headers=auth(key)) as client:
        cue_ids = [once_cue(client, f"together-{i}", at)["id"] for i in range(260)]

        def fired() -> int:
            page = client.get("/v1/executions?limit=100&offset=0").json()
            return int(page["total"])

        wait_for(lambda: fired() >= len(cue_ids), timeout=60)
        time.sleep(1)
        assert fired() == len(cue_ids)
        for cue_id in cue_ids[:: len(cue_ids) // 10]:
            assert len(executions_of(client, cue_id)) == 1
