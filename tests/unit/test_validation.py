from __future__ import annotations

from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from cueline.partner.v1 import actions_pb2
from cueline.v1 import cues_pb2, executions_pb2, outcomes_pb2, workers_pb2
from cueline_server.api.validation import validate


def fields(request: object) -> list[str]:
    return [v.field for v in validate(request)]  # type: ignore[arg-type]


def test_required_and_ranges() -> None:
    assert fields(outcomes_pb2.RecordOutcomeRequest(execution_id="e")) == ["success"]
    assert fields(outcomes_pb2.RecordOutcomeRequest(execution_id="e", success=False)) == []
    cue = cues_pb2.Cue(name="n", schedule=cues_pb2.Schedule(), retry=cues_pb2.RetryPolicy(max_attempts=0))
    assert fields(cues_pb2.CreateCueRequest(cue=cue)) == ["cue.retry.max_attempts"]
    assert fields(cues_pb2.CreateCueRequest()) == ["cue"]


def test_repeated_limits_apply_per_item_and_in_count() -> None:
    assert fields(workers_pb2.RecordWorkerHeartbeatRequest(worker_id="w", handlers=["x" * 256])) == [
        "handlers.0"
    ]
    assert fields(workers_pb2.RecordWorkerHeartbeatRequest(worker_id="w", handlers=["x"] * 101)) == [
        "handlers"
    ]


def test_update_checks_only_what_the_mask_names() -> None:
    request = cues_pb2.UpdateCueRequest(
        cue_id="c", cue=cues_pb2.Cue(), update_mask=FieldMask(paths=["description"])
    )
    assert fields(request) == []  # name and schedule are not required in an update
    request.update_mask.paths[:] = ["name"]
    assert fields(request) == ["cue.name"]  # but a masked name must still be valid
    request.update_mask.paths[:] = ["transport", "bogus", "retry.max_attempts"]
    assert fields(request) == ["cue.bogus", "cue.transport", "cue.retry.max_attempts"]


def test_no_string_may_hold_a_nul_and_the_violation_says_where() -> None:
    assert fields(outcomes_pb2.RecordOutcomeRequest(execution_id="e", success=True, result="a\x00b")) == [
        "result"
    ]
    handlers = workers_pb2.RecordWorkerHeartbeatRequest(worker_id="w", handlers=["ok", "n\x00"])
    assert fields(handlers) == ["handlers.1"]
    callback = cues_pb2.Callback(url="https://x.example", headers={"X-Team": "a\x00"})
    cue = cues_pb2.Cue(name="n", schedule=cues_pb2.Schedule(), callback=callback)
    assert fields(cues_pb2.CreateCueRequest(cue=cue)) == ["cue.callback.headers.X-Team"]
    body = Struct()
    body.update({"fine": "x", "nested": {"list": [1, "ok", {"deep": "\x00"}]}})
    assert fields(actions_pb2.ReportActionStateRequest(cue_id="c", body=body)) == ["body.nested.list.2.deep"]
    body = Struct()
    body.update({"key\x00": 1})
    assert fields(actions_pb2.ReportActionStateRequest(cue_id="c", body=body)) == ["body"]


def test_a_nul_in_an_identifier_is_left_to_the_handler() -> None:
    """A path variable names a resource; one holding a NUL names none (404, not 422)."""
    request = workers_pb2.DeleteWorkerRequest(worker_id="w\x00")
    assert validate(request, frozenset({"worker_id"})) == []
    assert [v.field for v in validate(request)] == ["worker_id"]


def test_a_timestamp_must_lie_in_the_range_protobuf_defines() -> None:
    def fire(seconds: int, nanos: int = 0) -> list[str]:
        return fields(cues_pb2.FireCueRequest(cue_id="c", send_at=Timestamp(seconds=seconds, nanos=nanos)))

    assert fire(-62_135_596_800) == [] and fire(253_402_300_799, 999_999_999) == []
    outside = ((-62_135_596_801, 0), (253_402_300_800, 0), (10**15, 0), (0, 1_000_000_000), (0, -1))
    for seconds, nanos in outside:
        assert fire(seconds, nanos) == ["send_at"], (seconds, nanos)


def test_an_enum_number_the_proto_does_not_define_is_refused() -> None:
    """gRPC callers can send any number; an undefined one is not read as unset."""
    assert fields(executions_pb2.ListExecutionsRequest(status=99)) == ["status"]  # type: ignore[arg-type]
    assert fields(executions_pb2.ListExecutionsRequest(status=executions_pb2.EXECUTION_STATUS_FAILED)) == []
    lenient = cues_pb2.Cue(name="n", schedule=cues_pb2.Schedule(type=99))  # type: ignore[arg-type]
    assert fields(cues_pb2.CreateCueRequest(cue=lenient)) == []  # the service answers invalid_schedule
