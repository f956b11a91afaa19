"""Repositories: the SQL for each aggregate. They run statements on the
connection of a unit of work and never commit.

Rows come back as SQLAlchemy Row objects whose attributes are the column
names in tables.py; the service layer reads them, the servicers render them.
The hot statements that run on psycopg directly on PostgreSQL (`_Direct`)
return named tuples with the same attributes.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import uuid
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, NamedTuple, Unpack

from psycopg.rows import namedtuple_row
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Row,
    String,
    Table,
    Uuid,
    and_,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.selectable import CTE

from cueline_server.store.tables import (
    LIVE_CUE_STATUSES,
    UTCDateTime,
    accounts,
    alerts,
    cues,
    executions,
    fire_keys,
    workers,
)

AnyRow = Row[Unpack[tuple[Any, ...]]]  # noqa: UP044 (mypy reads the Unpack form)
"""A result row of any width; its attributes are the column names."""


class DuplicateError(Exception):
    """A unique constraint refused the write."""


def _count_where(condition: ColumnElement[bool]) -> Any:
    """How many of the aggregated rows meet `condition` (0 when there are none)."""
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _given(**filters: Any) -> dict[str, Any]:
    return {name: value for name, value in filters.items() if value is not None}


def _of_account(table: Table) -> ColumnElement[bool]:
    return table.c.account_id == bindparam("account_id")


def _evidence(table: Table) -> ColumnElement[bool]:
    return table.c.evidence_produced_at.is_not(None) == bindparam("has_evidence")


# The list pages' filters, by table and name: each a condition on a bound
# parameter of that name.
_PAGE_FILTERS: dict[str, dict[str, Callable[[Table], ColumnElement[bool]]]] = {
    "cues": {
        "account_id": _of_account,
        "status": lambda t: t.c.status == bindparam("status"),
    },
    "executions": {
        "account_id": _of_account,
        "cue_id": lambda t: t.c.cue_id == bindparam("cue_id"),
        "statuses": lambda t: t.c.status.in_(bindparam("statuses", expanding=True)),
        "worker_id": lambda t: t.c.claimed_by_worker == bindparam("worker_id"),
        "outcome_state": lambda t: t.c.outcome_state == bindparam("outcome_state"),
        "triggered_by": lambda t: t.c.triggered_by == bindparam("triggered_by"),
        "has_evidence": _evidence,
        "result_type": lambda t: t.c.result_type == bindparam("result_type"),
    },
    "alerts": {
        "account_id": _of_account,
        "alert_type": lambda t: t.c.alert_type == bindparam("alert_type"),
        "cue_id": lambda t: t.c.cue_id == bindparam("cue_id"),
        "acknowledged": lambda t: t.c.acknowledged == bindparam("acknowledged"),
        "since": lambda t: t.c.created_at >= bindparam("since"),
    },
}


@cache
def _newest_page_statement(table_name: str, filters: tuple[str, ...]) -> Any:
    """`_Repository._newest_page`'s statement, built once per table and set of
    filters (building its subqueries costs more than running it). The summary
    of every matching row is joined to the page, so both come from one
    snapshot in one round trip, and a page past the end still has the summary.
    Each page row carries the summary's columns too."""
    table = {"cues": cues, "executions": executions, "alerts": alerts}[table_name]
    condition = and_(*(_PAGE_FILTERS[table_name][name](table) for name in filters))
    aggregates = [func.min(table.c.claimed_at).label("oldest_claimed_at")] if table is executions else []
    summary = (
        select(func.count().label("matching"), *aggregates)
        .select_from(table)
        .where(condition)
        .subquery("matched")
    )
    page = (
        select(table)
        .where(condition)
        .order_by(table.c.created_at.desc(), table.c.id)
        .limit(bindparam("page_limit", type_=BigInteger))
        .offset(bindparam("page_offset", type_=BigInteger))
        .subquery("page")
    )
    return (
        select(summary, page)
        .select_from(summary.outerjoin(page, true()))
        .order_by(page.c.created_at.desc(), page.c.id)
    )


class _Repository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def _newest_page(
        self, table: Table, limit: int, offset: int, filters: Mapping[str, Any]
    ) -> tuple[list[AnyRow], AnyRow]:
        """A page of the account's rows of `table` that pass `filters` (name:
        value, of _PAGE_FILTERS), newest first, and a summary of every row that
        passes: `matching`, and for executions `oldest_claimed_at`."""
        statement = _newest_page_statement(table.name, tuple(sorted(filters)))
        result = await self.conn.execute(statement, {**filters, "page_limit": limit, "page_offset": offset})
        rows = result.all()  # past the end: the summary alone, with NULL table columns
        return [row for row in rows if row.id is not None], rows[0]

    async def _insert(self, table: Table, values: Mapping[str, Any]) -> None:
        """One row, `values` given as the parameters of the table's plain INSERT:
        SQLAlchemy then compiles it once per set of columns, where a statement
        built around the values is built and keyed anew on every call."""
        try:
            await self.conn.execute(insert(table), dict(values))
        except IntegrityError as exc:
            raise DuplicateError(str(exc.orig)) from exc


class AccountRepository(_Repository):
    async def add(self, values: Mapping[str, Any]) -> None:
        await self._insert(accounts, values)

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

    async def standing(self, account_id: uuid.UUID, since: dt.datetime, *, outcomes: bool) -> AnyRow | None:
        """The account's row with its counts, in one statement (one snapshot):
        `live_cues` (active or paused), `active_cues`, `executions_since`
        (created since `since`) and, with `outcomes`, that period's `reported`,
        `succeeded` and `failed` outcomes (failure reports plus failed or missed
        executions that were never reported)."""
        result = await self.conn.execute(_standing(outcomes), {"s_account": account_id, "s_since": since})
        return result.first()

    async def update(self, account_id: uuid.UUID, values: Mapping[str, Any]) -> None:
        await self.conn.execute(update(accounts).where(accounts.c.id == account_id).values(**values))

    async def webhook_secret(self, account_id: uuid.UUID) -> str | None:
        result = await self.conn.execute(select(accounts.c.webhook_secret).where(accounts.c.id == account_id))
        value: str | None = result.scalar()
        return value

    async def email_taken(self, email_key: str, *, besides: uuid.UUID | None = None) -> bool:
        query = select(accounts.c.id).where(accounts.c.email_key == email_key)
        if besides is not None:
            query = query.where(accounts.c.id != besides)
        return (await self.conn.execute(query)).first() is not None


class CueRepository(_Repository):
    async def add(self, values: Mapping[str, Any]) -> None:
        await self._insert(cues, values)

    async def get(self, account_id: uuid.UUID, cue_id: str) -> AnyRow | None:
        result = await self.conn.execute(_cue_by_id(), {"g_account": account_id, "g_cue": cue_id})
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
        filters = _given(account_id=account_id, status=status)
        rows, summary = await self._newest_page(cues, limit, offset, filters)
        return rows, summary.matching

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
        """Active cues whose next run has come, oldest first, with what firing
        them needs. Rows another scheduler holds are skipped (PostgreSQL), so
        replicas share the work."""
        result = await self.conn.execute(_due_cues(), {"d_now": now, "d_limit": limit})
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
        postgres = self.conn.dialect.name == "postgresql"
        time = _json_time if postgres else _sqlite_time
        batch = [{"id": s["cue_id"], "next_run": time(s["next_run"]), "fired": s["fired"]} for s in steps]
        await self.conn.execute(
            _ADVANCE_POSTGRES if postgres else _ADVANCE_SQLITE, {"batch": json.dumps(batch), "now": now}
        )

    async def record_results(self, results: Sequence[tuple[str, str]], now: dt.datetime) -> None:
        """Executions of these cues reached a final status (cue id, and success,
        failed or missed): count each, and end or pause the cue as its schedule and
        policy say. Cue rows are updated in id order, so concurrent transactions
        (replicas) lock them in one order and cannot deadlock on them."""
        if results:
            await self.conn.execute(
                _record_result_statement(),
                [
                    {"r_cue_id": cue_id, "r_status": status, "r_now": now}
                    for cue_id, status in sorted(results)
                ],
            )

    async def delete(self, account_id: uuid.UUID, cue_id: str) -> bool:
        # The executions first, then the cue: the order an outcome report takes its
        # locks in (the execution, then its cue's counters). The other order, the
        # cascade's, deadlocked against reports arriving during the delete.
        await self.conn.execute(
            delete(executions).where(executions.c.account_id == account_id, executions.c.cue_id == cue_id)
        )
        result = await self.conn.execute(
            delete(cues).where(cues.c.account_id == account_id, cues.c.id == cue_id).returning(cues.c.id)
        )
        return result.first() is not None


