"""Write-once under contention: racing writers over gRPC and REST, exactly one winner."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import httpx

from cueline.v1 import outcomes_pb2, outcomes_pb2_grpc
from tests.support import Server, auth, bearer

WRITERS = 16
EXECUTIONS = 10
# Reports sent at once in the flood test.
FLOOD = 3000


def fire_worker_cue(
    client: httpx.Client, name: str, count: int, cron: str = "0 0 1 1 *"
) -> tuple[str, list[str]]:
    """A new worker cue's id, and the ids of `count` executions fired from it."""
    body = {"name": name, "transport": "worker", "schedule": {"type": "recurring", "cron": cron}}
    cue = client.post("/v1/cues", json=body).json()["id"]
    return cue, [client.post(f"/v1/cues/{cue}/fire").json()["id"] for _ in range(count)]


class Reporter:
    """One writer's connections: reports an outcome over REST or gRPC and
    answers with the HTTP status ("409") or the gRPC code's name ("ALREADY_EXISTS")."""

    def __init__(self, server: Server, key: str) -> None:
        self._key = key
        self._rest = httpx.Client(base_url=server.http_url, headers=auth(key), timeout=30)
        self._channel = grpc.insecure_channel(server.grpc_target)
        self._stub = outcomes_pb2_grpc.OutcomeServiceStub(self._channel)

    def report(self, execution_id: str, *, over_rest: bool, **outcome: Any) -> str:
        if over_rest:
            response = self._rest.post(f"/v1/executions/{execution_id}/outcome", json=outcome)
            return str(response.status_code)
        try:
            self._stub.RecordOutcome(
                outcomes_pb2.RecordOutcomeRequest(execution_id=execution_id, **outcome),
                metadata=bearer(self._key),
            )
        except grpc.RpcError as error:
            return str(error.code().name)
        return "OK"

    def close(self) -> None:
        self._rest.close()
        self._channel.close()


def run_at_once(target: Callable[[int], None], count: int) -> None:
    """target(0) … target(count - 1), each on a thread of its own."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def test_sixteen_racing_writers_one_winner_each(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        _, executions = fire_worker_cue(client, "race", EXECUTIONS, cron="* * * * *")
    results: Counter[str] = Counter()
    winners: Counter[str] = Counter()
    winner_of: dict[str, str] = {}
    lock = threading.Lock()
    start = threading.Barrier(WRITERS)

    def writer(index: int) -> None:
        reporter = Reporter(server, key)
        start.wait()
        for execution_id in executions:
            answer = reporter.report(
                execution_id, over_rest=index % 2 == 1, success=True, result=f"writer {index}"
            )
            outcome = {"200": "won", "OK": "won", "409": "conflict", "ALREADY_EXISTS": "conflict"}.get(
                answer, answer
            )
            with lock:
                results[outcome] += 1
                if outcome == "won":
                    winners[execution_id] += 1
                    winner_of[execution_id] = f"writer {index}"
        reporter.close()

    run_at_once(writer, WRITERS)
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
        cue, executions = fire_worker_cue(client, "settle", count)
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

    run_at_once(report, count)
    assert len(answers) == count
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        assert client.get(f"/v1/cues/{cue}").json()["run_count"] == count // 2
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
            _, fired = fire_worker_cue(client, "refusals", EXECUTIONS + 1)
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
        reporter = Reporter(server, key)
        start.wait()
        for owner, execution_id in targets:
            answer = reporter.report(execution_id, over_rest=index % 4 < 2, success=False)
            with lock:
                answers["own" if owner == key else "other's", answer] += 1
        reporter.close()

    run_at_once(writer, WRITERS)
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
            cue, executions = fire_worker_cue(client, f"doomed-{round_}", 3, cron="* * * * *")
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


def test_a_flood_of_reports_loses_no_answered_one(server: Server) -> None:
    """3,000 reports sent at once on one channel, ten for each execution: more
    calls than grpc's core keeps waiting for a process to take up (1,000), so it
    may shed some with CANCELLED before cueline sees them. Every report answered
    OK is its execution's stored outcome (one per execution), no outcome is stored
    that no call was told of, and every other answer is a conflict or a shed call."""
    key = server.register()
    reports_each = 10
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        _, executions = fire_worker_cue(client, "flood", FLOOD // reports_each)
    with grpc.insecure_channel(server.grpc_target) as channel:
        record = outcomes_pb2_grpc.OutcomeServiceStub(channel).RecordOutcome
        reports = [(executions[n % len(executions)], f"report {n}") for n in range(FLOOD)]
        calls = [
            record.future(
                outcomes_pb2.RecordOutcomeRequest(execution_id=execution_id, success=True, result=result),
                metadata=bearer(key),
                timeout=60,
            )
            for execution_id, result in reports
        ]
        answers = [(*report, call.code().name) for report, call in zip(reports, calls, strict=True)]
    won: dict[str, str] = {}
    for execution_id, result, answer in answers:
        if answer == "OK":
            assert execution_id not in won, f"two reports of {execution_id} were answered OK"
            won[execution_id] = result
        else:
            assert answer in {"ALREADY_EXISTS", "CANCELLED"}, answer
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        stored = {e: client.get(f"/v1/executions/{e}").json()["outcome"] for e in executions}
    assert {e: o["result"] for e, o in stored.items() if o is not None} == won
