"""Three `cueline serve` replicas on one PostgreSQL: no double claim, no double
delivery of an attempt, while workers and the webhook dispatcher of every
replica compete for the same executions."""

from __future__ import annotations

import concurrent.futures
import threading
from collections import Counter

import httpx
import pytest

from tests.integration.test_scheduler import wait_for
from tests.integration.test_webhooks import LOCAL
from tests.support import Receiver, Server, auth, new_database

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
