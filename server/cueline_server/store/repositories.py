"""Repositories: the SQL for each aggregate. They run statements on the
connection of a unit of work and never commit.

Rows come back as SQLAlchemy Row objects whose attributes are the column
names in tables.py; the service layer reads them, the servicers render them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, Unpack

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Row,
    String,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    not_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from cueline_server.store.tables import UTCDateTime, accounts, cues, executions, workers

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

    async def due(self, now: dt.datetime, limit: int) -> Sequence[AnyRow]:
        """Active cues whose next run has come, oldest first. Rows another
        scheduler holds are skipped (PostgreSQL), so replicas share the work."""
        result = await self.conn.execute(
            select(cues)
            .where(cues.c.status == "active", cues.c.next_run <= now)
            .order_by(cues.c.next_run)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return result.all()

    async def earliest_next_run(self) -> dt.datetime | None:
        result = await self.conn.execute(select(func.min(cues.c.next_run)).where(cues.c.status == "active"))
        value: dt.datetime | None = result.scalar()
        return value

    async def advance(self, steps: Sequence[Mapping[str, Any]], now: dt.datetime) -> None:
        """Move each cue to its next run and count what fired: rows of
        {"cue_id", "next_run", "fired"}."""
        if not steps:
            return
        await self.conn.execute(
            update(cues)
            .where(cues.c.id == bindparam("b_cue_id"))
            .values(
                next_run=bindparam("b_next_run", type_=UTCDateTime),
                fired_count=cues.c.fired_count + bindparam("b_fired", type_=BigInteger),
                updated_at=now,
            ),
            [{"b_cue_id": s["cue_id"], "b_next_run": s["next_run"], "b_fired": s["fired"]} for s in steps],
        )

    async def delete(self, account_id: uuid.UUID, cue_id: str) -> bool:
        result = await self.conn.execute(
            delete(cues).where(cues.c.account_id == account_id, cues.c.id == cue_id).returning(cues.c.id)
        )
        return result.first() is not None


class ExecutionRepository(_Repository):
    async def add(self, values: Mapping[str, Any]) -> None:
        await self._insert(insert(executions).values(**values))

    async def add_scheduled(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Insert scheduled executions, skipping any (cue, slot) that already has
        one; returns the cue id of each row inserted."""
        if not rows:
            return []
        dialect_insert = postgresql.insert if self.conn.dialect.name == "postgresql" else sqlite.insert
        statement = (
            dialect_insert(executions)
            .on_conflict_do_nothing(
                index_elements=[executions.c.cue_id, executions.c.scheduled_for],
                index_where=executions.c.triggered_by == "scheduled",
            )
            .returning(executions.c.cue_id)
        )
        result = await self.conn.execute(statement, list(rows))
        return [row.cue_id for row in result]

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
        now: dt.datetime,
        outcome: Mapping[str, Any],
        verdicts: Mapping[str | None, tuple[str, str | None]],
    ) -> AnyRow | None:
        """The write-once guard: one conditional UPDATE that succeeds only while
        no outcome is recorded. `outcome` holds the outcome and evidence columns;
        `verdicts` maps each verification mode (None: unset) to its
        (outcome_state, validation_state), and the statement picks the one for
        the cue's mode at this moment. Returns None when it did not apply (no
        such execution, or an outcome is already there)."""
        params: dict[str, Any] = {f"p_{name}": outcome.get(name) for name in _OUTCOME_COLUMNS}
        for mode, (state, validation) in verdicts.items():
            params[f"p_state_{mode or 'unset'}"] = state
            params[f"p_validation_{mode or 'unset'}"] = validation
        params.update(p_execution_id=execution_id, p_account_id=account_id, p_now=now)
        result = await self.conn.execute(_record_outcome_statement(), params)
        return result.first()


VERIFICATION_MODES = ("none", "require_external_id", "require_result_url", "require_artifacts", "manual")
_OUTCOME_COLUMNS = (
    "outcome_success",
    "outcome_result",
    "outcome_error",
    "outcome_metadata",
    "external_id",
    "result_url",
    "result_ref",
    "result_type",
    "summary",
    "artifacts",
    "evidence_produced_at",
)


@cache
def _record_outcome_statement() -> Any:
    """Built once; every call only binds parameters (the compiled form is cached)."""
    t = executions
    mode = select(cues.c.verification_mode).where(cues.c.id == t.c.cue_id).scalar_subquery()

    def by_mode(prefix: str) -> Any:
        whens = [(mode == m, bindparam(f"p_{prefix}_{m}", type_=String)) for m in VERIFICATION_MODES]
        return case(*whens, else_=bindparam(f"p_{prefix}_unset", type_=String))

    now = bindparam("p_now", type_=UTCDateTime)
    worker = t.c.transport == "worker"
    values: dict[str, Any] = {name: bindparam(f"p_{name}", type_=t.c[name].type) for name in _OUTCOME_COLUMNS}
    success = values["outcome_success"]
    values.update(
        outcome_recorded_at=now,
        outcome_late=and_(t.c.outcome_deadline_at.is_not(None), t.c.outcome_deadline_at < now),
        outcome_verification_mode=mode,
        outcome_state=by_mode("state"),
        validation_state=by_mode("validation"),
        # Worker transport: the report completes the execution.
        status=case((worker, case((success, "success"), else_="failed")), else_=t.c.status),
        delivered_at=case((and_(worker, success), now), else_=t.c.delivered_at),
        error_message=case((and_(worker, not_(success)), values["outcome_error"]), else_=t.c.error_message),
        updated_at=now,
    )
    return (
        update(t)
        .where(
            t.c.id == bindparam("p_execution_id", type_=t.c.id.type),
            t.c.account_id == bindparam("p_account_id", type_=t.c.account_id.type),
            t.c.outcome_recorded_at.is_(None),
        )
        .values(**values)
        .returning(t.c.id, t.c.outcome_state, t.c.outcome_late, t.c.outcome_verification_mode)
    )


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
