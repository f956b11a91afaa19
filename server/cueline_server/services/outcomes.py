"""Outcomes: the write-once report of whether the work succeeded.

The report is a conditional UPDATE (see ExecutionRepository.record_outcomes):
it applies only while no outcome is recorded, so among any number of racing
writers exactly one wins, whatever the transport. Concurrent reports are
written together, one statement (PostgreSQL) or one transaction (SQLite) per
batch. The outcome state depends
on the cue's verification mode *at report time*; rather than read the mode
first (a second round trip and a race), the service computes the verdict for
every mode and the statement picks the one for the cue's mode.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

from cueline_server.errors import (
    ApiError,
    execution_not_found,
    field_error,
    idempotency_key_conflict,
    service_unavailable,
)
from cueline_server.services.accounts import Caller, now
from cueline_server.services.alerts import AlertService
from cueline_server.services.identifiers import parse_uuid
from cueline_server.store.batching import Coalescer
from cueline_server.store.database import Database, Repositories
from cueline_server.store.repositories import VERIFICATION_MODES as MODES
from cueline_server.store.repositories import (
    AnyRow,
    Held,
    OutcomeWrite,
    record_outcomes_sqlite,
    write_once_states_sqlite,
)

log = logging.getLogger("cueline.outcomes")

MAX_METADATA_BYTES = 10_240
# Recorded outcomes this process has read, to answer later reports from
# (`OutcomeService._recorded`): how many, and for how long each.
RECORDED_MAX = 10_000
RECORDED_SECONDS = 5.0
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

    def digest(self) -> str:
        """SHA-256 of the report's canonical JSON: what an idempotent repeat must match."""
        canonical = {
            name: json.loads(value) if name in ("metadata", "artifacts") and value is not None else value
            for name, value in dataclasses.asdict(self).items()
        }
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()

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


def reported_reason(mode: str | None, state: str) -> str | None:
    """The reason a report's response carried, from its mode and resulting state."""
    if state == "verification_failed" and mode in _REQUIREMENT:
        return f"{mode}: {_REQUIREMENT[mode]} missing"
    return None


def outcome_already_recorded() -> ApiError:
    return ApiError("outcome_already_recorded", "Outcome has already been recorded for this execution", 409)


def stale_claim() -> ApiError:
    return ApiError("stale_claim", "The execution has been claimed again since this claim", 409)


def verdict(success: bool, mode: str | None, evidence: AbstractSet[str]) -> Verdict:
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


@cache
def _verdicts(success: bool, evidence: frozenset[str]) -> tuple[Mapping[str | None, Verdict], str, str]:
    """Every mode's verdict on a report (None: the cue has no mode), and the
    statement's two JSON parameters of them, keyed by mode ("unset" for None).
    They depend on so little that each combination is worked out once."""
    verdicts = {m: verdict(success, m, evidence) for m in (*MODES, None)}
    states = json.dumps({m or "unset": v.outcome_state for m, v in verdicts.items()})
    validations = json.dumps({m or "unset": v.validation_state for m, v in verdicts.items()})
    return verdicts, states, validations


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


@dataclass(frozen=True)
class ReportRequest:
    """A report, with what travels beside it."""

    execution_id: str
    report: OutcomeReport
    fencing_token: int | None = None
    request_id: str | None = None


# A written report: the recorded row, or None and what the report found instead
# (None: no such execution in the caller's account; an error: reading it failed),
# or HELD and None for a report left out of its batch (see `_written`).
_Written = tuple[AnyRow | Held | None, AnyRow | ApiError | None]


@dataclass(frozen=True)
class _Pending:
    """A checked report, ready for the write-once statement, and what its answer needs."""

    write: OutcomeWrite
    verdicts: Mapping[str | None, Verdict]
    success: bool
    request_id: str | None
    digest: str | None

    @classmethod
    def of(cls, caller: Caller, execution_id: uuid.UUID, request: ReportRequest) -> _Pending:
        report = check_report(request.report)
        request_id = request.request_id
        moment = now()
        evidence = report.evidence()
        digest = report.digest() if request_id is not None else None
        verdicts, states, validations = _verdicts(report.success, frozenset(evidence))
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
            "outcome_request_key": request_id,
            "outcome_request_hash": digest,
        }
        write = OutcomeWrite(
            caller.account_id,
            execution_id,
            moment,
            outcome,
            states,
            validations,
            request.fencing_token,
        )
        return cls(write, verdicts, report.success, request_id, digest)


def _refused(writes: Sequence[OutcomeWrite], rows: Sequence[Any]) -> list[tuple[uuid.UUID, uuid.UUID]]:
    return [(w.account_id, w.execution_id) for w, row in zip(writes, rows, strict=True) if row is None]


