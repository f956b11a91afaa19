"""Executions: reading them. (Creation lives with cues and the scheduler.)"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cueline_server.errors import execution_not_found
from cueline_server.services.accounts import Caller
from cueline_server.services.identifiers import parse_uuid
from cueline_server.store.database import Database
from cueline_server.store.repositories import AnyRow


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


class ExecutionService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, caller: Caller, execution_id: str) -> AnyRow:
        parsed = parse_uuid(execution_id)
        if parsed is None:
            raise execution_not_found()
        async with self._db.unit_of_work(write=False) as uow:
            row = await uow.executions.get(caller.account_id, parsed)
        if row is None:
            raise execution_not_found()
        return row

    async def page(
        self, caller: Caller, *, cue_id: str | None, status: str | None, limit: int | None, offset: int | None
    ) -> ExecutionPage:
        limit = 20 if limit is None else limit
        offset = offset or 0
        async with self._db.unit_of_work(write=False) as uow:
            rows, total, oldest = await uow.executions.page(
                caller.account_id, cue_id=cue_id, status=status, limit=limit, offset=offset
            )
        return ExecutionPage(rows, total, limit, offset, oldest)
