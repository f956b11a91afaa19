"""Outcomes: the write-once report of whether the work succeeded.

The report is one conditional UPDATE (see ExecutionRepository.record_outcome):
it applies only while no outcome is recorded, so among any number of racing
writers exactly one wins, whatever the transport. The outcome state depends
on the cue's verification mode *at report time*; rather than read the mode
first (a second round trip and a race), the service computes the verdict for
every mode and the statement picks the one for the cue's mode.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cueline_server.errors import ApiError, execution_not_found, field_error
from cueline_server.services.accounts import Caller, now
from cueline_server.services.identifiers import parse_uuid
from cueline_server.store.database import Database
from cueline_server.store.repositories import VERIFICATION_MODES as MODES

MAX_METADATA_BYTES = 10_240
_REQUIREMENT = {
    "require_external_id": "external_id",
    "require_result_url": "result_url",
    "require_artifacts": "artifacts",
}


@dataclass(frozen=True)
class OutcomeReport:
    success: bool
    result: str | None = None
    error: str | None = None
    metadata: str | None = None  # JSON object text
    external_id: str | None = None
    result_url: str | None = None
    result_ref: str | None = None
    result_type: str | None = None
    summary: str | None = None
    artifacts: str | None = None  # JSON array text

    def evidence(self) -> set[str]:
        present = set()
        if self.external_id:
            present.add("external_id")
        if self.result_url:
            present.add("result_url")
        if self.artifacts:
            present.add("artifacts")
        return present


@dataclass(frozen=True)
class Verdict:
    outcome_state: str
    validation_state: str | None
    reason: str | None


@dataclass(frozen=True)
class RecordedOutcome:
    execution_id: str
    outcome_state: str
    reason: str | None
    late: bool


def outcome_already_recorded() -> ApiError:
    return ApiError("outcome_already_recorded", "Outcome has already been recorded for this execution", 409)


def stale_claim() -> ApiError:
    return ApiError("stale_claim", "The execution has been claimed again since this claim", 409)


def verdict(success: bool, mode: str | None, evidence: set[str]) -> Verdict:
    """The outcome state of a report under a verification mode."""
    if not success:
        return Verdict("reported_failure", None, None)
    if mode is None or mode == "none":
        return Verdict("reported_success", None, None)
    if mode == "manual":
        return Verdict("verification_pending", None, None)
    required = _REQUIREMENT[mode]
    if required in evidence:
        return Verdict("verified_success", "valid", None)
    return Verdict("verification_failed", "invalid", f"{mode}: {required} missing")


def check_report(report: OutcomeReport) -> OutcomeReport:
    """Field rules beyond the schema; normalises empty evidence to absent."""
    if report.metadata is not None:
        if not isinstance(json.loads(report.metadata), dict):
            raise field_error("metadata", "Input should be a valid dictionary")
        if len(report.metadata.encode()) > MAX_METADATA_BYTES:
            raise ApiError("metadata_too_large", "Outcome metadata must be under 10KB", 400)
    artifacts = report.artifacts
    if artifacts is not None:
        parsed = json.loads(artifacts)
        if not isinstance(parsed, list):
            raise field_error("artifacts", "Input should be a valid list")
        if not parsed:
            artifacts = None
    if report.result_url is not None and not report.result_url.lower().startswith(("http://", "https://")):
        raise field_error("result_url", "URL must begin with http:// or https://")
    return OutcomeReport(
        success=report.success,
        result=report.result,
        error=report.error,
        metadata=report.metadata,
        external_id=report.external_id or None,
        result_url=report.result_url,
        result_ref=report.result_ref or None,
        result_type=report.result_type,
        summary=report.summary,
        artifacts=artifacts,
    )


class OutcomeService:
    def __init__(
        self, db: Database, failed: Callable[[Sequence[uuid.UUID]], None] = lambda ids: None
    ) -> None:
        self._db = db
        self._failed = failed

    async def record(
        self, caller: Caller, execution_id: str, report: OutcomeReport, fencing_token: int | None = None
    ) -> RecordedOutcome:
        parsed = parse_uuid(execution_id)
        if parsed is None:
            raise execution_not_found()
        report = check_report(report)
        moment = now()
        evidence = report.evidence()
        verdicts = {m: verdict(report.success, m, evidence) for m in (*MODES, None)}
        outcome = {
            "outcome_success": report.success,
            "outcome_result": report.result,
            "outcome_error": report.error,
            "outcome_metadata": report.metadata,
            "external_id": report.external_id,
            "result_url": report.result_url,
            "result_ref": report.result_ref,
            "result_type": report.result_type,
            "summary": report.summary,
            "artifacts": report.artifacts,
            "evidence_produced_at": moment if evidence else None,
        }
        async with self._db.single_statement() as repos:
            row = await repos.executions.record_outcome(
                caller.account_id,
                parsed,
                moment,
                outcome,
                {m: (v.outcome_state, v.validation_state) for m, v in verdicts.items()},
                fencing_token,
            )
            if row is None:
                found = await repos.executions.write_once_state(caller.account_id, parsed)
                if found is None:
                    raise execution_not_found()
                if found.outcome_recorded_at is None:
                    raise stale_claim()
                raise outcome_already_recorded()
        if row.transport == "worker" and row.status == "failed":
            self._failed([row.id])
        reason = verdicts[row.outcome_verification_mode].reason
        return RecordedOutcome(str(row.id), row.outcome_state, reason, bool(row.outcome_late))