def _paired(writes: Sequence[OutcomeWrite], rows: Sequence[Any], found: Mapping[Any, Any]) -> list[_Written]:
    return [
        (row, None if row is not None else found.get((w.account_id, w.execution_id)))
        for w, row in zip(writes, rows, strict=True)
    ]


async def _with_refusals(
    repos: Repositories, writes: Sequence[OutcomeWrite], rows: Sequence[AnyRow | None]
) -> list[_Written]:
    return _paired(writes, rows, await repos.executions.write_once_states(_refused(writes, rows)))


def _written_sqlite(conn: sqlite3.Connection, writes: Sequence[OutcomeWrite]) -> list[_Written]:
    """SQLite: the batch and, in its transaction, why the other reports did not apply."""
    rows = record_outcomes_sqlite(conn, writes)
    return _paired(writes, rows, write_once_states_sqlite(conn, _refused(writes, rows)))


class OutcomeService:
    def __init__(
        self,
        db: Database,
        *,
        failed: Callable[[Sequence[uuid.UUID]], None] = lambda ids: None,
        alerts: AlertService | None = None,
        lead: float = 0.0,
    ) -> None:
        self._db = db
        self._failed = failed
        self._alerts = alerts
        # Concurrent reports share one statement (group commit). On PostgreSQL,
        # with the scheduler's `lead`, a worker report whose cue is due within it
        # (a firing may hold the cue until then) is left out of its batch and
        # written apart, waiting for the cue; the batches behind it do not wait.
        self._lead = dt.timedelta(seconds=lead)
        self._writes: Coalescer[OutcomeWrite, _Written] = Coalescer(
            partial(self._write_batch, leave_held=True)
        )
        self._held: Coalescer[OutcomeWrite, _Written] = Coalescer(
            partial(self._write_batch, leave_held=False)
        )
        # The recorded outcomes of executions that refused a report here, by
        # (account, execution), each with the monotonic time it is kept until.
        # An outcome is written once and never changes, so a later report is
        # refused (or, repeated under its request id, answered) from this alone,
        # without a statement: a race of many writers, or a client retrying,
        # costs the database one read. Each is kept RECORDED_SECONDS from its
        # read: a cue deleted through another process or replica takes its
        # executions with it, and a report then finds none. A cue deleted on
        # this process clears them all, and what reads were under way then
        # (the generation moved on) is not remembered.
        self._recorded: OrderedDict[tuple[uuid.UUID, uuid.UUID], tuple[float, AnyRow]] = OrderedDict()
        self._generation = 0

    def forget_recorded(self) -> None:
        """Executions may have been deleted: answer every report from the database again."""
        self._recorded.clear()
        self._generation += 1

    async def _written(
        self, writes: Sequence[OutcomeWrite]
    ) -> list[tuple[AnyRow | None, AnyRow | ApiError | None]]:
        """Each report's written row, or None and what it found instead: the
        recorded outcome remembered here, or what the statement found."""
        clock = time.monotonic()
        known = [self._known((w.account_id, w.execution_id), clock) for w in writes]
        unknown = [w for w, found in zip(writes, known, strict=True) if found is None]
        generation = self._generation
        written = await self._write_all(unknown) if unknown else []
        if generation == self._generation:  # no deletion since the reads began
            self._remember(unknown, written, clock + RECORDED_SECONDS)
        answers = iter(written)
        return [(None, found) if found is not None else next(answers) for found in known]

    def _known(self, key: tuple[uuid.UUID, uuid.UUID], clock: float) -> AnyRow | None:
        remembered = self._recorded.get(key)
        if remembered is None:
            return None
        until, found = remembered
        if until <= clock:
            del self._recorded[key]
            return None
        return found

    def _remember(self, writes: Sequence[OutcomeWrite], written: Sequence[_Written], until: float) -> None:
        """Remember the recorded outcomes that refused these reports (read from
        the database, never from this memory: its window does not grow)."""
        for write, (row, found) in zip(writes, written, strict=True):
            if row is None and found is not None and not isinstance(found, ApiError):
                if found.outcome_recorded_at is None:  # a stale claim's report: nothing recorded yet
                    continue
                key = (write.account_id, write.execution_id)
                self._recorded[key] = (until, found)
                self._recorded.move_to_end(key)
        while len(self._recorded) > RECORDED_MAX:
            self._recorded.popitem(last=False)

    async def _write_all(
        self, writes: Sequence[OutcomeWrite]
    ) -> list[tuple[AnyRow | None, AnyRow | ApiError | None]]:
        written = await self._writes.submit_many(writes)
        held = [write for write, (row, _) in zip(writes, written, strict=True) if isinstance(row, Held)]
        again = iter(await self._held.submit_many(held) if held else ())
        answers = []
        for row, found in written:
            if isinstance(row, Held):
                row, found = next(again)
                assert not isinstance(row, Held)  # the waiting form leaves nothing out
            answers.append((row, found))
        return answers

    async def _write_batch(self, writes: Sequence[OutcomeWrite], leave_held: bool) -> list[_Written]:
        """The batch's statement, then, for the reports that did not apply, why
        not (read at once after it: a race of many writers, or a client's
        retries, is mostly refusals). Held reports come back as (HELD, None)."""
        if self._db.backend == "sqlite":  # one transaction, run on the writer's thread
            return await self._db.sqlite_write(partial(_written_sqlite, writes=writes))
        async with self._db.single_statement() as repos:
            held_by = now() + self._lead if leave_held and self._lead else None
            rows = await repos.executions.record_outcomes(writes, held_by=held_by)
        if all(row is not None for row in rows):
            return [(row, None) for row in rows]
        # PostgreSQL: the statement has committed, so a failure to read the refusals
        # is their answer alone (503: retry); the reports that applied keep theirs.
        try:
            async with self._db.reader() as repos:
                return await _with_refusals(repos, writes, rows)
        except Exception:
            log.exception("reading why %d reports did not apply failed", sum(row is None for row in rows))
            return [(row, service_unavailable() if row is None else None) for row in rows]

    async def record(self, caller: Caller, request: ReportRequest) -> RecordedOutcome:
        parsed = parse_uuid(request.execution_id)
        if parsed is None:
            raise execution_not_found()
        pending = _Pending.of(caller, parsed, request)
        [(row, found)] = await self._written([pending.write])
        return self._answer(pending, row, found)

    async def record_many(
        self, caller: Caller, reports: Sequence[ReportRequest]
    ) -> list[RecordedOutcome | ApiError]:
        """Several reports written together, each applied or refused on its own
        (the error a single `record` would raise is its result). A malformed
        report fails the whole call, naming it by its position."""
        pending: list[_Pending | ApiError] = []
        for index, request in enumerate(reports):
            parsed = parse_uuid(request.execution_id)
            if parsed is None:
                pending.append(execution_not_found())
                continue
            try:
                pending.append(_Pending.of(caller, parsed, request))
            except ApiError as exc:
                if exc.violations:
                    raise exc.within(f"outcomes.{index}") from None
                raise ApiError(exc.code, f"outcomes.{index}: {exc.message}", exc.http_status) from None
        written = [p for p in pending if isinstance(p, _Pending)]
        answers = iter(await self._written([p.write for p in written]))
        results: list[RecordedOutcome | ApiError] = []
        for entry in pending:
            if isinstance(entry, ApiError):
                results.append(entry)
                continue
            try:
                results.append(self._answer(entry, *next(answers)))
            except ApiError as exc:
                results.append(exc)
        return results

    def _answer(
        self, pending: _Pending, row: AnyRow | None, found: AnyRow | ApiError | None
    ) -> RecordedOutcome:
        """The answer to a written report: the recorded outcome, the original one
        for an idempotent repeat, or why it did not apply (`found`: what a report
        that did not apply found, None if no such execution)."""
        if row is None:
            if isinstance(found, ApiError):
                raise found
            if found is None:
                raise execution_not_found()
            if found.outcome_recorded_at is None:
                raise stale_claim()
            if pending.request_id is None or pending.request_id != found.outcome_request_key:
                raise outcome_already_recorded()
            if pending.digest != found.outcome_request_hash:
                raise idempotency_key_conflict()
            original = reported_reason(found.outcome_verification_mode, found.outcome_reported_state)
            return RecordedOutcome(
                str(found.id), found.outcome_reported_state, original, bool(found.outcome_late)
            )
        if row.transport == "worker" and row.status == "failed":
            self._failed([row.id])
        if self._alerts is not None:
            if row.outcome_state == "verification_failed":
                self._alerts.verification_failed([row.id])
            if not pending.success and row.transport == "webhook":  # worker failures arrive through `failed`
                self._alerts.failures([row.id])
        reason = pending.verdicts[row.outcome_verification_mode].reason
        return RecordedOutcome(str(row.id), row.outcome_state, reason, bool(row.outcome_late))

    # --- after the report -------------------------------------------------------------------

    async def verify(self, caller: Caller, execution_id: str, valid: bool, reason: str | None) -> str:
        """verified_success, or verification_failed with the reason appended to the summary."""
        parsed = _execution_id(execution_id)
        async with self._db.unit_of_work() as uow:
            row = await uow.executions.outcome_for_update(caller.account_id, parsed)
            if row is None:
                raise execution_not_found()
            if row.outcome_state not in REVIEWABLE:
                raise invalid_state(f"Cannot verify from state '{row.outcome_state or 'null'}'")
            values: dict[str, Any] = {"updated_at": now()}
            if valid:
                values["outcome_state"] = "verified_success"
            else:
                values["outcome_state"] = "verification_failed"
                note = f"verification rejected: {reason}" if reason else "verification rejected"
                values["summary"] = (f"{row.summary} | {note}" if row.summary else note)[:MAX_SUMMARY]
            await uow.executions.update_outcome(parsed, values)
            await uow.commit()
        return str(values["outcome_state"])

    async def mark_pending(self, caller: Caller, execution_id: str) -> None:
        parsed = _execution_id(execution_id)
        async with self._db.unit_of_work() as uow:
            row = await uow.executions.outcome_for_update(caller.account_id, parsed)
            if row is None:
                raise execution_not_found()
            if row.outcome_recorded_at is None:
                raise no_outcome("No outcome recorded yet")
            if row.outcome_state not in REVIEWABLE:
                raise invalid_state(f"Cannot mark pending from state '{row.outcome_state}'")
            await uow.executions.update_outcome(
                parsed, {"outcome_state": "verification_pending", "updated_at": now()}
            )
            await uow.commit()

    async def update_evidence(self, caller: Caller, execution_id: str, evidence: Evidence) -> str:
        """Present fields replace the stored ones; a policy's failed verdict is re-run."""
        parsed = _execution_id(execution_id)
        evidence = check_evidence(evidence)
        moment = now()
        async with self._db.unit_of_work() as uow:
            row = await uow.executions.outcome_for_update(caller.account_id, parsed)
            if row is None:
                raise execution_not_found()
            if row.outcome_recorded_at is None:
                raise no_outcome("Report outcome first before appending evidence")
            values: dict[str, Any] = {k: v for k, v in evidence.columns().items() if v is not None}
            merged = {
                name: values.get(name, getattr(row, name))
                for name in ("external_id", "result_url", "artifacts")
            }
            present = {name for name, value in merged.items() if value}
            if present and row.evidence_produced_at is None:
                values["evidence_produced_at"] = moment
            state = row.outcome_state
            if state == "verification_failed" and row.validation_state == "invalid":  # set by the policy
                rerun = verdict(True, row.outcome_verification_mode, present)
                if rerun.outcome_state == "verified_success":
                    state = values["outcome_state"] = "verified_success"
                    values["validation_state"] = "valid"
            values["updated_at"] = moment
            await uow.executions.update_outcome(parsed, values)
            await uow.commit()
        return str(state)

    async def apply_deadlines(self, moment: dt.datetime) -> None:
        """Housekeeping: no report by the outcome deadline makes the outcome unknown."""
        async with self._db.unit_of_work() as uow:
            expired = await uow.executions.expire_deadlines(moment, 500)
            await uow.commit()
        if self._alerts is not None and expired:
            self._alerts.outcome_timeouts([row.id for row in expired])


