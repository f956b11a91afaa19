"""Reports refused by a recorded outcome are answered from that outcome once
the process has read it: an outcome is written once, so a later report needs no
statement. The memory holds for a window only, and a cue deleted on the process
clears it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import update

from cueline_server.config import Settings
from cueline_server.errors import ApiError
from cueline_server.services import outcomes as outcomes_module
from cueline_server.services.cues import CueService
from cueline_server.services.outcomes import OutcomeReport, OutcomeService, ReportRequest
from cueline_server.store.database import Database
from cueline_server.store.tables import executions
from tests.unit.test_claim_races import _accounts_and_cue, _fire, _run


async def _unrecord(db: Database, execution: str) -> None:
    """Clear an execution's recorded outcome: what only a hand-written statement
    can do. A report read from the database would now apply."""
    async with db.unit_of_work() as uow:
        await uow.conn.execute(
            update(executions)
            .where(executions.c.id == uuid.UUID(execution))
            .values(outcome_recorded_at=None, outcome_request_key=None, outcome_request_hash=None)
        )
        await uow.commit()


def _report(execution: str, *, success: bool = True, request_id: str | None = None) -> ReportRequest:
    return ReportRequest(execution, OutcomeReport(success=success, result="done"), request_id=request_id)


def test_a_refused_report_is_remembered_and_later_ones_answered_from_it(database_url: str) -> None:
    async def scenario(db: Database, settings: Settings) -> None:
        owner, stranger, cue_id = await _accounts_and_cue(db, settings)
        outcomes = OutcomeService(db)
        cues = CueService(db, settings, deleted=outcomes.forget_recorded)
        execution = await _fire(cues, owner, cue_id)
        first = await outcomes.record(owner, _report(execution, request_id="k-1"))
        assert first.outcome_state == "reported_success"
        with pytest.raises(ApiError) as refused:
            await outcomes.record(owner, _report(execution, success=False))  # read: now remembered
        assert refused.value.code == "outcome_already_recorded"

        await _unrecord(db, execution)
        with pytest.raises(ApiError) as again:
            await outcomes.record(owner, _report(execution, success=False))
        assert again.value.code == "outcome_already_recorded"
        repeated = await outcomes.record(owner, _report(execution, request_id="k-1"))
        assert (repeated.execution_id, repeated.outcome_state) == (execution, "reported_success")
        with pytest.raises(ApiError) as changed:
            await outcomes.record(owner, _report(execution, success=False, request_id="k-1"))
        assert changed.value.code == "idempotency_key_conflict"
        with pytest.raises(ApiError) as other_account:  # the memory is the owner's alone
            await outcomes.record(stranger, _report(execution))
        assert other_account.value.code == "execution_not_found"

        await cues.delete(owner, cue_id)
        with pytest.raises(ApiError) as gone:
            await outcomes.record(owner, _report(execution))
        assert gone.value.code == "execution_not_found"

    _run(database_url, scenario)


def test_a_recorded_outcome_is_remembered_for_its_window_only(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outcomes_module, "RECORDED_SECONDS", 0.0)

    async def scenario(db: Database, settings: Settings) -> None:
        owner, _, cue_id = await _accounts_and_cue(db, settings)
        outcomes = OutcomeService(db)
        execution = await _fire(CueService(db, settings), owner, cue_id)
        await outcomes.record(owner, _report(execution))
        with pytest.raises(ApiError) as refused:
            await outcomes.record(owner, _report(execution, success=False))
        assert refused.value.code == "outcome_already_recorded"
        await _unrecord(db, execution)
        applied = await outcomes.record(owner, _report(execution, success=False))  # read anew: it applies
        assert applied.outcome_state == "reported_failure"

    _run(database_url, scenario)


def test_a_deletion_during_a_read_keeps_what_it_read_out_of_the_memory(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cue deleted while a report's batch was being written and read: what
    that batch read is not remembered, as it may be of a deleted execution."""

    async def scenario(db: Database, settings: Settings) -> None:
        owner, _, cue_id = await _accounts_and_cue(db, settings)
        outcomes = OutcomeService(db)
        execution = await _fire(CueService(db, settings), owner, cue_id)
        await outcomes.record(owner, _report(execution))
        write_all = outcomes._write_all

        async def deleted_meanwhile(writes: Any) -> Any:
            written = await write_all(writes)
            outcomes.forget_recorded()  # as CueService.delete calls it after its commit
            return written

        monkeypatch.setattr(outcomes, "_write_all", deleted_meanwhile)
        with pytest.raises(ApiError) as refused:
            await outcomes.record(owner, _report(execution, success=False))
        assert refused.value.code == "outcome_already_recorded"
        monkeypatch.setattr(outcomes, "_write_all", write_all)
        await _unrecord(db, execution)
        applied = await outcomes.record(owner, _report(execution, success=False))  # read anew
        assert applied.outcome_state == "reported_failure"

    _run(database_url, scenario)


def test_a_batch_mixes_remembered_and_new_reports_in_order(database_url: str) -> None:
    async def scenario(db: Database, settings: Settings) -> None:
        owner, _, cue_id = await _accounts_and_cue(db, settings)
        outcomes = OutcomeService(db)
        cues = CueService(db, settings)
        done, fresh, keyed = [await _fire(cues, owner, cue_id) for _ in range(3)]
        await outcomes.record(owner, _report(done))
        await outcomes.record(owner, _report(keyed, request_id="k-2"))
        for execution in (done, keyed):  # refused once: remembered
            with pytest.raises(ApiError):
                await outcomes.record(owner, _report(execution, success=False))
        await _unrecord(db, done)
        answers = await outcomes.record_many(
            owner,
            [
                _report(done, success=False),
                _report(fresh, success=False),
                _report(keyed, request_id="k-2"),
                _report(str(uuid.uuid4())),
            ],
        )
        got = [a.code if isinstance(a, ApiError) else (a.execution_id, a.outcome_state) for a in answers]
        assert got == [
            "outcome_already_recorded",  # from the memory: the row was changed behind it
            (fresh, "reported_failure"),
            (keyed, "reported_success"),  # the idempotent repeat, from the memory
            "execution_not_found",
        ]

    _run(database_url, scenario)
