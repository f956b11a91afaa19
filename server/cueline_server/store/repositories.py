"""Repositories: the SQL for each aggregate. They run statements on the
connection of a unit of work and never commit.

Rows come back as SQLAlchemy Row objects whose attributes are the column
names in tables.py; the service layer reads them, the servicers render them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

from sqlalchemy import ColumnElement, Row, and_, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from cueline_server.store.tables import accounts, cues, executions, workers

AnyRow = Row[Unpack[tuple[Any, ...]]]  # noqa: UP044 (mypy reads the Unpack form)
"""A result row of any width; its attributes are the column names."""


class DuplicateError(Exception):
    """A unique constraint refused the write."""


class _Repository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def _insert(self, statement: Any) -> None:
        try:
            await self.conn.execute(statement)
        except IntegrityError as exc:
            raise DuplicateError(str(exc.orig)) from exc


class AccountRepository(_Repository):
    async def add(self, values: Mapping[str, Any]) -> None:
        await self._insert(insert(accounts).values(**values))

    async def by_key_hash(self, key_hash: str) -> AnyRow | None:
        result = await self.conn.execute(
            select(accounts.c.id, accounts.c.rate_limit_per_minute).where(accounts.c.api_key_hash == key_hash)
        )
        return result.first()

    async def rotated_at_for_previous_key(self, key_hash: str) -> dt.datetime | None:
        result = await self.conn.execute(
            select(accounts.c.key_rotated_at).where(accounts.c.previous_key_hash == key_hash)
        )
        value: dt.datetime | None = result.scalar()
        return value

    async def get(self, account_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(select(accounts).where(accounts.c.id == account_id))
        return result.first()

    async def email_taken(self, email_key: str) -> bool:
        result = await self.conn.execute(select(accounts.c.id).where(accounts.c.email_key == email_key))
        return result.first() is not None


class CueRepository(_Repository):
    async def add(self, values: Mapping[str, Any]) -> None:
        await self._insert(insert(cues).values(**values))

    async def get(self, account_id: uuid.UUID, cue_id: str) -> AnyRow | None:
        result = await self.conn.execute(
            select(cues).where(cues.c.account_id == account_id, cues.c.id == cue_id)
        )
        return result.first()

    async def name_taken(self, account_id: uuid.UUID, name: str, *, besides: str | None = None) -> bool:
        query = select(cues.c.id).where(cues.c.account_id == account_id, cues.c.name == name)
        if besides is not None:
            query = query.where(cues.c.id != besides)
        return (await self.conn.execute(query)).first() is not None

    async def count(self, account_id: uuid.UUID, statuses: Sequence[str]) -> int:
        result = await self.conn.execute(
            select(func.count())
            .select_from(cues)
            .where(cues.c.account_id == account_id, cues.c.status.in_(statuses))
        )
        return int(result.scalar_one())

    async def page(
        self, account_id: uuid.UUID, status: str | None, limit: int, offset: int
    ) -> tuple[Sequence[AnyRow], int]:
        condition: ColumnElement[bool] = cues.c.account_id == account_id
        if status is not None:
            condition = and_(condition, cues.c.status == status)
        rows = await self.conn.execute(
            select(cues)
            .where(condition)
            .order_by(cues.c.created_at.desc(), cues.c.id)
            .limit(limit)
            .offset(offset)
        )
        total = await self.conn.execute(select(func.count()).select_from(cues).where(condition))
        return rows.all(), int(total.scalar_one())

    async def update(self, account_id: uuid.UUID, cue_id: str, values: Mapping[str, Any]) -> AnyRow | None:
        try:
            result = await self.conn.execute(
                update(cues)
                .where(cues.c.account_id == account_id, cues.c.id == cue_id)
                .values(**values)
                .returning(*cues.c)
            )
        except IntegrityError as exc:
            raise DuplicateError(str(exc.orig)) from exc
        return result.first()

    async def count_fired(self, cue_id: str, fired: int, now: dt.datetime) -> None:
        await self.conn.execute(
            update(cues)
            .where(cues.c.id == cue_id)
            .values(fired_count=cues.c.fired_count + fired, updated_at=now)
        )

    async def delete(self, account_id: uuid.UUID, cue_id: str) -> bool:
        result = await self.conn.execute(
            delete(cues).where(cues.c.account_id == account_id, cues.c.id == cue_id).returning(cues.c.id)
        )
        return result.first() is not None


class ExecutionRepository(_Repository):
    async def add(self, values: Mapping[str, Any]) -> None:
        await self._insert(insert(executions).values(**values))

    async def get(self, account_id: uuid.UUID, execution_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(
            select(executions).where(executions.c.account_id == account_id, executions.c.id == execution_id)
        )
        return result.first()

    async def exists(self, account_id: uuid.UUID, execution_id: uuid.UUID) -> bool:
        result = await self.conn.execute(
            select(executions.c.id).where(
                executions.c.account_id == account_id, executions.c.id == execution_id
            )
        )
        return result.first() is not None

    async def page(
        self,
        account_id: uuid.UUID,
        *,
        cue_id: str | None = None,
        status: str | None = None,
        limit: int,
        offset: int,
    ) -> tuple[Sequence[AnyRow], int, dt.datetime | None]:
        """A page newest first, the total, and the earliest claimed_at of the filtered set."""
        condition: ColumnElement[bool] = executions.c.account_id == account_id
        if cue_id is not None:
            condition = and_(condition, executions.c.cue_id == cue_id)
        if status is not None:
            condition = and_(condition, executions.c.status == status)
        rows = await self.conn.execute(
            select(executions)
            .where(condition)
            .order_by(executions.c.created_at.desc(), executions.c.id)
            .limit(limit)
            .offset(offset)
        )
        summary = await self.conn.execute(
            select(func.count(), func.min(executions.c.claimed_at)).select_from(executions).where(condition)
        )
        total, oldest = summary.one()
        return rows.all(), int(total), oldest

    async def count_created_since(self, account_id: uuid.UUID, since: dt.datetime) -> int:
        result = await self.conn.execute(
            select(func.count())
            .select_from(executions)
            .where(executions.c.account_id == account_id, executions.c.created_at >= since)
        )
        return int(result.scalar_one())

    async def record_outcome(
        self,
        account_id: uuid.UUID,
        execution_id: uuid.UUID,
        values: Mapping[str, Any],
    ) -> AnyRow | None:
        """The write-once guard: one conditional UPDATE that succeeds only while
        no outcome is recorded. Returns None when it did not apply (no such
        execution, or an outcome is already there)."""
        result = await self.conn.execute(
            update(executions)
            .where(
                executions.c.account_id == account_id,
                executions.c.id == execution_id,
                executions.c.outcome_recorded_at.is_(None),
            )
            .values(**values)
            .returning(
                executions.c.id,
                executions.c.outcome_state,
                executions.c.outcome_late,
                executions.c.outcome_verification_mode,
            )
        )
        return result.first()


class WorkerRepository(_Repository):
    async def heartbeat(
        self, account_id: uuid.UUID, worker_id: str, handlers: str | None, now: dt.datetime
    ) -> None:
        dialect_insert = postgresql.insert if self.conn.dialect.name == "postgresql" else sqlite.insert
        statement = dialect_insert(workers).values(
            account_id=account_id,
            worker_id=worker_id,
            handlers=handlers,
            last_heartbeat=now,
            registered_since=now,
        )
        await self.conn.execute(
            statement.on_conflict_do_update(
                index_elements=[workers.c.account_id, workers.c.worker_id],
                set_={"handlers": statement.excluded.handlers, "last_heartbeat": now},
            )
        )

    async def all(self, account_id: uuid.UUID) -> Sequence[AnyRow]:
        result = await self.conn.execute(
            select(workers)
            .where(workers.c.account_id == account_id)
            .order_by(workers.c.last_heartbeat.desc(), workers.c.worker_id)
        )
        return result.all()

    async def any_alive(self, account_id: uuid.UUID, since: dt.datetime) -> bool:
        result = await self.conn.execute(
            select(workers.c.worker_id)
            .where(workers.c.account_id == account_id, workers.c.last_heartbeat >= since)
            .limit(1)
        )
        return result.first() is not None

    async def delete(self, account_id: uuid.UUID, worker_id: str) -> bool:
        result = await self.conn.execute(
            delete(workers)
            .where(workers.c.account_id == account_id, workers.c.worker_id == worker_id)
            .returning(workers.c.worker_id)
        )
        return result.first() is not None