REVIEWABLE = ("reported_success", "reported_failure", "verification_pending")
MAX_SUMMARY = 500


@dataclass(frozen=True)
class Evidence:
    external_id: str | None = None
    result_url: str | None = None
    result_ref: str | None = None
    result_type: str | None = None
    summary: str | None = None
    artifacts: str | None = None  # JSON array text
    metadata: str | None = None  # JSON object text

    def columns(self) -> dict[str, Any]:
        return {
            "external_id": self.external_id or None,
            "result_url": self.result_url,
            "result_ref": self.result_ref or None,
            "result_type": self.result_type,
            "summary": self.summary[:MAX_SUMMARY] if self.summary is not None else None,
            "artifacts": self.artifacts,
            "evidence_metadata": self.metadata,
        }


def check_evidence(evidence: Evidence) -> Evidence:
    """The outcome's evidence rules (the summary is truncated, not refused)."""
    checked = check_report(
        OutcomeReport(
            success=True,
            metadata=evidence.metadata,
            external_id=evidence.external_id,
            result_url=evidence.result_url,
            artifacts=evidence.artifacts,
        )
    )
    return Evidence(
        external_id=checked.external_id,
        result_url=checked.result_url,
        result_ref=evidence.result_ref,
        result_type=evidence.result_type,
        summary=evidence.summary,
        artifacts=checked.artifacts,
        metadata=checked.metadata,
    )


def _execution_id(value: str) -> uuid.UUID:
    parsed = parse_uuid(value)
    if parsed is None:
        raise execution_not_found()
    return parsed


def invalid_state(message: str) -> ApiError:
    return ApiError("invalid_state", message, 409)


def no_outcome(message: str) -> ApiError:
    return ApiError("no_outcome", message, 409)
