from __future__ import annotations

from google.protobuf.field_mask_pb2 import FieldMask

from cueline.v1 import cues_pb2, outcomes_pb2, workers_pb2
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
