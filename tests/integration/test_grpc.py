"""The same slice over gRPC with the generated stubs: health, reflection, rich errors."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from cueline.v1 import (
    accounts_pb2,
    accounts_pb2_grpc,
    cues_pb2,
    cues_pb2_grpc,
    executions_pb2,
    executions_pb2_grpc,
    outcomes_pb2,
    outcomes_pb2_grpc,
)
from tests.support import Server, bearer, error_details

SERVICES = [
    "cueline.v1.AccountService",
    "cueline.v1.CueService",
    "cueline.v1.ExecutionService",
    "cueline.v1.OutcomeService",
    "cueline.v1.WorkerService",
]


@pytest.fixture
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


def api_key(channel: grpc.Channel) -> tuple[tuple[str, str], ...]:
    stub = accounts_pb2_grpc.AccountServiceStub(channel)
    key = stub.Register(accounts_pb2.RegisterRequest(email=f"g-{uuid.uuid4().hex[:8]}@example.com")).api_key
    return bearer(key)


def worker_cue(
    cues: cues_pb2_grpc.CueServiceStub, md: tuple[tuple[str, str], ...], name: str
) -> cues_pb2.Cue:
    """A recurring worker cue (every five minutes), created over gRPC."""
    schedule = cues_pb2.Schedule(type=cues_pb2.SCHEDULE_TYPE_RECURRING, cron="*/5 * * * *")
    return cues.CreateCue(
        cues_pb2.CreateCueRequest(
            cue=cues_pb2.Cue(name=name, transport=cues_pb2.TRANSPORT_WORKER, schedule=schedule)
        ),
        metadata=md,
    ).cue


def test_health_overall_and_per_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ["", *SERVICES]:
        response = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.RpcError) as raised:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(responses).list_services_response.service}
    assert set(SERVICES) <= names and "grpc.health.v1.Health" in names


def test_slice_and_write_once(channel: grpc.Channel) -> None:
    md = api_key(channel)
    cues = cues_pb2_grpc.CueServiceStub(channel)
    cue = cues.CreateCue(
        cues_pb2.CreateCueRequest(
            cue=cues_pb2.Cue(
                name="grpc-cue",
                transport=cues_pb2.TRANSPORT_WORKER,
                schedule=cues_pb2.Schedule(type=cues_pb2.SCHEDULE_TYPE_RECURRING, cron="*/5 * * * *"),
                payload='{"task": "t", "n": 1}',
            )
        ),
        metadata=md,
    ).cue
    assert cue.status == cues_pb2.CUE_STATUS_ACTIVE and cue.HasField("next_run")
    fired = cues.FireCue(cues_pb2.FireCueRequest(cue_id=cue.id), metadata=md)
    outcomes = outcomes_pb2_grpc.OutcomeServiceStub(channel)
    recorded = outcomes.RecordOutcome(
        outcomes_pb2.RecordOutcomeRequest(execution_id=fired.id, success=False, error="disk full"),
        metadata=md,
    )
    assert recorded.outcome_state == outcomes_pb2.OUTCOME_STATE_REPORTED_FAILURE
    with pytest.raises(grpc.RpcError) as raised:
        outcomes.RecordOutcome(
            outcomes_pb2.RecordOutcomeRequest(execution_id=fired.id, success=True), metadata=md
        )
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info, _ = error_details(raised.value)
    assert info.reason == "outcome_already_recorded" and info.metadata["http_status"] == "409"

    execution = (
        executions_pb2_grpc.ExecutionServiceStub(channel)
        .GetExecution(executions_pb2.GetExecutionRequest(execution_id=fired.id), metadata=md)
        .execution
    )
    assert execution.status == executions_pb2.EXECUTION_STATUS_FAILED
    assert execution.outcome.error == "disk full" and execution.outcome_success is False
    assert execution.payload == '{"task": "t", "n": 1}'


def test_invalid_argument_names_the_field(channel: grpc.Channel) -> None:
    md = api_key(channel)
    cues = cues_pb2_grpc.CueServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        cues.CreateCue(
            cues_pb2.CreateCueRequest(
                cue=cues_pb2.Cue(
                    name="x",
                    transport=cues_pb2.TRANSPORT_WORKER,
                    schedule=cues_pb2.Schedule(type=cues_pb2.SCHEDULE_TYPE_RECURRING, cron="* * * * *"),
                    retry=cues_pb2.RetryPolicy(max_attempts=99),
                )
            ),
            metadata=md,
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = error_details(raised.value)
    assert info.reason == "validation_error"
    assert bad is not None and [v.field for v in bad.field_violations] == ["cue.retry.max_attempts"]


def test_a_nul_character_is_invalid_argument_and_the_slot_stays_open(channel: grpc.Channel) -> None:
    md = api_key(channel)
    cues = cues_pb2_grpc.CueServiceStub(channel)
    cue = worker_cue(cues, md, "nul")
    execution_id = cues.FireCue(cues_pb2.FireCueRequest(cue_id=cue.id), metadata=md).id
    outcomes = outcomes_pb2_grpc.OutcomeServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        outcomes.RecordOutcome(
            outcomes_pb2.RecordOutcomeRequest(execution_id=execution_id, success=True, summary="a\x00b"),
            metadata=md,
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad = error_details(raised.value)
    assert bad is not None and [v.field for v in bad.field_violations] == ["summary"]
    recorded = outcomes.RecordOutcome(
        outcomes_pb2.RecordOutcomeRequest(execution_id=execution_id, success=True), metadata=md
    )
    assert recorded.outcome_recorded


def test_a_timestamp_beyond_its_range_is_invalid_argument(channel: grpc.Channel) -> None:
    """REST's RFC 3339 strings stay within years 1-9999; gRPC seconds need not."""
    md = api_key(channel)
    cues = cues_pb2_grpc.CueServiceStub(channel)
    cue = worker_cue(cues, md, "far")
    with pytest.raises(grpc.RpcError) as raised:
        cues.FireCue(cues_pb2.FireCueRequest(cue_id=cue.id, send_at=Timestamp(seconds=10**15)), metadata=md)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad = error_details(raised.value)
    assert bad is not None and [v.field for v in bad.field_violations] == ["send_at"]
    latest = Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    fired = cues.FireCue(cues_pb2.FireCueRequest(cue_id=cue.id, send_at=latest), metadata=md)
    assert fired.scheduled_for.seconds == latest.seconds