class ExecutionRepository(_Repository):
    async def add(self, values: Mapping[str, Any]) -> None:
        await self._insert(executions, values)

    async def add_fired(self, fires: Sequence[tuple[Mapping[str, Any], dt.datetime]]) -> None:
        """New executions (each the keys of `new_execution`, with its fire time),
        and their cues' fired counts. On PostgreSQL one statement per fire, to be
        run in autocommit mode; on SQLite one insert and one update for them all.
        Raises DuplicateError when an insert is refused (its cue is gone)."""
        parameters = [
            {**{f"x_{name}": values[name] for name in _FIRED_COLUMNS}, "x_now": moment}
            for values, moment in fires
        ]
        try:
            if self.conn.dialect.name == "postgresql":
                for each in parameters:
                    await self.conn.execute(_fire_postgres(), each)
                return
            await self.conn.execute(_fire_insert(), parameters)
            await self.conn.execute(_count_fired(), parameters)
        except IntegrityError as exc:
            raise DuplicateError(str(exc.orig)) from exc

    async def add_scheduled(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Insert scheduled executions, skipping any (cue, slot) that already has
        one; returns the cue id of each row inserted."""
        if not rows:
            return []
        postgres = self.conn.dialect.name == "postgresql"
        batch = json.dumps([_json_execution(row, postgres) for row in rows])
        statement = _ADD_SCHEDULED_POSTGRES if postgres else _ADD_SCHEDULED_SQLITE
        return list((await self.conn.execute(statement, {"batch": batch})).scalars())

    async def get(self, account_id: uuid.UUID, execution_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(
            _execution_by_id(), {"g_account": account_id, "g_execution": execution_id}
        )
        return result.first()

    async def read(self, account_id: uuid.UUID, execution_id: uuid.UUID) -> AnyRow | None:
        """`get` on the reader (`Database.reader`) only: on PostgreSQL it runs on
        the driver directly (`_Direct`), whose errors only the reader turns
        into SQLAlchemy's. Clients poll an execution for its outcome."""
        if self.conn.dialect.name != "postgresql":
            return await self.get(account_id, execution_id)
        parameters = {"g_account": account_id, "g_execution": execution_id}
        rows = await _EXECUTION_BY_ID_DIRECT.rows(self.conn, parameters)
        return rows[0] if rows else None

    async def write_once_states(
        self, keys: Sequence[tuple[uuid.UUID, uuid.UUID]]
    ) -> dict[tuple[uuid.UUID, uuid.UUID], AnyRow]:
        """PostgreSQL: why write-once UPDATEs did not apply (the recorded report,
        its key and the claim count), by (account, execution); a key missing from
        the answer has no such execution in that account. SQLite's twin is
        `write_once_states_sqlite`."""
        ids = list({execution_id for _, execution_id in keys})
        result = await _write_once_states_direct().rows(self.conn, {"w_ids": _pg_array("uuid", ids)})
        return _states_wanted(keys, result)

    async def page(
        self,
        account_id: uuid.UUID,
        *,
        cue_id: str | None = None,
        statuses: Sequence[str] | None = None,
        worker_id: str | None = None,
        outcome_state: str | None = None,
        triggered_by: str | None = None,
        has_evidence: bool | None = None,
        result_type: str | None = None,
        limit: int,
        offset: int,
    ) -> tuple[Sequence[AnyRow], int, dt.datetime | None]:
        """A page newest first, the total, and the earliest claimed_at of the filtered set."""
        filters = _given(
            account_id=account_id, cue_id=cue_id, statuses=statuses, worker_id=worker_id,
            outcome_state=outcome_state, triggered_by=triggered_by, has_evidence=has_evidence,
            result_type=result_type,
        )  # fmt: skip
        rows, summary = await self._newest_page(executions, limit, offset, filters)
        return rows, summary.matching, summary.oldest_claimed_at

    async def outcome_for_update(self, account_id: uuid.UUID, execution_id: uuid.UUID) -> AnyRow | None:
        """The execution's outcome columns, locked for a read-modify-write."""
        result = await self.conn.execute(
            select(executions)
            .where(executions.c.account_id == account_id, executions.c.id == execution_id)
            .with_for_update()
        )
        return result.first()

    async def update_outcome(self, execution_id: uuid.UUID, values: Mapping[str, Any]) -> None:
        await self.conn.execute(update(executions).where(executions.c.id == execution_id).values(**values))

    async def expire_deadlines(self, now: dt.datetime, limit: int) -> Sequence[AnyRow]:
        """Executions whose outcome deadline passed with no report become unknown."""
        overdue = (
            select(executions.c.id)
            .where(
                executions.c.outcome_recorded_at.is_(None),
                executions.c.outcome_state.is_(None),
                executions.c.outcome_deadline_at < now,
            )
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        ids = [row.id for row in await self.conn.execute(overdue)]
        if not ids:
            return []
        result = await self.conn.execute(
            update(executions)
            .where(executions.c.id.in_(ids), executions.c.outcome_recorded_at.is_(None))
            .values(outcome_state="unknown", updated_at=now)
            .returning(executions.c.id, executions.c.account_id, executions.c.cue_id)
        )
        return result.all()

    async def queue_counts(self, now: dt.datetime, stale_before: dt.datetime) -> AnyRow:
        """Work in flight across all accounts, for /health."""
        t = executions
        webhook, worker = t.c.transport == "webhook", t.c.transport == "worker"
        result = await self.conn.execute(
            select(
                _count_where(and_(webhook, t.c.status.in_(("pending", "delivering")))).label(
                    "pending_webhook_deliveries"
                ),
                _count_where(t.c.status.in_(("retrying", "retry_ready"))).label("pending_retries"),
                _count_where(and_(worker, t.c.status == "pending")).label("pending_worker_claims"),
                _count_where(
                    or_(
                        and_(webhook, t.c.status == "delivering", t.c.last_attempt_at < stale_before),
                        and_(worker, t.c.status == "delivering", t.c.lease_expires_at <= now),
                    )
                ).label("stale_executions"),
            ).where(t.c.status.in_(("pending", "delivering", "retrying", "retry_ready")))
        )
        return result.one()

    async def record_outcomes(
        self, writes: Sequence[OutcomeWrite], *, held_by: dt.datetime | None = None
    ) -> list[Any]:
        """PostgreSQL: the write-once guard for a batch of reports. Each applies
        only while its execution has no outcome, and a worker execution's report
        also settles its cue. Returns, per report, the recorded row, or None when
        it did not apply (no such execution, an outcome is already there, or a
        stale fencing token); given `held_by`, HELD for a worker report whose cue
        is due by then (not tried: write it again without `held_by`).
        SQLite's twin is `record_outcomes_sqlite`."""
        results: list[Any] = [None] * len(writes)
        pending = list(range(len(writes)))
        while pending:
            tried, later = _one_per_execution(writes, pending)
            rows = await self._record_distinct_postgres(writes, tried, held_by)
            pending = _retried(writes, results, tried, rows, later)
        return results

    async def _record_distinct_postgres(
        self, writes: Sequence[OutcomeWrite], indexes: Sequence[int], held_by: dt.datetime | None
    ) -> list[Any]:
        items = [writes[index].parameters(index) for index in indexes]
        parameters: dict[str, Any] = {
            name: _pg_array(kind, [item[name] for item in items]) for name, kind in _BATCH_COLUMNS
        }
        if held_by is not None:
            parameters["held_by"] = held_by
        rows = await _RECORD_OUTCOMES_DIRECT[held_by is not None].rows(self.conn, parameters)
        by_index = {row.ord: HELD if row.held else row for row in rows}
        return [by_index.get(index) for index in indexes]


class Held:
    """The result of a report left out of its batch: its cue is due soon, and a firing may hold it."""


HELD = Held()


# Several reports for one execution are tried in batch order until one applies,
# as they would be one by one. A statement can apply only one report per
# execution (which of several joined rows an UPDATE uses is not defined), so each
# statement takes the earliest untried report of each execution; a later one
# needs another statement only if the earlier did not apply.
def _one_per_execution(writes: Sequence[OutcomeWrite], pending: Sequence[int]) -> tuple[list[int], list[int]]:
    """The pending reports to try now (the earliest of each execution), and the rest."""
    first: dict[uuid.UUID, int] = {}
    later = []
    for index in pending:
        if first.setdefault(writes[index].execution_id, index) != index:
            later.append(index)
    return list(first.values()), later


def _retried(
    writes: Sequence[OutcomeWrite],
    results: list[Any],
    tried: Sequence[int],
    rows: Sequence[Any],
    later: Sequence[int],
) -> list[int]:
    """Keeps the tried reports' rows; returns the later reports whose
    execution's earlier report did not apply (they are tried next). Those after
    a held report are held with it, so they are still tried after it."""
    applied = set()
    held = set()
    for index, row in zip(tried, rows, strict=True):
        results[index] = row
        if row is HELD:
            held.add(writes[index].execution_id)
        elif row is not None:
            applied.add(writes[index].execution_id)
    retried = []
    for index in later:
        execution_id = writes[index].execution_id
        if execution_id in held:
            results[index] = HELD
        elif execution_id not in applied:
            retried.append(index)
    return retried


def record_outcomes_sqlite(conn: sqlite3.Connection, writes: Sequence[OutcomeWrite]) -> list[Any]:
    """SQLite: `ExecutionRepository.record_outcomes` on the driver's own
    connection, inside the caller's write transaction: this runs whole on the
    writer connection's thread (`Database.sqlite_write`), not in the event loop."""
    results: list[Any] = [None] * len(writes)
    pending = list(range(len(writes)))
    while pending:
        tried, later = _one_per_execution(writes, pending)
        rows = _record_distinct_sqlite(conn, writes, tried)
        pending = _retried(writes, results, tried, rows, later)
    return results


def _record_distinct_sqlite(
    conn: sqlite3.Connection, writes: Sequence[OutcomeWrite], indexes: Sequence[int]
) -> list[AppliedReport | None]:
    """One UPDATE ... FROM json_each for the reports (one per execution:
    SQLite's RETURNING cannot name the batch row that applied), then one
    settlement per cue."""
    by_execution: dict[str, int] = {}
    items = []
    for index in indexes:
        write = writes[index]
        item = write.parameters(index)
        item.update(
            id=write.execution_id.hex,
            account_id=write.account_id.hex,
            now=_sqlite_time(write.now),
            evidence_at=_sqlite_time(item["evidence_at"]),
        )
        by_execution[item["id"]] = index
        items.append(item)
    recorded: dict[int, AppliedReport] = {}
    settle: dict[str, dict[str, Any]] = {}
    returned = conn.execute(_RECORD_OUTCOMES_SQLITE, {"batch": json.dumps(items)}).fetchall()
    for id_hex, cue_id, transport, status, state, late, mode in sorted(
        returned, key=lambda r: by_execution[r[0]]
    ):
        index = by_execution[id_hex]
        recorded[index] = AppliedReport(uuid.UUID(id_hex), cue_id, transport, status, state, bool(late), mode)
        if transport != "worker":
            continue
        moment = writes[index].now
        cue = settle.setdefault(
            cue_id,
            {"cue_id": cue_id, "successes": 0, "failures": 0, "first_succeeded": status == "success"},
        )
        cue["successes"] += status == "success"
        cue["failures"] += status == "failed"
        cue["last_now"] = max(cue.get("last_now", moment), moment)
    if settle:
        conn.executemany(
            _SETTLE_CUES_SQLITE,
            [{**cue, "last_now": _sqlite_time(cue["last_now"])} for cue in settle.values()],
        )
    return [recorded.get(index) for index in indexes]


class WriteOnceState(NamedTuple):
    """Why a report did not apply: the columns `write_once_states` reads."""

    account_id: uuid.UUID
    id: uuid.UUID
    outcome_recorded_at: dt.datetime | None
    attempts: int
    outcome_request_key: str | None
    outcome_request_hash: str | None
    outcome_reported_state: str | None
    outcome_late: bool | None
    outcome_verification_mode: str | None


@cache
def _write_once_states_sqlite() -> _SqliteDirect:
    ids = func.json_each(bindparam("w_ids", type_=String)).table_valued("value")
    states = select(*(executions.c[name] for name in WriteOnceState._fields))
    return _SqliteDirect(states.where(executions.c.id.in_(select(ids.c.value))))


def _states_wanted(
    keys: Sequence[tuple[uuid.UUID, uuid.UUID]], rows: Sequence[Any]
) -> dict[tuple[uuid.UUID, uuid.UUID], Any]:
    """The rows read by execution id, by (account, execution), for the keys
    asked: another account's execution of the same id is not the caller's."""
    wanted = set(keys)
    return {key: row for row in rows if (key := (row.account_id, row.id)) in wanted}


def write_once_states_sqlite(
    conn: sqlite3.Connection, keys: Sequence[tuple[uuid.UUID, uuid.UUID]]
) -> dict[tuple[uuid.UUID, uuid.UUID], Any]:
    """SQLite: `ExecutionRepository.write_once_states` on the driver's own
    connection, for `record_outcomes_sqlite`'s transaction."""
    if not keys:
        return {}
    ids = json.dumps(sorted({execution_id.hex for _, execution_id in keys}))
    return _states_wanted(keys, _write_once_states_sqlite().rows(conn, {"w_ids": ids}))


def _sqlite_time(value: dt.datetime | None) -> str | None:
    """A datetime as SQLAlchemy stores it in SQLite (naive UTC, microseconds)."""
    return None if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclass(frozen=True)
class OutcomeWrite:
    """One report for the write-once guard. `outcome` holds the outcome and
    evidence columns; `states` and `validations` are JSON objects that map each
    verification mode ("unset" for none) to the report's outcome_state and
    validation_state under it, and the statement picks the ones for the cue's
    mode at that moment."""

    account_id: uuid.UUID
    execution_id: uuid.UUID
    now: dt.datetime
    outcome: Mapping[str, Any]
    states: str
    validations: str
    fencing_token: int | None = None

    def parameters(self, index: int) -> dict[str, Any]:
        """This report's element of each array parameter of the batch statement."""
        o = self.outcome
        return {
            "ord": index,
            "id": self.execution_id,
            "account_id": self.account_id,
            "fencing": self.fencing_token,
            "now": self.now,
            "success": o["outcome_success"],
            "result": o.get("outcome_result"),
            "error": o.get("outcome_error"),
            "metadata": o.get("outcome_metadata"),
            "external_id": o.get("external_id"),
            "result_url": o.get("result_url"),
            "result_ref": o.get("result_ref"),
            "result_type": o.get("result_type"),
            "summary": o.get("summary"),
            "artifacts": o.get("artifacts"),
            "evidence_at": o.get("evidence_produced_at"),
            "request_key": o.get("outcome_request_key"),
            "request_hash": o.get("outcome_request_hash"),
            "states": self.states,
            "validations": self.validations,
        }


VERIFICATION_MODES = ("none", "require_external_id", "require_result_url", "require_artifacts", "manual")


def _settle_cue(status: Any, now: Any) -> dict[str, Any]:
    """The cue's side of an execution reaching `status` (success, failed, missed):
    count a success; a once cue ends (completed or failed); a recurring cue
    whose on_failure says pause is paused."""
    succeeded = status == "success"
    # Comparisons, not IN lists: an IN list is an expanding parameter, re-rendered on every call.
    ends_once = and_(
        cues.c.schedule_type == "once", or_(cues.c.status == "active", cues.c.status == "paused")
    )
    pauses = and_(
        cues.c.schedule_type == "recurring", cues.c.status == "active", ~succeeded, cues.c.on_failure_pause
    )
    return {
        "run_count": cues.c.run_count + case((succeeded, 1), else_=0),
        "last_run": case((or_(status == "success", status == "failed"), now), else_=cues.c.last_run),
        "status": case(
            (ends_once, case((succeeded, "completed"), else_="failed")),
            (pauses, "paused"),
            else_=cues.c.status,
        ),
        "next_run": case((or_(ends_once, pauses), None), else_=cues.c.next_run),
        "updated_at": now,
    }


@cache
def _record_result_statement() -> Any:
    values = _settle_cue(bindparam("r_status", type_=String), bindparam("r_now", type_=UTCDateTime))
    return update(cues).where(cues.c.id == bindparam("r_cue_id", type_=String)).values(**values)


# The write-once guard for a batch of reports. Each database gets the batch as
# one parameter or a fixed set of them, so the statement text is the same
# whatever the batch size. `v` is the batch (one row per report), `c` the
# execution's cue, whose verification mode picks the report's verdict.
_OUTCOME_SET = """
    outcome_recorded_at = v.now, outcome_success = v.success, outcome_result = v.result,
    outcome_error = v.error, outcome_metadata = v.metadata, external_id = v.external_id,
    result_url = v.result_url, result_ref = v.result_ref, result_type = v.result_type,
    summary = v.summary, artifacts = v.artifacts, evidence_produced_at = v.evidence_at,
    outcome_request_key = v.request_key, outcome_request_hash = v.request_hash,
    outcome_late = (e.outcome_deadline_at IS NOT NULL AND e.outcome_deadline_at < v.now),
    outcome_verification_mode = c.verification_mode,
    outcome_state = {state}, outcome_reported_state = {state}, validation_state = {validation},
    status = CASE WHEN e.transport = 'worker'
                  THEN CASE WHEN v.success THEN 'success' ELSE 'failed' END ELSE e.status END,
    delivered_at = CASE WHEN e.transport = 'worker' AND v.success THEN v.now ELSE e.delivered_at END,
    error_message = CASE WHEN e.transport = 'worker' AND NOT v.success
                         THEN v.error ELSE e.error_message END,
    updated_at = v.now"""
# The execution is found by its primary key only: `{same_account}` checks the
# account without offering the planner the account index, which it would otherwise
# pick with stale statistics and scan an account's executions for every report.
_OUTCOME_WHERE = """e.id = v.id AND {same_account} AND c.id = e.cue_id
    AND e.outcome_recorded_at IS NULL AND (v.fencing IS NULL OR e.attempts = v.fencing)"""


class AppliedReport(NamedTuple):
    """What the batch statements return for a report that applied (on SQLite, as this tuple)."""

    id: uuid.UUID
    cue_id: str
    transport: str
    status: str
    outcome_state: str
    outcome_late: bool
    outcome_verification_mode: str | None


_OUTCOME_RETURNING = AppliedReport._fields
# A worker report settles its cue; `s` holds, per cue, the batch's successes and
# failures, whether the first report succeeded, and the latest report time.
_SETTLE_SET = """
    run_count = cues.run_count + s.successes,
    last_run = s.last_now,
    status = CASE
      WHEN cues.schedule_type = 'once' AND cues.status IN ('active', 'paused')
        THEN CASE WHEN s.first_succeeded THEN 'completed' ELSE 'failed' END
      WHEN cues.schedule_type = 'recurring' AND cues.status = 'active' AND s.failures > 0
           AND cues.on_failure_pause THEN 'paused'
      ELSE cues.status END,
    next_run = CASE
      WHEN cues.schedule_type = 'once' AND cues.status IN ('active', 'paused') THEN NULL
      WHEN cues.schedule_type = 'recurring' AND cues.status = 'active' AND s.failures > 0
           AND cues.on_failure_pause THEN NULL
      ELSE cues.next_run END,
    updated_at = s.last_now"""

# The columns of the batch `v`, with their PostgreSQL types: each report's
# `OutcomeWrite.parameters` has one value per column.
_BATCH_COLUMNS = (
    ("ord", "int"),
    ("id", "uuid"),
    ("account_id", "uuid"),
    ("fencing", "bigint"),
    ("now", "timestamptz"),
    ("success", "boolean"),
    ("result", "text"),
    ("error", "text"),
    ("metadata", "text"),
    ("external_id", "text"),
    ("result_url", "text"),
    ("result_ref", "text"),
    ("result_type", "text"),
    ("summary", "text"),
    ("artifacts", "text"),
    ("evidence_at", "timestamptz"),
    ("request_key", "text"),
    ("request_hash", "text"),
    ("states", "text"),
    ("validations", "text"),
)


# PostgreSQL: the reports arrive as arrays (unnest), and the batch and its cues'
# settlement are one statement (data-modifying CTEs): one round trip, atomic,
# short enough for psycopg's parse cache. Of several reports for one execution
# the UPDATE applies one; RETURNING names it by `ord`.
#
# A worker report settles its cue, so it needs the cue's row lock, which a
# firing holds from the scheduler's lead until its due moment. In the form with
# `held_by`, a worker report whose cue is due by then is left out and returned
# with `held` set, to be written apart in the form without: the reports batched
# with it do not wait for the firing. There too the execution is found by its
# primary key only: with stale statistics the planner took the transport index
# for `e.transport = 'worker'` and read every worker execution (about 1 ms with
# 11,000 of them, against 0.2 ms for the whole statement); `IS TRUE` keeps it off.
def _record_outcomes(leave_held: bool) -> Any:
    same_account = "e.account_id IS NOT DISTINCT FROM v.account_id"
    only_free = " AND (e.transport <> 'worker' OR c.next_run IS NULL OR c.next_run > :held_by)"
    held = """
UNION ALL
SELECT v.ord, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true
FROM v JOIN executions AS e ON e.id = v.id JOIN cues AS c ON c.id = e.cue_id
WHERE (e.transport = 'worker') IS TRUE AND e.outcome_recorded_at IS NULL AND c.next_run <= :held_by"""
    return text(
        f"""
WITH v AS (
  SELECT * FROM unnest({", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in _BATCH_COLUMNS)})
    AS v({", ".join(name for name, _ in _BATCH_COLUMNS)})
), recorded AS (
  UPDATE executions AS e SET {
            _OUTCOME_SET.format(
                state="v.states::jsonb ->> coalesce(c.verification_mode, 'unset')",
                validation="v.validations::jsonb ->> coalesce(c.verification_mode, 'unset')",
            )
        }
  FROM v, cues AS c
  WHERE {_OUTCOME_WHERE.format(same_account=same_account)}{only_free if leave_held else ""}
  RETURNING v.ord, v.now, {", ".join(f"e.{name}" for name in _OUTCOME_RETURNING)}
), settled AS (
  UPDATE cues SET {_SETTLE_SET}
  FROM (
    SELECT cue_id, count(*) FILTER (WHERE status = 'success') AS successes,
           count(*) FILTER (WHERE status = 'failed') AS failures,
           (array_agg(status ORDER BY ord))[1] = 'success' AS first_succeeded, max(now) AS last_now
    FROM recorded WHERE transport = 'worker' GROUP BY cue_id
  ) AS s
  WHERE cues.id = s.cue_id
)
SELECT ord, id, cue_id, transport, status, outcome_state, outcome_late, outcome_verification_mode,
       false AS held
FROM recorded{held if leave_held else ""}
"""
    )


@cache
def _write_once_states_statement() -> Any:
    """The state of executions by id; the ids are one array literal, so every
    batch size is the same statement."""
    ids = executions.c.id == any_(cast(bindparam("w_ids", type_=String), postgresql.ARRAY(Uuid)))
    return select(*(executions.c[name] for name in WriteOnceState._fields)).where(ids)


@cache
def _write_once_states_direct() -> _Direct:
    return _Direct(_write_once_states_statement())


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# How an array literal spells an element of each kind (the rest as str() does).
# Only text needs quoting: the others never hold a quote, a backslash, a comma,
# a brace or white space.
_ELEMENT: dict[str, Callable[[Any], str]] = {
    "text": _quoted,
    "boolean": lambda value: "t" if value else "f",
    "timestamptz": lambda value: value.isoformat(),
}


def _pg_array(kind: str, values: Sequence[Any]) -> str:
    """`values` as a PostgreSQL array literal of `kind` (what `CAST(... AS kind[])`
    reads), None as NULL."""
    element = _ELEMENT.get(kind, str)
    return "{" + ",".join("NULL" if value is None else element(value) for value in values) + "}"


def _utc_rows(cursor: Any) -> Callable[[Sequence[Any]], Any]:
    """psycopg's named tuples, with timestamps in UTC as the tables' UTCDateTime
    reads them. The driver gives them in the session's time zone: as they are
    when that is UTC (the hot pool's sessions are), else converted."""
    make = namedtuple_row(cursor)
    if cursor.connection.info.timezone is dt.UTC:
        return make

    def row(values: Sequence[Any]) -> Any:
        return make([v.astimezone(dt.UTC) if isinstance(v, dt.datetime) else v for v in values])

    return row


class _Direct:
    """A statement built once and run on psycopg directly, for the hot paths on
    PostgreSQL's autocommit connections (`Database.single_statement` and
    `Database.reader`, which turn the driver's errors into SQLAlchemy's).
    SQLAlchemy's own work per execution (processing every parameter and every
    result value, setting up the cursor and result) cost about as much as a
    short statement's round trip. Array parameters are passed as literals
    (`_pg_array`): psycopg's adaptation of a list costs more than the parse."""

    def __init__(self, statement: Any) -> None:
        compiled = statement.compile(dialect=postgresql.psycopg.dialect())  # type: ignore[no-untyped-call]
        self.sql = str(compiled)
        self._defaults = dict(compiled.params)

    async def rows(self, conn: AsyncConnection, parameters: Mapping[str, Any]) -> list[Any]:
        raw = await conn.get_raw_connection()
        cursor = raw.driver_connection.cursor(row_factory=_utc_rows)  # type: ignore[union-attr]
        await cursor.execute(self.sql, {**self._defaults, **parameters})
        rows: list[Any] = await cursor.fetchall()
        return rows


class _SqliteDirect:
    """A statement built once and run on the driver directly, for SQLite's hot
    paths: on the sqlite3 connection of work that runs whole on the writer's
    thread (`Database.sqlite_write`, `rows`), or in one call to a reader's
    thread (`read`). Parameters and values are converted by the columns' own
    types, as SQLAlchemy converts them; rows are named tuples of the
    statement's columns."""

    def __init__(self, statement: Any) -> None:
        dialect = sqlite.dialect(paramstyle="named")
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        self._defaults = dict(compiled.params)
        self._required = frozenset(name for bind, name in compiled.bind_names.items() if bind.required)
        self._binds = {
            name: processor
            for bind, name in compiled.bind_names.items()
            if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }
        columns = list(statement.exported_columns)
        self._results = [
            (index, processor)
            for index, column in enumerate(columns)
            if (processor := column.type.dialect_impl(dialect).result_processor(dialect, None)) is not None
        ]
        self._row: Any = namedtuple("_Row", [column.key for column in columns])  # type: ignore[misc]

    def rows(self, conn: sqlite3.Connection, parameters: Mapping[str, Any]) -> list[Any]:
        return self._made(conn.execute(self.sql, self._bound(parameters)))

    async def read(self, conn: AsyncConnection, parameters: Mapping[str, Any]) -> list[Any]:
        """The rows, read on SQLAlchemy's connection `conn` by the driver in one
        call to its thread (aiosqlite's `execute_fetchall`; SQLAlchemy's own
        execution takes several). Errors come out as SQLAlchemy's."""
        driver = (await conn.get_raw_connection()).driver_connection
        try:
            found = await driver.execute_fetchall(self.sql, self._bound(parameters))  # type: ignore[union-attr]
        except sqlite3.Error as exc:
            raise DBAPIError.instance(None, None, exc, sqlite3.Error) from exc
        return self._made(found)

    def _bound(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        if missing := self._required - parameters.keys():  # as SQLAlchemy refuses them
            raise ValueError(f"no value for the statement's parameters {sorted(missing)}")
        bound = {**self._defaults, **parameters}
        for name, processor in self._binds.items():
            bound[name] = processor(bound[name])
        return bound

    def _made(self, found: Iterable[Sequence[Any]]) -> list[Any]:
        made = []
        for raw in found:
            values = list(raw)
            for index, processor in self._results:
                values[index] = processor(values[index])
            made.append(self._row._make(values))
        return made


@cache
def _standing(outcomes: bool) -> Any:
    """AccountRepository.standing's statement: the account row joined to one
    row of cue counts and one of the period's execution counts."""
    account_id = bindparam("s_account", type_=Uuid)
    cue_counts = (
        select(func.count().label("live_cues"), _count_where(cues.c.status == "active").label("active_cues"))
        .where(cues.c.account_id == account_id, cues.c.status.in_(LIVE_CUE_STATUSES))
        .subquery()
    )
    t = executions
    reported = t.c.outcome_recorded_at.is_not(None)
    counts: list[Any] = [func.count().label("executions_since")]
    if outcomes:
        counts += [
            _count_where(reported).label("reported"),
            _count_where(and_(reported, t.c.outcome_success.is_(True))).label("succeeded"),
            _count_where(
                or_(
                    and_(reported, t.c.outcome_success.is_(False)),
                    and_(~reported, t.c.status.in_(("failed", "missed"))),
                )
            ).label("failed"),
        ]
    period = (
        select(*counts)
        .where(t.c.account_id == account_id, t.c.created_at >= bindparam("s_since", type_=UTCDateTime))
        .subquery()
    )
    return (
        select(accounts, cue_counts, period)
        .select_from(accounts.join(cue_counts, true()).join(period, true()))
        .where(accounts.c.id == account_id)
    )


@cache
def _execution_by_id() -> Any:
    return select(executions).where(
        executions.c.account_id == bindparam("g_account", type_=Uuid),
        executions.c.id == bindparam("g_execution", type_=Uuid),
    )


_EXECUTION_BY_ID_DIRECT = _Direct(_execution_by_id())

# Every batch runs one of them; each parameter is an array literal.
_RECORD_OUTCOMES_DIRECT = {leave_held: _Direct(_record_outcomes(leave_held)) for leave_held in (False, True)}

# SQLite (plain SQL for the sqlite3 module, see record_outcomes_sqlite): the batch
# is one JSON array of report objects (json_each), in the formats SQLAlchemy
# stores (hex UUIDs, naive UTC datetimes, 0/1 booleans).
_RECORD_OUTCOMES_SQLITE = f"""
UPDATE executions AS e SET {
    _OUTCOME_SET.format(
        state="json_extract(v.states, '$.' || coalesce(c.verification_mode, 'unset'))",
        validation="json_extract(v.validations, '$.' || coalesce(c.verification_mode, 'unset'))",
    )
}
FROM (
  SELECT {", ".join(f"json_extract(value, '$.{name}') AS {name}" for name, _ in _BATCH_COLUMNS)}
  FROM json_each(:batch)
) AS v, cues AS c
WHERE {_OUTCOME_WHERE.format(same_account="+e.account_id = v.account_id")}
RETURNING {", ".join(_OUTCOME_RETURNING)}  -- SQLite's RETURNING takes no table alias
"""

_SETTLE_CUES_SQLITE = f"""
UPDATE cues SET {_SETTLE_SET}
FROM (SELECT :cue_id AS cue_id, :successes AS successes, :failures AS failures,
             :first_succeeded AS first_succeeded, :last_now AS last_now) AS s
WHERE cues.id = s.cue_id
"""


@cache
def _due_cues() -> Any:
    return (
        select(
            cues.c.id,
            cues.c.account_id,
            cues.c.transport,
            cues.c.payload,
            cues.c.schedule_type,
            cues.c.cron,
            cues.c.timezone,
            cues.c.next_run,
            cues.c.catch_up,
        )
        .where(cues.c.status == "active", cues.c.next_run <= bindparam("d_now", type_=UTCDateTime))
        .order_by(cues.c.next_run)
        .limit(bindparam("d_limit", type_=BigInteger))
        .with_for_update(skip_locked=True)
    )


@cache
def _cue_by_id() -> Any:
    return select(cues).where(
        cues.c.account_id == bindparam("g_account", type_=Uuid), cues.c.id == bindparam("g_cue", type_=String)
    )


# The columns of a new execution (services.cues.new_execution).
_FIRED_COLUMNS = (
    "id",
    "account_id",
    "cue_id",
    "transport",
    "scheduled_for",
    "status",
    "triggered_by",
    "payload",
    "task",
    "attempts",
    "available_at",
    "created_at",
    "updated_at",
)


def _postgres_type(column: str) -> str:
    """An executions column's type as PostgreSQL's DDL names it."""
    return str(executions.c[column].type.compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]


# A batch of rows as one JSON array (PostgreSQL's json_to_recordset, SQLite's
# json_each), so the statement text is short and the same whatever the batch
# size, and the batch is one string. A multi-row VALUES list is a statement
# psycopg parses afresh on every call, arrays of 500 values are dumped element by
# element in Python, and an executemany converts every column of every row there.
_SCHEDULED_CONFLICT = """
ON CONFLICT (cue_id, scheduled_for) WHERE triggered_by = 'scheduled' DO NOTHING
RETURNING cue_id
"""
_ADD_SCHEDULED_POSTGRES = text(
    f"""
INSERT INTO executions ({", ".join(_FIRED_COLUMNS)})
SELECT {", ".join(_FIRED_COLUMNS)} FROM json_to_recordset(CAST(:batch AS json))
  AS v({", ".join(f"{name} {_postgres_type(name)}" for name in _FIRED_COLUMNS)})
{_SCHEDULED_CONFLICT}"""
)
# `WHERE true`: without it SQLite would read the ON of ON CONFLICT as a join's.
_ADD_SCHEDULED_SQLITE = text(
    f"""
INSERT INTO executions ({", ".join(_FIRED_COLUMNS)})
SELECT {", ".join(f"json_extract(value, '$.{name}')" for name in _FIRED_COLUMNS)}
FROM json_each(:batch) WHERE true
{_SCHEDULED_CONFLICT}"""
)

_ADVANCE = """
UPDATE cues SET next_run = v.next_run, fired_count = cues.fired_count + v.fired, updated_at = :now
FROM {rows}
WHERE cues.id = v.id
"""
_ADVANCE_POSTGRES = text(
    _ADVANCE.format(
        rows="json_to_recordset(CAST(:batch AS json)) AS v(id text, next_run timestamptz, fired bigint)"
    )
).bindparams(bindparam("now", type_=UTCDateTime))
_ADVANCE_SQLITE = text(
    _ADVANCE.format(
        rows="(SELECT json_extract(value, '$.id') AS id, json_extract(value, '$.next_run') AS next_run,"
        " json_extract(value, '$.fired') AS fired FROM json_each(:batch)) AS v"
    )
).bindparams(bindparam("now", type_=UTCDateTime))


def _json_time(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _json_execution(row: Mapping[str, Any], postgres: bool) -> dict[str, Any]:
    """A new execution's columns as the batch statements read them: on SQLite,
    each value as SQLAlchemy stores it there (UUIDs as 32 hex digits, times as
    naive UTC text)."""
    time = _json_time if postgres else _sqlite_time
    return {
        **row,
        "id": str(row["id"]) if postgres else row["id"].hex,
        "account_id": str(row["account_id"]) if postgres else row["account_id"].hex,
        "scheduled_for": time(row["scheduled_for"]),
        "available_at": time(row["available_at"]),
        "created_at": time(row["created_at"]),
        "updated_at": time(row["updated_at"]),
    }


@cache
def _fire_insert() -> Any:
    return insert(executions).values(
        {name: bindparam(f"x_{name}", type_=executions.c[name].type) for name in _FIRED_COLUMNS}
    )


@cache
def _count_fired() -> Any:
    return (
        update(cues)
        .where(cues.c.id == bindparam("x_cue_id", type_=String))
        .values(fired_count=cues.c.fired_count + 1, updated_at=bindparam("x_now", type_=UTCDateTime))
    )


@cache
def _fire_postgres() -> Any:
    """The insert as a data-modifying CTE of the cue's update: one statement."""
    return _count_fired().add_cte(_fire_insert().cte("fired"))


class FireKeyRepository(_Repository):
    async def get(self, cue_id: str, key: str) -> AnyRow | None:
        result = await self.conn.execute(
            select(fire_keys).where(fire_keys.c.cue_id == cue_id, fire_keys.c.key == key)
        )
        return result.first()

    async def add(self, values: Mapping[str, Any]) -> None:
        """Raises DuplicateError when a concurrent first use got there first."""
        await self._insert(fire_keys, values)

    async def forget(self, cue_id: str, key: str) -> None:
        await self.conn.execute(delete(fire_keys).where(fire_keys.c.cue_id == cue_id, fire_keys.c.key == key))


def _claimer_alive(silent_since: Any) -> ColumnElement[bool]:
    """The execution's claiming worker has sent a heartbeat since `silent_since`."""
    return (
        select(workers.c.worker_id)
        .where(
            workers.c.account_id == executions.c.account_id,
            workers.c.worker_id == executions.c.claimed_by_worker,
            workers.c.last_heartbeat >= silent_since,
        )
        .exists()
    )


def _recoverable_by(now: Any) -> ColumnElement[bool]:
    """The sweeps' reading of `recover_after`: past, or never set (a claim
    written by a server older than the column: a replica not yet upgraded)."""
    return or_(executions.c.recover_after <= now, executions.c.recover_after.is_(None))


def _claimed(worker_id: Any, now: Any, lease_until: Any) -> dict[str, Any]:
    """A claim's changes to its execution, besides the outcome deadline."""
    return {
        "status": "delivering",
        "claimed_by_worker": worker_id,
        "claimed_at": now,
        "last_attempt_at": now,
        "started_at": func.coalesce(executions.c.started_at, now),
        "attempts": executions.c.attempts + 1,
        "last_heartbeat_at": None,
        "lease_expires_at": lease_until,
        "recover_after": lease_until,
        "outcome_state": case(
            (executions.c.outcome_state == "unknown", None), else_=executions.c.outcome_state
        ),
        "updated_at": now,
    }


# What a claim answers with (the Claim message), its order, and whose it is.
_CLAIMED_RETURNING = tuple(
    executions.c[name]
    for name in (
        *("id", "account_id", "cue_id", "task", "payload", "attempts", "lease_expires_at"),
        *("scheduled_for", "created_at"),
    )
)


def _claimable(now: Any, silent_since: Any) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """A worker execution is claimable when it is pending and due, or delivering
    with a lapsed lease and a silent claimer: the one definition shared by the
    list, claim-by-id and claim-next, so a listed execution fails a claim only
    by losing a race. The two conditions: due, and lapsed (which names the
    values of the partial index of executions under a claim, tables.WORKER_LEASES).

    Lapsed reads `recover_after`, never before the lease's end, instead of the
    lease: the lease sweep moves it on while the claimer is alive. Given the
    lease too, the planner's generic plan read every expired lease through the
    (status, lease_expires_at) index, those of live claimers included."""
    due = and_(
        executions.c.transport == "worker",
        executions.c.status == "pending",
        executions.c.scheduled_for <= now,
    )
    lapsed = and_(
        executions.c.transport == _inline("worker"),
        executions.c.status == _inline("delivering"),
        executions.c.recover_after <= now,
        ~_claimer_alive(silent_since),
    )
    return due, lapsed


def _claim_queue(
    account_id: Any,
    now: Any,
    silent_since: Any,
    limit: Any,
    *conditions: ColumnElement[bool],
    lock: bool = False,
) -> CTE:
    """The ids of the account's oldest claimable executions, in claim order,
    with their rank in it (`n`, from 1).

    Each half of `_claimable` is its own scan that stops after `limit` rows:
    an OR of the two would read and sort every claimable row of the account
    on every call. The due half reads the account's pending executions in
    claim order (account, status, scheduled_for, created_at). The lapsed half
    reads the account's claims past their `recover_after` through the partial
    index of leases (ix_executions_worker_leases) and sorts them. It sorts on
    an expression that no index is in the order of: given an index in claim
    order, the planner read the status index instead (its estimate was one
    execution in flight, from statistics gathered before the claims), and so
    read every execution the account had in flight on every call.

    With `lock`, each half skips and locks rows (FOR UPDATE SKIP LOCKED), so
    concurrent claimers never take the same row; a locking CTE runs exactly
    once, so its LIMIT holds."""
    due, lapsed = _claimable(now, silent_since)
    order = (executions.c.scheduled_for, executions.c.created_at)
    sorted_order = tuple(func.coalesce(column, column) for column in order)
    halves = {"due": (due, order), "lapsed": (lapsed, sorted_order)}
    ctes = []
    for name, (state, by) in halves.items():
        half = (
            select(executions.c.id, *order)
            .where(executions.c.account_id == account_id, state, *conditions)
            .order_by(*by)
            .limit(limit)
        )
        if lock:
            half = half.with_for_update(skip_locked=True)
        ctes.append(half.cte(name))
    both = union_all(*(select(cte) for cte in ctes)).subquery("claimable")
    in_order = (both.c.scheduled_for, both.c.created_at)
    rank = func.row_number().over(order_by=in_order).label("n")
    return select(both.c.id, rank).order_by(*in_order).limit(limit).cte("picked")


def _requested_claims(requests: Any, now: Any, silent_since: Any, *, lock: bool) -> CTE:
    """Of the requested executions (`requests`: id, account_id, worker), those
    that are claimable, with the worker that asked. Each is found by its
    primary key: in the ordered queue scan, an id that is no longer claimable
    (a lost race) would read the account's whole queue.

    With `lock` (PostgreSQL), each is looked up on its own (LATERAL) and locked
    with FOR UPDATE SKIP LOCKED. Joined to the requests as a set instead, the
    generic plan scans every claimable execution and filters on the ids."""
    one = select(executions.c.id).where(
        executions.c.id == requests.c.id,
        executions.c.account_id == requests.c.account_id,
        or_(*_claimable(now, silent_since)),
    )
    if lock:
        found = one.with_for_update(skip_locked=True).lateral("found")
        return select(found.c.id, requests.c.worker).select_from(requests.join(found, true())).cte("picked")
    return one.add_columns(requests.c.worker).cte("picked")


def _claim_update_postgres(picked: CTE, worker: Any, now: Any) -> Any:
    """Claim the picked rows and return them; each row's outcome deadline comes
    from its cue."""
    return (
        update(executions)
        .where(executions.c.id == picked.c.id, cues.c.id == executions.c.cue_id)
        .values(
            **_claimed(worker, now, bindparam("c_lease_until", type_=UTCDateTime)),
            outcome_deadline_at=now + func.make_interval(0, 0, 0, 0, 0, 0, cues.c.outcome_deadline_seconds),
        )
        .returning(*_CLAIMED_RETURNING)
    )


@cache
def _claim_next_statement_postgres(by_task: bool, one_worker: bool) -> _Direct:
    """Pick the oldest, lock, claim and return them in one statement, each with
    its rank n. For one worker, `c_limit` rows go to `c_worker`; otherwise the
    n-th oldest goes to the n-th of `c_workers` (an array). Built once per
    shape; every value is a bound parameter."""
    now = bindparam("c_now", type_=UTCDateTime)
    conditions = []
    if by_task:
        conditions.append(executions.c.task == bindparam("c_task", type_=String))
    worker_ids = None if one_worker else bindparam("c_workers", type_=postgresql.ARRAY(String))
    picked = _claim_queue(
        bindparam("c_account", type_=Uuid),
        now,
        bindparam("c_silent_since", type_=UTCDateTime),
        bindparam("c_limit", type_=BigInteger) if worker_ids is None else func.cardinality(worker_ids),
        *conditions,
        lock=True,
    )
    if worker_ids is None:
        claimed = _claim_update_postgres(picked, bindparam("c_worker", type_=String), now)
        return _Direct(claimed.returning(picked.c.n))
    # Joining the workers costs more than the one-worker shape: a batch claim
    # (ClaimExecutions) lost 10-15 % of its rate with it.
    workers = (
        func.unnest(worker_ids).table_valued("worker", with_ordinality="n").render_derived(name="workers")
    )
    assigned = (
        select(picked.c.id, picked.c.n, workers.c.worker)
        .join(workers, workers.c.n == picked.c.n)
        .cte("assigned")
    )
    return _Direct(_claim_update_postgres(assigned, assigned.c.worker, now).returning(assigned.c.n))


@cache
def _claim_each_statement_postgres() -> _Direct:
    """Claims by id, for several workers at once: the requests are three arrays."""
    now = bindparam("c_now", type_=UTCDateTime)
    requests = (
        func.unnest(
            bindparam("c_ids", type_=postgresql.ARRAY(Uuid)),
            bindparam("c_accounts", type_=postgresql.ARRAY(Uuid)),
            bindparam("c_workers", type_=postgresql.ARRAY(String)),
        )
        .table_valued("id", "account_id", "worker")
        .render_derived(name="requests")
    )
    picked = _requested_claims(requests, now, bindparam("c_silent_since", type_=UTCDateTime), lock=True)
    return _Direct(_claim_update_postgres(picked, picked.c.worker, now))


@dataclass(frozen=True)
class ClaimRequest:
    account_id: uuid.UUID
    execution_id: uuid.UUID
    worker_id: str


def _first_requests(
    requests: Sequence[ClaimRequest],
) -> tuple[list[ClaimRequest], dict[tuple[uuid.UUID, uuid.UUID], ClaimRequest]]:
    """The requests to try (the first for each account and execution), and
    that first request by account and execution."""
    first: dict[tuple[uuid.UUID, uuid.UUID], ClaimRequest] = {}
    for request in requests:
        first.setdefault((request.account_id, request.execution_id), request)
    return list(first.values()), first


def _claims_won(
    claimed: Mapping[uuid.UUID, Any],
    requests: Sequence[ClaimRequest],
    first: Mapping[tuple[uuid.UUID, uuid.UUID], ClaimRequest],
) -> list[Any]:
    """Per request, the row its claim by id won, if any: the execution claimed,
    if the request was the first for it and is the owner's. Another account's
    request for the same id, in the same statement, finds nothing (the
    statement matches account and id) and must not be handed the owner's
    claim."""
    won: list[Any] = []
    for request in requests:
        row = claimed.get(request.execution_id)
        mine = first[(request.account_id, request.execution_id)] is request
        won.append(row if mine and row is not None and row.account_id == request.account_id else None)
    return won


# What the claimable list shows (ClaimableItem).
_CLAIMABLE_COLUMNS = tuple(
    executions.c[name] for name in ("id", "cue_id", "task", "payload", "attempts", "scheduled_for")
)


@cache
def _claimable_page_statement(dialect: str, by_task: bool, by_agent: bool) -> Any:
    """The claimable list's page, in claim order. Built once per shape; every
    value is a bound parameter."""
    conditions = []
    if by_task:
        conditions.append(executions.c.task == bindparam("l_task", type_=String))
    if by_agent:
        conditions.append(_payload_string(dialect, "agent") == bindparam("l_agent", type_=String))
    page = _claim_queue(
        bindparam("l_account", type_=Uuid),
        bindparam("l_now", type_=UTCDateTime),
        bindparam("l_silent_since", type_=UTCDateTime),
        bindparam("l_limit", type_=BigInteger),
        *conditions,
    )
    return (
        select(*_CLAIMABLE_COLUMNS, cues.c.name.label("cue_name"))
        .join(page, page.c.id == executions.c.id)
        .join(cues, cues.c.id == executions.c.cue_id)
        .order_by(page.c.n)
    )


@cache
def _claimable_page_direct(by_task: bool, by_agent: bool) -> _Direct:
    return _Direct(_claimable_page_statement("postgresql", by_task, by_agent))


@cache
def _claimable_page_sqlite(by_task: bool, by_agent: bool) -> _SqliteDirect:
    return _SqliteDirect(_claimable_page_statement("sqlite", by_task, by_agent))


def _payload_string(dialect: str, key: str) -> ColumnElement[Any]:
    """The payload snapshot's top-level `key` when it is a string, else NULL."""
    if dialect == "postgresql":
        value = cast(executions.c.payload, postgresql.JSONB)[key]
        return case((func.jsonb_typeof(value) == "string", value.astext))
    path = f'$."{key}"'
    payload = executions.c.payload
    return case((func.json_type(payload, path) == "text", func.json_extract(payload, path)))


@cache
def _claim_each_candidates_sqlite() -> _SqliteDirect:
    """Of the requested executions (`batch`, a JSON array of {id, account_id,
    worker}), the claimable ones, with the worker that asked and the cue's
    outcome deadline seconds."""
    entries = func.json_each(bindparam("c_batch", type_=String)).table_valued("value")
    fields = ("id", "account_id", "worker")
    requests = select(*(func.json_extract(entries.c.value, f"$.{name}").label(name) for name in fields))
    picked = _requested_claims(
        requests.subquery("requests"),
        bindparam("c_now", type_=UTCDateTime),
        bindparam("c_silent_since", type_=UTCDateTime),
        lock=False,
    )
    return _SqliteDirect(
        select(executions.c.id, picked.c.worker, cues.c.outcome_deadline_seconds)
        .join(picked, picked.c.id == executions.c.id)
        .join(cues, cues.c.id == executions.c.cue_id)
    )


@cache
def _claim_next_candidates_sqlite(by_task: bool) -> _SqliteDirect:
    """The account's `c_limit` oldest claimable executions, in claim order, with
    the cue's outcome deadline seconds."""
    conditions = [executions.c.task == bindparam("c_task", type_=String)] if by_task else []
    picked = _claim_queue(
        bindparam("c_account", type_=Uuid),
        bindparam("c_now", type_=UTCDateTime),
        bindparam("c_silent_since", type_=UTCDateTime),
        bindparam("c_limit", type_=BigInteger),
        *conditions,
    )
    return _SqliteDirect(
        select(executions.c.id, cues.c.outcome_deadline_seconds)
        .join(picked, picked.c.id == executions.c.id)
        .join(cues, cues.c.id == executions.c.cue_id)
        .order_by(picked.c.n)
    )


@cache
def _claim_update_sqlite() -> _SqliteDirect:
    """Claim the executions `c_ids` (a JSON array of ids) for one worker, with
    one outcome deadline, and return them."""
    ids = func.json_each(bindparam("c_ids", type_=String)).table_valued("value")
    return _SqliteDirect(
        update(executions)
        .where(executions.c.id.in_(select(ids.c.value)))
        .values(
            **_claimed(
                bindparam("c_worker", type_=String),
                bindparam("c_now", type_=UTCDateTime),
                bindparam("c_lease_until", type_=UTCDateTime),
            ),
            outcome_deadline_at=bindparam("c_deadline", type_=UTCDateTime),
        )
        .returning(*_CLAIMED_RETURNING)
    )


def _claim_found_sqlite(
    conn: sqlite3.Connection,
    candidates: Sequence[tuple[uuid.UUID, str, int]],
    now: dt.datetime,
    lease: dt.timedelta,
) -> dict[uuid.UUID, Any]:
    """Claim (id, worker, the cue's outcome deadline seconds) rows found in this
    write transaction: one UPDATE per worker and deadline."""
    groups: dict[tuple[str, int], list[str]] = {}
    for execution_id, worker_id, seconds in candidates:
        groups.setdefault((worker_id, seconds), []).append(execution_id.hex)
    claimed: dict[uuid.UUID, Any] = {}
    for (worker_id, seconds), ids in groups.items():
        parameters = {
            "c_ids": json.dumps(ids),
            "c_worker": worker_id,
            "c_now": now,
            "c_lease_until": now + lease,
            "c_deadline": now + dt.timedelta(seconds=seconds),
        }
        claimed.update((row.id, row) for row in _claim_update_sqlite().rows(conn, parameters))
    return claimed


def claim_each_sqlite(
    conn: sqlite3.Connection,
    requests: Sequence[ClaimRequest],
    now: dt.datetime,
    lease: dt.timedelta,
    silent_since: dt.datetime,
) -> list[Any]:
    """SQLite: `ClaimRepository.claim_each` on the driver's own connection,
    inside the caller's write transaction (`Database.sqlite_write`)."""
    distinct, first = _first_requests(requests)
    batch = json.dumps(
        [{"id": r.execution_id.hex, "account_id": r.account_id.hex, "worker": r.worker_id} for r in distinct]
    )
    candidates = _claim_each_candidates_sqlite().rows(
        conn, {"c_batch": batch, "c_now": now, "c_silent_since": silent_since}
    )
    claimed = _claim_found_sqlite(conn, [tuple(row) for row in candidates], now, lease)
    return _claims_won(claimed, requests, first)


def claim_next_sqlite(
    conn: sqlite3.Connection,
    account_id: uuid.UUID,
    workers: Sequence[str],
    now: dt.datetime,
    lease: dt.timedelta,
    silent_since: dt.datetime,
    task: str | None = None,
) -> list[Any]:
    """SQLite: `ClaimRepository.claim_next` on the driver's own connection,
    inside the caller's write transaction (`Database.sqlite_write`), which
    is what keeps two claimers from taking the same row."""
    if not workers:
        return []
    parameters = {"c_account": account_id, "c_now": now, "c_silent_since": silent_since}
    parameters.update(c_limit=len(workers), c_task=task)
    candidates = _claim_next_candidates_sqlite(task is not None).rows(conn, parameters)
    found = zip(candidates, workers, strict=False)  # fewer candidates: nothing more is claimable
    claimed = _claim_found_sqlite(
        conn, [(row.id, worker, row.outcome_deadline_seconds) for row, worker in found], now, lease
    )
    return [claimed[row.id] for row in candidates]


class ClaimRepository(_Repository):
    """Worker claims, over the claim queue (`_claim_queue`)."""

    async def claimable_page(
        self,
        account_id: uuid.UUID,
        now: dt.datetime,
        silent_since: dt.datetime,
        task: str | None,
        limit: int,
        agent: str | None = None,
    ) -> Sequence[AnyRow]:
        parameters = {
            "l_account": account_id,
            "l_now": now,
            "l_silent_since": silent_since,
            "l_limit": limit,
            "l_task": task,
            "l_agent": agent,
        }
        by_task, by_agent = task is not None, agent is not None
        if self.conn.dialect.name == "postgresql":
            return await _claimable_page_direct(by_task, by_agent).rows(self.conn, parameters)
        return await _claimable_page_sqlite(by_task, by_agent).read(self.conn, parameters)

    async def claim_next(
        self,
        account_id: uuid.UUID,
        workers: Sequence[str],
        now: dt.datetime,
        lease: dt.timedelta,
        silent_since: dt.datetime,
        *,
        task: str | None = None,
    ) -> list[AnyRow]:
        """Take the oldest claimable executions, one for each of `workers` (a
        worker named k times takes k): the i-th row returned is the i-th
        worker's, and there are fewer rows than workers only when nothing more
        is claimable. Rows locked by a concurrent claimer are skipped, so two
        callers never get the same one. The claim's fencing token is the new
        attempt count. One statement, to be run in autocommit mode (PostgreSQL;
        on SQLite claims run on the writer's thread: `claim_next_sqlite`)."""
        assert self.conn.dialect.name == "postgresql", "SQLite: claim_next_sqlite"
        if not workers:
            return []
        one_worker = len(set(workers)) == 1
        parameters: dict[str, Any] = {
            "c_account": account_id,
            "c_now": now,
            "c_silent_since": silent_since,
            "c_lease_until": now + lease,
        }
        if one_worker:
            parameters.update(c_worker=workers[0], c_limit=len(workers))
        else:
            parameters["c_workers"] = _pg_array("text", workers)
        if task is not None:
            parameters["c_task"] = task
        statement = _claim_next_statement_postgres(task is not None, one_worker)
        return sorted(await statement.rows(self.conn, parameters), key=lambda r: r.n)

    async def claim_each(
        self,
        requests: Sequence[ClaimRequest],
        now: dt.datetime,
        lease: dt.timedelta,
        silent_since: dt.datetime,
    ) -> list[AnyRow | None]:
        """Claims of named executions, for several workers at once: per request,
        the claimed row, or None when the execution is not claimable (or locked
        by a concurrent claimer). Of several requests for one execution only the
        first can win. One statement, to be run in autocommit mode (PostgreSQL;
        on SQLite claims run on the writer's thread: `claim_each_sqlite`)."""
        assert self.conn.dialect.name == "postgresql", "SQLite: claim_each_sqlite"
        distinct, first = _first_requests(requests)
        rows = await _claim_each_statement_postgres().rows(
            self.conn,
            {
                "c_ids": _pg_array("uuid", [r.execution_id for r in distinct]),
                "c_accounts": _pg_array("uuid", [r.account_id for r in distinct]),
                "c_workers": _pg_array("text", [r.worker_id for r in distinct]),
                "c_now": now,
                "c_silent_since": silent_since,
                "c_lease_until": now + lease,
            },
        )
        return _claims_won({row.id: row for row in rows}, requests, first)

    async def holder(self, account_id: uuid.UUID, execution_id: uuid.UUID) -> AnyRow | None:
        """The execution's claim state and its cue's outcome deadline, locked."""
        result = await self.conn.execute(
            select(
                executions.c.transport,
                executions.c.status,
                executions.c.attempts,
                executions.c.claimed_by_worker,
                executions.c.outcome_deadline_at,
                cues.c.outcome_deadline_seconds,
            )
            .join(cues, cues.c.id == executions.c.cue_id)
            .where(executions.c.account_id == account_id, executions.c.id == execution_id)
            .with_for_update(of=executions)
        )
        return result.first()

    async def extend(
        self, execution_id: uuid.UUID, now: dt.datetime, lease_until: dt.datetime, deadline: dt.datetime
    ) -> None:
        await self.conn.execute(
            update(executions)
            .where(executions.c.id == execution_id)
            .values(
                last_heartbeat_at=now,
                lease_expires_at=lease_until,
                recover_after=lease_until,
                outcome_deadline_at=deadline,
                updated_at=now,
            )
        )

    async def defer_live_leases(
        self, now: dt.datetime, silent_since: dt.datetime, silence: dt.timedelta, limit: int
    ) -> int:
        """Expired leases whose claimer is alive cannot be recovered before its
        silence could begin: its last heartbeat plus the heartbeat timeout.
        Their `recover_after` moves there, so claims stop reading them until
        then (claims by workers that never extend a lease per execution keep
        running past it). Claims whose `recover_after` was never set (written
        by a server older than the column) get it too. It never falls before
        the lease's end, which the claims rely on. Returns how many moved."""
        found = (
            await self.conn.execute(
                select(executions.c.id, executions.c.lease_expires_at, workers.c.last_heartbeat)
                .join(
                    workers,
                    and_(
                        workers.c.account_id == executions.c.account_id,
                        workers.c.worker_id == executions.c.claimed_by_worker,
                    ),
                )
                .where(
                    executions.c.status == "delivering",
                    executions.c.transport == "worker",
                    executions.c.lease_expires_at <= now,
                    _recoverable_by(now),
                    workers.c.last_heartbeat >= silent_since,
                )
                .limit(limit)
                .with_for_update(skip_locked=True, of=executions)
            )
        ).all()
        if found:
            await self.conn.execute(
                update(executions)
                .where(executions.c.id == bindparam("d_id"))
                .values(recover_after=bindparam("d_after", type_=UTCDateTime)),
                [
                    {"d_id": row.id, "d_after": max(row.lease_expires_at, row.last_heartbeat + silence)}
                    for row in found
                ],
            )
        return len(found)

    async def recover_expired(
        self, now: dt.datetime, silent_since: dt.datetime, limit: int
    ) -> tuple[Sequence[AnyRow], int]:
        """Expired leases held by silent workers: back to pending, or failed
        once the cue's attempts are used up. Returns the rows that failed and
        how many went back to pending."""
        alive = _claimer_alive(silent_since)
        expired = (
            await self.conn.execute(
                select(executions.c.id, executions.c.attempts, cues.c.retry_max_attempts)
                .join(cues, cues.c.id == executions.c.cue_id)
                .where(
                    executions.c.status == "delivering",
                    executions.c.transport == "worker",
                    executions.c.lease_expires_at <= now,
                    _recoverable_by(now),
                    ~alive,
                )
                .limit(limit)
                .with_for_update(skip_locked=True, of=executions)
            )
        ).all()
        released = [r.id for r in expired if r.attempts < r.retry_max_attempts]
        exhausted = [r.id for r in expired if r.attempts >= r.retry_max_attempts]
        cleared = {
            "claimed_by_worker": None,
            "claimed_at": None,
            "last_heartbeat_at": None,
            "lease_expires_at": None,
            "recover_after": None,
            "outcome_deadline_at": None,
            "outcome_state": case(
                (executions.c.outcome_state == "unknown", None), else_=executions.c.outcome_state
            ),
            "updated_at": now,
        }
        if released:
            await self.conn.execute(
                update(executions)
                .where(executions.c.id.in_(released))
                .values(
                    status="pending",
                    available_at=now,
                    error_message="Reset: claim lease expired and worker heartbeat stale",
                    **cleared,
                )
            )
        if not exhausted:
            return [], len(released)
        result = await self.conn.execute(
            update(executions)
            .where(executions.c.id.in_(exhausted))
            .values(status="failed", error_message="Claim lease expired; max attempts exhausted", **cleared)
            .returning(executions.c.id, executions.c.cue_id, executions.c.status)
        )
        return result.all(), len(released)

    async def expire_unclaimed(
        self, available_before: dt.datetime, now: dt.datetime, limit: int
    ) -> Sequence[AnyRow]:
        """Worker executions nobody claimed in time become missed."""
        stale = (
            select(executions.c.id)
            .where(
                executions.c.status == "pending",
                executions.c.transport == "worker",
                # Implied (an execution becomes available at scheduled_for or later),
                # and lets the (transport, status, scheduled_for) index stop at the
                # cutoff instead of reading every pending worker execution.
                executions.c.scheduled_for <= available_before,
                executions.c.available_at <= available_before,
            )
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        ids = [row.id for row in await self.conn.execute(stale)]
        if not ids:
            return []
        result = await self.conn.execute(
            update(executions)
            .where(executions.c.id.in_(ids), executions.c.status == "pending")
            .values(
                status="missed",
                error_message="No worker claimed this execution within timeout window",
                updated_at=now,
            )
            .returning(executions.c.id, executions.c.cue_id, executions.c.status)
        )
        return result.all()


class DeliveryRepository(_Repository):
    """Webhook executions on their way out."""

    async def take_due(self, now: dt.datetime, limit: int) -> Sequence[AnyRow]:
        """Due webhook executions, moved to delivering with the attempt counted,
        with what sending them needs (the account's signing secret included, read
        now, just before they are sent). On PostgreSQL this is one statement, to
        be run in autocommit mode: one round trip."""
        if self.conn.dialect.name == "postgresql":
            return (await self.conn.execute(_take_due_postgres(), {"t_now": now, "t_limit": limit})).all()
        moved = await self.conn.execute(_take_due_sqlite(), {"t_now": now, "t_limit": limit})
        ids = [row.id for row in moved]
        if not ids:
            return []
        view = (
            _delivery_view(secret=True).where(executions.c.id.in_(ids)).order_by(executions.c.scheduled_for)
        )
        return (await self.conn.execute(view)).all()

    async def succeeded_many(
        self, delivered: Sequence[tuple[AnyRow, int | None, str]], now: dt.datetime
    ) -> None:
        """Deliveries that got a 2xx: (row, http status, response body) each. The
        outcome deadline starts now unless an outcome is already there."""
        if not delivered:
            return
        await self.conn.execute(
            _succeeded_statement(),
            [
                {
                    "s_id": row.id,
                    "s_status": status,
                    "s_body": body,
                    "s_now": now,
                    "s_deadline": now + dt.timedelta(seconds=row.outcome_deadline_seconds),
                }
                for row, status, body in delivered
            ],
        )

    async def retry_later(
        self, execution_id: uuid.UUID, error: str, http_status: int | None, at: dt.datetime, now: dt.datetime
    ) -> None:
        await self.conn.execute(
            update(executions)
            .where(executions.c.id == execution_id)
            .values(
                status="retrying", next_retry=at, error_message=error, http_status=http_status, updated_at=now
            )
        )

    async def failed(
        self, execution_id: uuid.UUID, error: str, http_status: int | None, now: dt.datetime
    ) -> None:
        await self.conn.execute(
            update(executions)
            .where(executions.c.id == execution_id)
            .values(
                status="failed", next_retry=None, error_message=error, http_status=http_status, updated_at=now
            )
        )

    async def ready_retries(self, now: dt.datetime) -> int:
        result = await self.conn.execute(
            update(executions)
            .where(
                executions.c.transport == _inline("webhook"),
                executions.c.status == _inline("retrying"),
                executions.c.next_retry <= now,
            )
            .values(status="retry_ready", updated_at=now)
        )
        return int(result.rowcount)

    async def stale(self, now: dt.datetime, stale_after_seconds: int) -> list[AnyRow]:
        """Deliveries silent for max(stale_after, the cue's timeout + 60) seconds."""
        rows = await self.conn.execute(
            _delivery_view()
            .where(
                executions.c.transport == _inline("webhook"),
                executions.c.status == _inline("delivering"),
                executions.c.last_attempt_at < now - dt.timedelta(seconds=stale_after_seconds),
            )
            .limit(500)
            .with_for_update(skip_locked=True, of=executions)
        )
        return [
            r
            for r in rows
            if r.last_attempt_at
            < now - dt.timedelta(seconds=max(stale_after_seconds, r.timeout_seconds + 60))
        ]

    async def failure_notice(self, execution_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(
            select(
                executions.c.account_id,
                executions.c.cue_id,
                executions.c.attempts,
                executions.c.http_status,
                executions.c.error_message,
                executions.c.updated_at,
                executions.c.created_at,
                cues.c.name.label("cue_name"),
                cues.c.on_failure_webhook,
            )
            .join(cues, cues.c.id == executions.c.cue_id)
            .where(executions.c.id == execution_id)
        )
        return result.first()


def _inline(value: str) -> Any:
    """A value written into the SQL, not bound: a partial index whose predicate
    names it (tables.RETRYING_WEBHOOKS, DELIVERING_WEBHOOKS, WORKER_LEASES) is
    then usable. Written at compile time, so also in the statements built once
    and run on the driver (`_Direct`)."""
    return literal_column("'" + value.replace("'", "''") + "'")


# What a delivery needs of its execution (with its cue's columns, _delivery_cue_columns).
_DELIVERY_EXECUTION_COLUMNS = tuple(
    executions.c[name]
    for name in ("id", "account_id", "cue_id", "attempts", "payload", "scheduled_for", "last_attempt_at")
)


def _delivery_view(*, secret: bool = False) -> Any:
    view = select(*_DELIVERY_EXECUTION_COLUMNS, *_delivery_cue_columns()).join(
        cues, cues.c.id == executions.c.cue_id
    )
    if secret:
        view = view.add_columns(accounts.c.webhook_secret).join(
            accounts, accounts.c.id == executions.c.account_id
        )
    return view


def _delivery_cue_columns() -> list[Any]:
    return [
        cues.c.name.label("cue_name"),
        cues.c.callback_url,
        cues.c.callback_method,
        cues.c.callback_headers,
        cues.c.timeout_seconds,
        cues.c.outcome_deadline_seconds,
        cues.c.retry_max_attempts,
        cues.c.retry_backoff_minutes,
    ]


def _due_webhooks() -> Any:
    """The ids of due webhook executions, oldest first; rows another dispatcher
    holds are skipped (PostgreSQL), so replicas share the work."""
    return (
        select(executions.c.id)
        .where(
            executions.c.transport == "webhook",
            # Comparisons, not an IN list: that is an expanding parameter, rendered on every call.
            or_(executions.c.status == "pending", executions.c.status == "retry_ready"),
            executions.c.scheduled_for <= bindparam("t_now", type_=UTCDateTime),
        )
        .order_by(executions.c.scheduled_for)
        .limit(bindparam("t_limit", type_=BigInteger))
        .with_for_update(skip_locked=True)
    )


def _start_attempt() -> dict[str, Any]:
    moment = bindparam("t_now", type_=UTCDateTime)
    return {
        "status": "delivering",
        "attempts": executions.c.attempts + 1,
        "last_attempt_at": moment,
        "started_at": func.coalesce(executions.c.started_at, moment),
        "next_retry": None,
        "updated_at": moment,
    }


@cache
def _take_due_postgres() -> Any:
    """Lock the due rows, start their attempt, and return them joined with their
    cue and the account's signing secret: one statement (a data-modifying CTE)."""
    due = _due_webhooks().cte("due")
    moved = (
        update(executions)
        .where(executions.c.id == due.c.id)
        .values(**_start_attempt())
        .returning(*_DELIVERY_EXECUTION_COLUMNS)
        .cte("moved")
    )
    return (
        select(moved, *_delivery_cue_columns(), accounts.c.webhook_secret)
        .join(cues, cues.c.id == moved.c.cue_id)
        .join(accounts, accounts.c.id == moved.c.account_id)
        .order_by(moved.c.scheduled_for)
    )


@cache
def _take_due_sqlite() -> Any:
    """SQLite has one writer, so no row locks: start the attempt of the due rows."""
    return (
        update(executions)
        .where(executions.c.id.in_(_due_webhooks().scalar_subquery()))
        .values(**_start_attempt())
        .returning(executions.c.id)
    )


@cache
def _succeeded_statement() -> Any:
    moment = bindparam("s_now", type_=UTCDateTime)
    return (
        update(executions)
        .where(executions.c.id == bindparam("s_id", type_=Uuid))
        .values(
            status="success",
            http_status=bindparam("s_status", type_=BigInteger),
            response_body=bindparam("s_body", type_=String),
            delivered_at=moment,
            next_retry=None,
            error_message=None,
            outcome_deadline_at=case(
                (executions.c.outcome_recorded_at.is_(None), bindparam("s_deadline", type_=UTCDateTime)),
                else_=None,
            ),
            updated_at=moment,
        )
    )


class AlertRepository(_Repository):
    async def recently_raised(
        self, account_id: uuid.UUID, alert_type: str, execution_id: uuid.UUID | None, since: dt.datetime
    ) -> bool:
        result = await self.conn.execute(
            select(alerts.c.id)
            .where(
                alerts.c.account_id == account_id,
                alerts.c.alert_type == alert_type,
                alerts.c.execution_id == execution_id,
                alerts.c.created_at >= since,
            )
            .limit(1)
        )
        return result.first() is not None

    async def add(self, values: Mapping[str, Any]) -> None:
        await self.conn.execute(insert(alerts), dict(values))

    async def get(self, account_id: uuid.UUID, alert_id: uuid.UUID) -> AnyRow | None:
        result = await self.conn.execute(
            select(alerts).where(alerts.c.account_id == account_id, alerts.c.id == alert_id)
        )
        return result.first()

    async def acknowledge(self, account_id: uuid.UUID, alert_id: uuid.UUID) -> None:
        await self.conn.execute(
            update(alerts)
            .where(alerts.c.account_id == account_id, alerts.c.id == alert_id)
            .values(acknowledged=True)
        )

    async def page(
        self,
        account_id: uuid.UUID,
        *,
        alert_type: str | None,
        cue_id: str | None,
        acknowledged: bool | None,
        since: dt.datetime | None,
        limit: int,
        offset: int,
    ) -> tuple[Sequence[AnyRow], int]:
        filters = _given(
            account_id=account_id,
            alert_type=alert_type,
            cue_id=cue_id,
            acknowledged=acknowledged,
            since=since,
        )
        rows, summary = await self._newest_page(alerts, limit, offset, filters)
        return rows, summary.matching

    async def recent_final(self, cue_id: str, until: dt.datetime, limit: int) -> Sequence[AnyRow]:
        """The cue's executions created up to `until` that reached a final status, newest first."""
        result = await self.conn.execute(
            select(executions.c.status, executions.c.outcome_success)
            .where(
                executions.c.cue_id == cue_id,
                executions.c.created_at <= until,
                executions.c.status.in_(("success", "failed", "missed")),
            )
            .order_by(executions.c.created_at.desc())
            .limit(limit)
        )
        return result.all()


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
        """Forget a worker. Without a record it is silent, so its claims become
        recoverable at their lease's end again, even those the lease sweep had
        deferred while it was alive."""
        result = await self.conn.execute(
            delete(workers)
            .where(workers.c.account_id == account_id, workers.c.worker_id == worker_id)
            .returning(workers.c.worker_id)
        )
        if result.first() is None:
            return False
        await self.conn.execute(
            update(executions)
            .where(
                executions.c.account_id == account_id,
                executions.c.claimed_by_worker == worker_id,
                executions.c.transport == "worker",
                executions.c.status == "delivering",
            )
            .values(recover_after=executions.c.lease_expires_at)
        )
        return True
