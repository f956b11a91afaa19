"""The account summary and usage counts, read in one statement: cues by status,
this month's executions (from the first instant of the month) and their
outcomes, nothing of other accounts or earlier months, zeros for an account
with nothing, and an unknown account refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest
from sqlalchemy import Table, update

from cueline_server.config import Settings
from cueline_server.errors import ApiError
from cueline_server.services.accounts import AccountService, Authenticator, Caller, month_start, now
from cueline_server.services.cues import CueService
from cueline_server.store.database import Database
from cueline_server.store.migrate import upgrade
from cueline_server.store.tables import cues, executions


async def _account(db: Database, settings: Settings, email: str) -> tuple[AccountService, Caller]:
    authenticator = Authenticator(db, cache_seconds=0)
    service = AccountService(db, settings, authenticator)
    key = (await service.register(email)).api_key
    return service, await authenticator.authenticate(f"Bearer {key}")


async def _set(db: Database, table: Table, row_id: object, **values: object) -> None:
    async with db.unit_of_work() as uow:
        await uow.conn.execute(update(table).where(table.c.id == row_id).values(**values))
        await uow.commit()


def test_summary_and_usage_count_the_accounts_own_cues_and_this_months_executions(database_url: str) -> None:
    upgrade(database_url)
    settings = Settings(database_url=database_url)

    async def scenario(db: Database) -> None:
        accounts, owner = await _account(db, settings, "owner@example.com")
        _, stranger = await _account(db, settings, "stranger@example.com")
        _, idle = await _account(db, settings, "idle@example.com")
        service = CueService(db, settings)
        body = {"transport": "worker", "schedule.type": "recurring", "schedule.cron": "0 0 1 1 *"}
        made = [(await service.create(owner, {"name": f"c{i}", **body})).row.id for i in range(5)]
        theirs = (await service.create(stranger, {"name": "theirs", **body})).row.id
        await _set(db, cues, made[1], status="paused")
        await _set(db, cues, made[2], status="completed")
        await _set(db, cues, made[3], status="failed")

        async def fire(caller: Caller, cue_id: str) -> uuid.UUID:
            fired = await service.fire(caller, cue_id, send_at=None, payload_override=None, replace=False)
            return uuid.UUID(fired.execution_id)

        fired = [await fire(owner, str(made[0])) for _ in range(6)]
        await fire(stranger, str(theirs))
        reported = {"outcome_recorded_at": now(), "status": "success"}
        await _set(db, executions, fired[0], outcome_success=True, **reported)
        await _set(db, executions, fired[1], outcome_success=False, **reported)
        await _set(db, executions, fired[2], status="missed")  # failed without a report
        this_month = month_start(now())
        await _set(db, executions, fired[3], created_at=this_month, status="failed")  # the same
        last_month = this_month - dt.timedelta(microseconds=1)
        await _set(db, executions, fired[4], created_at=last_month, status="missed")

        summary = await accounts.summary(owner)
        assert (summary.active_cues, summary.executions_this_month) == (3, 5)
        usage = await accounts.usage(owner)
        assert (usage.cues["used"], usage.cues["active"]) == (3, 2)
        assert usage.executions["used"] == 5
        assert usage.outcomes == {"reported": 2, "succeeded": 1, "failed": 3}

        summary = await accounts.summary(idle)
        assert (summary.active_cues, summary.executions_this_month) == (0, 0)
        usage = await accounts.usage(idle)
        assert (usage.cues["used"], usage.cues["active"], usage.executions["used"]) == (0, 0, 0)
        assert usage.outcomes == {"reported": 0, "succeeded": 0, "failed": 0}

        gone = Caller(uuid.uuid4(), 60)
        for read in (accounts.summary, accounts.usage):
            with pytest.raises(ApiError) as refused:
                await read(gone)
            assert refused.value.http_status == 401

    async def run() -> None:
        db = Database(database_url)
        try:
            await scenario(db)
        finally:
            await db.dispose()

    asyncio.run(run())
