"""Write-once under contention: racing writers over gRPC and REST, exactly one winner."""

from __future__ import annotations

import threading
from collections import Counter

import grpc
import httpx

from cueline.v1 import outcomes_pb2, outcomes_pb2_grpc
from tests.support import Server, auth, bearer

WRITERS = 16
EXECUTIONS = 10


def test_sixteen_racing_writers_one_winner_each(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = client.post(
            "/v1/cues",
            json={
                "name": "race",
                "transport": "worker",
                "schedule": {"type": "recurring", "cron": "* * * * *"},
            },
        ).json()
        executions = [client.post(f"/v1/cues/{cue['id']}/fire").json()["id"] for _ in range(EXECUTIONS)]
    results: Counter[str] = Counter()
    winners: Counter[str] = Counter()
    winner_of: dict[str, str] = {}
    lock = threading.Lock()
    start = threading.Barrier(WRITERS)

    def writer(index: int) -> None:
        rest = httpx.Client(base_url=server.http_url, headers=auth(key), timeout=30)
        channel = grpc.insecure_channel(server.grpc_target)
        stub = outcomes_pb2_grpc.OutcomeServiceStub(channel)
        start.wait()
        for execution_id in executions:
            if index % 2:
                response = rest.post(
                    f"/v1/executions/{execution_id}/outcome",
                    json={"success": True, "result": f"writer {index}"},
                )
                outcome = {200: "won", 409: "conflict"}.get(
                    response.status_code, f"http {response.status_code}"
                )
            else:
                try:
                    stub.RecordOutcome(
                        outcomes_pb2.RecordOutcomeRequest(
                            execution_id=execution_id, success=True, result=f"writer {index}"
                        ),
                        metadata=bearer(key),
                    )
                    outcome = "won"
                except grpc.RpcError as error:
                    outcome = (
                        "conflict" if error.code() == grpc.StatusCode.ALREADY_EXISTS else str(error.code())
                    )
            with lock:
                results[outcome] += 1
                if outcome == "won":
                    winners[execution_id] += 1
                    winner_of[execution_id] = f"writer {index}"
        rest.close()
        channel.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {"won": EXECUTIONS, "conflict": EXECUTIONS * (WRITERS - 1)}
    assert winners == dict.fromkeys(executions, 1)
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        for execution_id in executions:
            stored = client.get(f"/v1/executions/{execution_id}").json()["outcome"]
            assert stored["result"] == winner_of[execution_id]  # the stored report is the winner's


def test_concurrent_reports_settle_their_cue_exactly(server: Server) -> None:
    """Reports written together (one batch) count every success on the cue once."""
    key = server.register()
    count = 30
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = client.post(
            "/v1/cues",
            json={
                "name": "settle",
                "transport": "worker",
                "schedule": {"type": "recurring", "cron": "0 0 1 1 *"},
            },
        ).json()
        executions = [client.post(f"/v1/cues/{cue['id']}/fire").json()["id"] for _ in range(count)]
    start = threading.Barrier(count)
    answers: dict[str, str] = {}

    def report(index: int) -> None:
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = outcomes_pb2_grpc.OutcomeServiceStub(channel)
            start.wait()
            response = stub.RecordOutcome(
                outcomes_pb2.RecordOutcomeRequest(execution_id=executions[index], success=index % 2 == 0),
                metadata=bearer(key),
            )
            answers[executions[index]] = outcomes_pb2.OutcomeState.Name(response.outcome_state)

    threads = [threading.Thread(target=report, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == count
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        assert client.get(f"/v1/cues/{cue['id']}").json()["run_count"] == count // 2
        for index, execution_id in enumerate(executions):
            stored = client.get(f"/v1/executions/{execution_id}").json()
            expected = "success" if index % 2 == 0 else "failed"
            assert (
                stored["status"] == expected
                and answers[execution_id]
                == f"OUTCOME_STATE_REPORTED_{'SUCCESS' if index % 2 == 0 else 'FAILURE'}"
            )
