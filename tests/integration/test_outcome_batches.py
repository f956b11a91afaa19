"""RecordOutcomes: many write-once reports in one call, each applied or refused on its own."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from cueline.v1 import executions_pb2, executions_pb2_grpc, outcomes_pb2, outcomes_pb2_grpc
from tests.integration.test_worker_transport import fire, worker_cue
from tests.support import Server, auth, bearer, error_details

Report = outcomes_pb2.RecordOutcomeRequest


@dataclass
class Account:
    """A fresh account, with a REST client and a gRPC channel."""

    key: str
    client: httpx.Client
    channel: grpc.Channel

    def work(self, count: int) -> tuple[str, list[str]]:
        """A worker cue and `count` fired executions of it."""
        cue = str(worker_cue(self.client, name="batch")["id"])
        return cue, [fire(self.client, cue) for _ in range(count)]

    def record(self, *reports: outcomes_pb2.RecordOutcomeRequest) -> outcomes_pb2.RecordOutcomesResponse:
        return outcomes_pb2_grpc.OutcomeServiceStub(self.channel).RecordOutcomes(
            outcomes_pb2.RecordOutcomesRequest(outcomes=reports), metadata=bearer(self.key)
        )

    def stored(self, execution_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/v1/executions/{execution_id}").json())


@pytest.fixture
def account(server: Server) -> Iterator[Account]:
    key = server.register()
    with (
        httpx.Client(base_url=server.http_url, headers=auth(key)) as client,
        grpc.insecure_channel(server.grpc_target) as channel,
    ):
        yield Account(key, client, channel)


def test_each_report_of_a_batch_applies_or_is_refused_on_its_own(account: Account) -> None:
    cue, (done, succeeds, fails, keyed) = account.work(4)
    assert account.client.post(f"/v1/executions/{done}/outcome", json={"success": True}).status_code == 200
    stranger = str(uuid.uuid4())
    answer = account.record(
        Report(execution_id=done, success=False),
        Report(execution_id=succeeds, success=True, result="ok"),
        Report(execution_id=fails, success=False, error="boom"),
        Report(execution_id=succeeds, success=True, result="second"),
        Report(execution_id="not-a-uuid", success=True),
        Report(execution_id=stranger, success=True),
        Report(execution_id=keyed, success=True, request_id="k-1"),
    )
    kinds = [result.WhichOneof("result") for result in answer.results]
    assert kinds == ["refused", "recorded", "recorded", "refused", "refused", "refused", "recorded"]
    refused = {r.refused.execution_id: r.refused.code for r in answer.results if r.HasField("refused")}
    assert refused == {
        done: "outcome_already_recorded",
        succeeds: "outcome_already_recorded",  # the second report for it in the same batch
        "not-a-uuid": "execution_not_found",
        stranger: "execution_not_found",
    }
    recorded = [r.recorded for r in answer.results if r.HasField("recorded")]
    assert [(r.execution_id, r.outcome_state) for r in recorded] == [
        (succeeds, outcomes_pb2.OUTCOME_STATE_REPORTED_SUCCESS),
        (fails, outcomes_pb2.OUTCOME_STATE_REPORTED_FAILURE),
        (keyed, outcomes_pb2.OUTCOME_STATE_REPORTED_SUCCESS),
    ]

    # What was stored: the first report for each execution, and the worker transport's settlement.
    assert account.stored(done)["outcome"]["success"] is True
    assert account.stored(succeeds)["outcome"]["result"] == "ok"
    assert account.stored(fails)["status"] == "failed"
    assert account.stored(fails)["outcome"]["error"] == "boom"
    assert account.client.get(f"/v1/cues/{cue}").json()["run_count"] == 3  # done, succeeds, keyed

    # Under its request id, a repeated report answers as before; a different one is refused.
    again = account.record(
        Report(execution_id=keyed, success=True, request_id="k-1"),
        Report(execution_id=keyed, success=False, request_id="k-1"),
    )
    assert again.results[0].recorded.execution_id == keyed
    assert again.results[1].refused.code == "idempotency_key_conflict"


def test_a_stale_claim_in_a_batch_is_refused(account: Account) -> None:
    _, (execution,) = account.work(1)
    claim = (
        executions_pb2_grpc.ExecutionServiceStub(account.channel)
        .ClaimExecutions(
            executions_pb2.ClaimExecutionsRequest(worker_id="w", max_executions=1),
            metadata=bearer(account.key),
        )
        .claims[0]
    )
    answer = account.record(
        Report(execution_id=execution, success=True, fencing_token=claim.fencing_token + 1)
    )
    assert answer.results[0].refused.code == "stale_claim"
    assert account.stored(execution)["outcome"] is None

    # Reports for one execution are tried in order until one applies: the stale one
    # first does not keep the current holder's report after it from applying.
    answer = account.record(
        Report(execution_id=execution, success=False, fencing_token=claim.fencing_token + 1),
        Report(execution_id=execution, success=True, result="mine", fencing_token=claim.fencing_token),
        Report(execution_id=execution, success=False, fencing_token=claim.fencing_token),
    )
    assert [r.WhichOneof("result") for r in answer.results] == ["refused", "recorded", "refused"]
    # A refusal is explained by the execution as the batch left it: it has an outcome now.
    assert [r.refused.code for r in answer.results] == [
        "outcome_already_recorded",
        "",
        "outcome_already_recorded",
    ]
    assert account.stored(execution)["outcome"]["result"] == "mine"


def test_batches_over_rest(account: Account) -> None:
    client = account.client
    _, (first, second) = account.work(2)
    response = client.post(
        "/v1/executions/outcomes",
        json={
            "outcomes": [
                {"execution_id": first, "success": True, "external_id": "ext-1"},
                {"execution_id": first, "success": False},
            ]
        },
    )
    assert response.status_code == 200, response.text
    recorded, refused = response.json()["results"]
    assert recorded["recorded"]["execution_id"] == first and recorded["refused"] is None
    assert recorded["recorded"]["outcome_state"] == "reported_success"
    assert refused["refused"]["code"] == "outcome_already_recorded" and refused["recorded"] is None
    assert refused["refused"]["execution_id"] == first
    assert account.stored(first)["outcome"]["external_id"] == "ext-1"

    # A malformed report fails the whole call, naming it; nothing of the call is written.
    for body, field in (
        ({"outcomes": [{"execution_id": second, "success": True}, {"execution_id": second}]},
         "body.outcomes.1.success"),
        ({"outcomes": [{"execution_id": second, "success": True, "metadata": "[1]"}]},
         "body.outcomes.0.metadata"),
        ({"outcomes": [{"execution_id": second, "success": True, "result_url": "ftp://x"}]},
         "body.outcomes.0.result_url"),
        ({"outcomes": []}, "body.outcomes"),
        ({"outcomes": [{"execution_id": second, "success": True}] * 501}, "body.outcomes"),
    ):  # fmt: skip
        rejected = client.post("/v1/executions/outcomes", json=body)
        assert rejected.status_code == 422, rejected.text
        assert rejected.json()["error"]["details"][0]["field"] == field
    too_large = client.post(
        "/v1/executions/outcomes",
        json={"outcomes": [{"execution_id": second, "success": True, "metadata": {"x": "y" * 10_240}}]},
    )
    assert too_large.status_code == 400
    assert too_large.json()["error"]["code"] == "metadata_too_large"
    assert too_large.json()["error"]["message"].startswith("outcomes.0: ")
    assert account.stored(second)["outcome"] is None


@pytest.mark.parametrize("count", [1, 300])
def test_a_large_batch_is_written_whole(account: Account, count: int) -> None:
    """More reports than one database batch holds are all written and all answered."""
    cue, executions = account.work(count)
    answer = account.record(*(Report(execution_id=e, success=True) for e in executions))
    assert [r.recorded.execution_id for r in answer.results] == executions
    assert account.client.get(f"/v1/cues/{cue}").json()["run_count"] == count


def test_a_malformed_batch_over_grpc_names_the_report(account: Account) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        account.record(
            Report(execution_id=str(uuid.uuid4()), success=True),
            Report(execution_id=str(uuid.uuid4()), result="x" * 8193),
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad = error_details(raised.value)
    assert bad is not None
    assert {v.field for v in bad.field_violations} == {"outcomes.1.success", "outcomes.1.result"}


def test_text_comes_back_as_it_was_sent(account: Account) -> None:
    """The batch statement carries text as array literals on PostgreSQL and as
    JSON on SQLite: what those must escape is stored as sent."""
    awkward = ['a "quoted" \\ back\\slash', "NULL", "", "{a,b}", " x ", "line\nbreak\ttab", "é ☃ 𝄞", "'"]
    _, executions = account.work(len(awkward))
    reports = [
        Report(
            execution_id=execution,
            success=True,
            result=text,
            external_id=text or "-",
            result_ref=text or "-",
            result_type=text or "-",
            summary=text,
            result_url=f"https://x.example/{index}",
            metadata=json.dumps({"k": text}),
        )
        for index, (execution, text) in enumerate(zip(executions, awkward, strict=True))
    ]
    answer = account.record(*reports)
    assert all(r.HasField("recorded") for r in answer.results), answer
    for execution, text in zip(executions, awkward, strict=True):
        outcome = account.stored(execution)["outcome"]
        assert outcome["result"] == text and outcome["summary"] == text and outcome["metadata"] == {"k": text}
        assert outcome["external_id"] == outcome["result_ref"] == outcome["result_type"] == (text or "-")
