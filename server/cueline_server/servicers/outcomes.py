from __future__ import annotations

from cueline.v1 import outcomes_pb2
from cueline_server.api.pipeline import Call
from cueline_server.errors import ApiError
from cueline_server.servicers.convert import to_enum
from cueline_server.services.outcomes import (
    Evidence,
    OutcomeReport,
    OutcomeService,
    RecordedOutcome,
    ReportRequest,
)

_OPTIONAL = (
    "result",
    "error",
    "metadata",
    "external_id",
    "result_url",
    "result_ref",
    "result_type",
    "summary",
    "artifacts",
)


def _report(request: outcomes_pb2.RecordOutcomeRequest) -> ReportRequest:
    given = {name: getattr(request, name) for name in _OPTIONAL if request.HasField(name)}  # type: ignore[arg-type]
    return ReportRequest(
        request.execution_id,
        OutcomeReport(success=request.success, **given),
        request.fencing_token if request.HasField("fencing_token") else None,
        request.request_id if request.HasField("request_id") else None,
    )


def _recorded(recorded: RecordedOutcome) -> outcomes_pb2.RecordOutcomeResponse:
    response = outcomes_pb2.RecordOutcomeResponse(
        execution_id=recorded.execution_id,
        outcome_recorded=True,
        outcome_state=to_enum(outcomes_pb2.OutcomeState, recorded.outcome_state),
        late=recorded.late,
    )
    if recorded.reason is not None:
        response.reason = recorded.reason
    return response


class OutcomeServicer:
    def __init__(self, outcomes: OutcomeService) -> None:
        self._outcomes = outcomes

    async def RecordOutcome(
        self, request: outcomes_pb2.RecordOutcomeRequest, call: Call
    ) -> outcomes_pb2.RecordOutcomeResponse:
        return _recorded(await self._outcomes.record(call.account, _report(request)))

    async def RecordOutcomes(
        self, request: outcomes_pb2.RecordOutcomesRequest, call: Call
    ) -> outcomes_pb2.RecordOutcomesResponse:
        reports = [_report(item) for item in request.outcomes]
        answers = await self._outcomes.record_many(call.account, reports)
        response = outcomes_pb2.RecordOutcomesResponse()
        for report, answer in zip(reports, answers, strict=True):
            if isinstance(answer, ApiError):
                refused = outcomes_pb2.OutcomeRefusal(
                    execution_id=report.execution_id, code=answer.code, message=answer.message
                )
                response.results.add(refused=refused)
            else:
                response.results.add(recorded=_recorded(answer))
        return response

    async def VerifyOutcome(
        self, request: outcomes_pb2.VerifyOutcomeRequest, call: Call
    ) -> outcomes_pb2.VerifyOutcomeResponse:
        valid = request.valid if request.HasField("valid") else True
        reason = request.reason if request.HasField("reason") else None
        state = await self._outcomes.verify(call.account, request.execution_id, valid, reason)
        response = outcomes_pb2.VerifyOutcomeResponse(
            execution_id=request.execution_id,
            outcome_state=to_enum(outcomes_pb2.OutcomeState, state),
            valid=valid,
        )
        if reason is not None:
            response.reason = reason
        return response

    async def MarkVerificationPending(
        self, request: outcomes_pb2.MarkVerificationPendingRequest, call: Call
    ) -> outcomes_pb2.MarkVerificationPendingResponse:
        await self._outcomes.mark_pending(call.account, request.execution_id)
        return outcomes_pb2.MarkVerificationPendingResponse(
            execution_id=request.execution_id, outcome_state=outcomes_pb2.OUTCOME_STATE_VERIFICATION_PENDING
        )

    async def UpdateEvidence(
        self, request: outcomes_pb2.UpdateEvidenceRequest, call: Call
    ) -> outcomes_pb2.UpdateEvidenceResponse:
        names = ("external_id", "result_url", "result_ref", "result_type", "summary", "artifacts", "metadata")
        given = {name: getattr(request, name) for name in names if request.HasField(name)}  # type: ignore[arg-type]
        state = await self._outcomes.update_evidence(call.account, request.execution_id, Evidence(**given))
        return outcomes_pb2.UpdateEvidenceResponse(
            execution_id=request.execution_id,
            outcome_state=to_enum(outcomes_pb2.OutcomeState, state),
            evidence_updated=True,
        )