def test_an_undefined_enum_number_is_invalid_argument_not_unset(channel: grpc.Channel) -> None:
    """A filter with a value this server does not know must not list everything."""
    executions = executions_pb2_grpc.ExecutionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        executions.ListExecutions(
            executions_pb2.ListExecutionsRequest(status=99),  # type: ignore[arg-type]
            metadata=api_key(channel),
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad = error_details(raised.value)
    assert bad is not None and [v.field for v in bad.field_violations] == ["status"]


def test_json_text_fields_must_hold_json(channel: grpc.Channel) -> None:
    """gRPC callers send free-form JSON as text; text that is not JSON is the caller's mistake."""
    md = api_key(channel)
    cues = cues_pb2_grpc.CueServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        cues.CreateCue(
            cues_pb2.CreateCueRequest(
                cue=cues_pb2.Cue(
                    name="not-json",
                    transport=cues_pb2.TRANSPORT_WORKER,
                    payload='{"task": ',
                    schedule=cues_pb2.Schedule(type=cues_pb2.SCHEDULE_TYPE_RECURRING, cron="* * * * *"),
                )
            ),
            metadata=md,
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad = error_details(raised.value)
    assert bad is not None and [(v.field, v.description) for v in bad.field_violations] == [
        ("cue.payload", "Input should be valid JSON")
    ]


def test_payload_size_limit(channel: grpc.Channel) -> None:
    md = api_key(channel)
    with pytest.raises(grpc.RpcError) as raised:
        cues_pb2_grpc.CueServiceStub(channel).CreateCue(
            cues_pb2.CreateCueRequest(
                cue=cues_pb2.Cue(
                    name="big",
                    transport=cues_pb2.TRANSPORT_WORKER,
                    schedule=cues_pb2.Schedule(type=cues_pb2.SCHEDULE_TYPE_RECURRING, cron="* * * * *"),
                    payload='{"blob": "' + "x" * 1_048_576 + '"}',
                )
            ),
            metadata=md,
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(raised.value)[0].reason == "invalid_payload_size"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [((), "invalid_api_key"), ((("authorization", "Bearer cue_sk_" + "f" * 32),), "invalid_api_key")],
)
def test_unauthenticated(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...], reason: str) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        cues_pb2_grpc.CueServiceStub(channel).ListCues(cues_pb2.ListCuesRequest(), metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(raised.value)[0].reason == reason


def test_not_found_for_malformed_and_foreign_ids(channel: grpc.Channel) -> None:
    md = api_key(channel)
    stub = executions_pb2_grpc.ExecutionServiceStub(channel)
    for execution_id in ["nope", str(uuid.uuid4())]:
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetExecution(executions_pb2.GetExecutionRequest(execution_id=execution_id), metadata=md)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_details(raised.value)[0].reason == "execution_not_found"


def test_update_mask_semantics(channel: grpc.Channel) -> None:
    md = api_key(channel)
    cues = cues_pb2_grpc.CueServiceStub(channel)
    cue = cues.CreateCue(
        cues_pb2.CreateCueRequest(
            cue=cues_pb2.Cue(
                name="masked",
                description="keep me",
                transport=cues_pb2.TRANSPORT_WORKER,
                schedule=cues_pb2.Schedule(type=cues_pb2.SCHEDULE_TYPE_RECURRING, cron="* * * * *"),
            )
        ),
        metadata=md,
    ).cue
    updated = cues.UpdateCue(
        cues_pb2.UpdateCueRequest(
            cue_id=cue.id,
            cue=cues_pb2.Cue(name="renamed", description="ignored"),
            update_mask=FieldMask(paths=["name"]),
        ),
        metadata=md,
    ).cue
    assert updated.name == "renamed" and updated.description == "keep me"
    for paths in (["transport"], ["no_such_field"], ["run_count"]):
        with pytest.raises(grpc.RpcError) as raised:
            cues.UpdateCue(
                cues_pb2.UpdateCueRequest(
                    cue_id=cue.id, cue=cues_pb2.Cue(), update_mask=FieldMask(paths=paths)
                ),
                metadata=md,
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, paths


def test_request_id_is_returned(channel: grpc.Channel) -> None:
    stub = accounts_pb2_grpc.AccountServiceStub(channel)
    _, call = stub.Register.with_call(
        accounts_pb2.RegisterRequest(email=f"r-{uuid.uuid4().hex[:8]}@example.com"),
        metadata=(("x-request-id", "trace-123"),),
    )
    assert ("x-request-id", "trace-123") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError) as failed:
        stub.Register(
            accounts_pb2.RegisterRequest(email="not-an-email"), metadata=(("x-request-id", "trace-456"),)
        )
    trailer: dict[str, object] = {m.key: m.value for m in failed.value.trailing_metadata()}
    assert trailer["x-request-id"] == "trace-456"
    status = rpc_status.from_call(failed.value)
    assert status is not None and status.details  # the rich error details are still there


def test_batch_claim_long_poll_and_fencing(channel: grpc.Channel) -> None:
    import threading
    import time

    md = api_key(channel)
    cues = cues_pb2_grpc.CueServiceStub(channel)
    executions = executions_pb2_grpc.ExecutionServiceStub(channel)
    cue = cues.CreateCue(
        cues_pb2.CreateCueRequest(
            cue=cues_pb2.Cue(
                name="batch",
                transport=cues_pb2.TRANSPORT_WORKER,
                payload='{"task": "t"}',
                schedule=cues_pb2.Schedule(type=cues_pb2.SCHEDULE_TYPE_RECURRING, cron="0 0 1 1 *"),
            )
        ),
        metadata=md,
    ).cue
    fired = {cues.FireCue(cues_pb2.FireCueRequest(cue_id=cue.id), metadata=md).id for _ in range(5)}
    batch = executions.ClaimExecutions(
        executions_pb2.ClaimExecutionsRequest(worker_id="w", max_executions=3), metadata=md
    ).claims
    rest = executions.ClaimExecutions(
        executions_pb2.ClaimExecutionsRequest(worker_id="w", max_executions=10), metadata=md
    ).claims
    assert len(batch) == 3 and len(rest) == 2
    assert {c.execution_id for c in [*batch, *rest]} == fired and all(c.fencing_token == 1 for c in batch)

    # A long poll with nothing to claim waits, and returns the work that appears meanwhile.
    later: list[str] = []

    def fire_soon() -> None:
        time.sleep(0.5)
        later.append(cues.FireCue(cues_pb2.FireCueRequest(cue_id=cue.id), metadata=md).id)

    firing = threading.Thread(target=fire_soon)
    firing.start()
    waited = executions.ClaimExecutions(
        executions_pb2.ClaimExecutionsRequest(worker_id="w", max_executions=10, wait_seconds=20), metadata=md
    ).claims
    firing.join(30)
    assert len(later) == 1 and [c.execution_id for c in waited] == later

    # A stale fencing token is refused once the execution was claimed again.
    claim = batch[0]
    outcomes = outcomes_pb2_grpc.OutcomeServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        outcomes.RecordOutcome(
            outcomes_pb2.RecordOutcomeRequest(
                execution_id=claim.execution_id, success=True, fencing_token=claim.fencing_token + 1
            ),
            metadata=md,
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(raised.value)[0].reason == "stale_claim"
    with pytest.raises(grpc.RpcError) as raised:
        executions.HeartbeatExecution(
            executions_pb2.HeartbeatExecutionRequest(execution_id=claim.execution_id, fencing_token=7),
            metadata=md,
        )
    assert error_details(raised.value)[0].reason == "stale_claim"
    recorded = outcomes.RecordOutcome(
        outcomes_pb2.RecordOutcomeRequest(
            execution_id=claim.execution_id, success=True, fencing_token=claim.fencing_token
        ),
        metadata=md,
    )
    assert recorded.outcome_recorded
