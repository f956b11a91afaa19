"""Stored rows rendered as the cueline.v1 resource messages."""

from __future__ import annotations

import json

from cueline.v1 import cues_pb2, executions_pb2, outcomes_pb2
from cueline_server.servicers.convert import put_time, to_enum
from cueline_server.services.cues import CueView
from cueline_server.store.repositories import AnyRow


def cue_message(view: CueView, target: cues_pb2.Cue | None = None) -> cues_pb2.Cue:
    row = view.row
    cue = target if target is not None else cues_pb2.Cue()
    cue.id = row.id
    cue.name = row.name
    if row.description is not None:
        cue.description = row.description
    cue.status = to_enum(cues_pb2.CueStatus, row.status)
    cue.transport = to_enum(cues_pb2.Transport, row.transport)
    cue.schedule.type = to_enum(cues_pb2.ScheduleType, row.schedule_type)
    if row.cron is not None:
        cue.schedule.cron = row.cron
    put_time(cue.schedule.at, row.at)
    cue.schedule.timezone = row.timezone
    if row.callback_url is not None:
        cue.callback.url = row.callback_url
    cue.callback.method = row.callback_method
    cue.callback.headers.update(json.loads(row.callback_headers))
    cue.payload = row.payload
    cue.retry.max_attempts = row.retry_max_attempts
    cue.retry.backoff_minutes.extend(json.loads(row.retry_backoff_minutes))
    put_time(cue.next_run, row.next_run)
    put_time(cue.last_run, row.last_run)
    cue.run_count = row.run_count
    cue.fired_count = row.fired_count
    cue.on_failure.email = row.on_failure_email
    if row.on_failure_webhook is not None:
        cue.on_failure.webhook = row.on_failure_webhook
    cue.on_failure.pause = row.on_failure_pause
    if row.verification_mode is not None:
        cue.verification.mode = to_enum(cues_pb2.VerificationMode, row.verification_mode)
    cue.delivery.timeout_seconds = row.timeout_seconds
    cue.delivery.outcome_deadline_seconds = row.outcome_deadline_seconds
    cue.alerts.consecutive_failures = row.alert_consecutive_failures
    cue.alerts.missed_window_multiplier = row.alert_missed_window_multiplier
    cue.catch_up = to_enum(cues_pb2.CatchUpPolicy, row.catch_up)
    if view.warning is not None:
        cue.warning = view.warning
    put_time(cue.created_at, row.created_at)
    put_time(cue.updated_at, row.updated_at)
    return cue


_OPTIONAL_TEXT = ("error_message", "claimed_by_worker", "response_body")
_EXECUTION_TIMES = (
    "next_retry",
    "started_at",
    "delivered_at",
    "last_attempt_at",
    "claimed_at",
    "last_heartbeat_at",
    "outcome_deadline_at",
    "created_at",
    "updated_at",
)
_EVIDENCE = ("external_id", "result_url", "result_ref", "result_type", "summary", "artifacts")


def execution_message(
    row: AnyRow, target: executions_pb2.Execution | None = None
) -> executions_pb2.Execution:
    execution = target if target is not None else executions_pb2.Execution()
    execution.id = str(row.id)
    execution.cue_id = row.cue_id
    put_time(execution.scheduled_for, row.scheduled_for)
    execution.status = to_enum(executions_pb2.ExecutionStatus, row.status)
    execution.triggered_by = to_enum(executions_pb2.TriggeredBy, row.triggered_by)
    if row.replayed_from is not None:
        execution.replayed_from = str(row.replayed_from)
    execution.payload = row.payload
    if row.http_status is not None:
        execution.http_status = row.http_status
    for name in _OPTIONAL_TEXT:
        value = getattr(row, name)
        if value is not None:
            setattr(execution, name, value)
    execution.attempts = row.attempts
    for name in _EXECUTION_TIMES:
        put_time(getattr(execution, name), getattr(row, name))
    execution.outcome_state = to_enum(outcomes_pb2.OutcomeState, row.outcome_state)
    if row.outcome_recorded_at is not None:
        execution.outcome_success = row.outcome_success
        outcome = execution.outcome
        outcome.success = row.outcome_success
        if row.outcome_result is not None:
            outcome.result = row.outcome_result
        if row.outcome_error is not None:
            outcome.error = row.outcome_error
        if row.outcome_metadata is not None:
            outcome.metadata = row.outcome_metadata
        put_time(outcome.recorded_at, row.outcome_recorded_at)
        outcome.late = bool(row.outcome_late)
        for name in _EVIDENCE:
            value = getattr(row, name)
            if value is not None:
                setattr(outcome, name, value)
        outcome.validation_state = to_enum(outcomes_pb2.ValidationState, row.validation_state)
        if row.evidence_metadata is not None:
            outcome.evidence_metadata = row.evidence_metadata
    return execution
