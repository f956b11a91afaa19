"""Executions: reading them. (Creation lives with cues, the scheduler and claims.)"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cueline_server.errors import ApiError, execution_not_found
from cueline_server.services.accounts import Caller
from cueline_server.services.identifiers import parse_uuid
from cueline_server.store.database import Database
from cueline_server.store.repositories import AnyRow

STATUSES = ("pending", "delivering", "success", "failed", "retrying", "retry_ready", "missed")


@dataclass(frozen=True)
class ExecutionPage:
    executions: Sequence[AnyRow]
    total: int
    limit: int
    offset: int
    oldest_claimed_at: dt.datetime | None

    @property
    def has_more(self) -> bool:
        return self.offset + self.limit < self.total


def _statuses(status: str | None, status_in: str | None) -> list[str] | None:
    """`status`, or the comma-separated `status__in` (not both)."""
    if status_in is None:
        return [status] if status is not None else None
    if status is not None:
        raise ApiError("conflicting_filters", "Use either status or status__in, not both", 400)
    statuses = [part.strip() for part in status_in.split(",")]
    unknown = [part for part in statuses if part not in STATUSES]
    if unknown:
        listed = ", ".join(f"'{part}'" for part in unknown)
        raise ApiError("invalid_status_in", f"Invalid status in status__in: {listed}", 400)
    return statuses


class ExecutionService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, caller: Caller, execution_id: str) -> AnyRow:
        parsed = parse_uuid(execution_id)
        if parsed is None:
            raise execution_not_found()
        # One primary-key read, on the reader: clients poll an execution for its
        # outcome, and a read transaction's BEGIN and ROLLBACK cost more than it.
        async with self._db.reader() as repos:
            row = await repos.executions.read(caller.account_id, parsed)
        if row is None:
            raise execution_not_found()
        return row

    async def page(
        self,
        caller: Caller,
        *,
        status: str | None,
        status_in: str | None,
        limit: int | None,
        offset: int | None,
        **filters: Any,
    ) -> ExecutionPage:
        """`filters`: cue_id, worker_id, outcome_state, triggered_by, has_evidence, result_type."""
        limit = 20 if limit is None else limit
        offset = offset or 0
        statuses = _statuses(status, status_in)
        async with self._db.unit_of_work(write=False) as uow:
            rows, total, oldest = await uow.executions.page(
                caller.account_id, statuses=statuses, limit=limit, offset=offset, **filters
            )
        return ExecutionPage(rows, total, limit, offset, oldest)
