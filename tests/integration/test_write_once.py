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


def test_refused_reports_of_two_accounts_get_their_own_answers(server: Server) -> None:
    """Why a report was refused is read for many reports at once, across
    accounts: each still learns only about its own account's executions
    (409 for its own, 404 for another's, which stays unreported)."""
    keys = [server.register(), server.register()]
    recorded: dict[str, list[str]] = {}
    pending: dict[str, str] = {}
    for key in keys:
        with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
            cue = client.post(
                "/v1/cues",
                json={
                    "name": "refusals",
                    "transport": "worker",
                    "schedule": {"type": "recurring", "cron": "0 0 1 1 *"},
                },
            ).json()
            fired = [client.post(f"/v1/cues/{cue['id']}/fire").json()["id"] for _ in range(EXECUTIONS + 1)]
            for execution_id in fired[:-1]:
                assert (
                    client.post(f"/v1/executions/{execution_id}/outcome", json={"success": True}).status_code
                    == 200
                )
            recorded[key], pending[key] = fired[:-1], fired[-1]
    answers: Counter[tuple[str, str]] = Counter()  # (whose execution, answer)
    lock = threading.Lock()
    start = threading.Barrier(WRITERS)

    def writer(index: int) -> None:
        key = keys[index % 2]
        targets = [
            (owner, e)
            for owner in keys
            for e in (*recorded[owner], pending[owner])
            if owner != key or e != pending[key]
        ]
        rest = httpx.Client(base_url=server.http_url, headers=auth(key), timeout=30)
        channel = grpc.insecure_channel(server.grpc_target)
        stub = outcomes_pb2_grpc.OutcomeServiceStub(channel)
        start.wait()
        for owner, execution_id in targets:
            whose = "own" if owner == key else "other's"
            if index % 4 < 2:
                response = rest.post(f"/v1/executions/{execution_id}/outcome", json={"success": False})
                answer = str(response.status_code)
            else:
                try:
                    stub.RecordOutcome(
                        outcomes_pb2.RecordOutcomeRequest(execution_id=execution_id, success=False),
                        metadata=bearer(key),
                    )
                    answer = "OK"
                except grpc.RpcError as error:
                    answer = error.code().name
            with lock:
                answers[whose, answer] += 1
        rest.close()
        channel.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    per_transport = WRITERS // 2
    assert answers == {
        ("own", "409"): per_transport * EXECUTIONS,
        ("own", "ALREADY_EXISTS"): per_transport * EXECUTIONS,
        ("other's", "404"): per_transport * (EXECUTIONS + 1),
        ("other's", "NOT_FOUND"): per_transport * (EXECUTIONS + 1),
    }
    for key in keys:
        with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
            assert client.get(f"/v1/executions/{pending[key]}").json()["outcome"] is None


Request = tuple[str, str, str, dict[str, object] | None]  # kind, verb, path, JSON body


def test_a_cue_deleted_amid_its_work_gets_only_documented_answers(server: Server) -> None:
    """Fires, claims, reports and edits racing the cue's deletion: each is answered as
    if it came before the delete or after it, never with a server error. (An edit
    that found the cue gone, and a report that deadlocked with the delete's cascade,
    got 500s.)"""
    key = server.register()
    allowed = {
        "fire": {200, 404},
        "claim": {200, 409},
        "outcome": {200, 404, 409},
        "patch": {200, 404},
        "delete": {204},
    }
    seen: Counter[tuple[str, int]] = Counter()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        for round_ in range(20):
            body = {"name": f"doomed-{round_}", "transport": "worker", "schedule": {"type": "recurring",
                    "cron": "* * * * *"}}  # fmt: skip
            cue = client.post("/v1/cues", json=body).json()["id"]
            executions = [client.post(f"/v1/cues/{cue}/fire").json()["id"] for _ in range(3)]
            requests: list[Request] = [("delete", "DELETE", f"/v1/cues/{cue}", None)]
            for i in range(11):
                execution = executions[i % 3]
                kinds: list[Request] = [
                    ("fire", "POST", f"/v1/cues/{cue}/fire", {}),
                    ("claim", "POST", f"/v1/executions/{execution}/claim", {"worker_id": f"w{i}"}),
                    ("outcome", "POST", f"/v1/executions/{execution}/outcome", {"success": True}),
                    ("patch", "PATCH", f"/v1/cues/{cue}", {"description": f"edit {i}"}),
                ]
                requests.append(kinds[i % 4])
            start = threading.Barrier(len(requests))

            def send(
                start: threading.Barrier, kind: str, verb: str, path: str, body: dict[str, object] | None
            ) -> None:
                with httpx.Client(base_url=server.http_url, headers=auth(key)) as own:
                    start.wait()
                    seen[(kind, own.request(verb, path, json=body).status_code)] += 1

            threads = [threading.Thread(target=send, args=(start, *request)) for request in requests]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    unexpected = {k: n for k, n in seen.items() if k[1] not in allowed[k[0]]}
    assert not unexpected, (unexpected, seen)
    assert seen[("delete", 204)] == 20
