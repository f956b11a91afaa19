"""The webhook sweeps run every scheduler pass: on SQLite they must stay index
look-ups even once ANALYZE has seen a table full of worker executions (with
those statistics, the (transport, status, scheduled_for) index looked useless
and both sweeps read the whole table)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event

from cueline_server.store.database import Database
from cueline_server.store.migrate import upgrade


def test_webhook_sweeps_use_their_partial_indexes_after_analyze(tmp_path: Path) -> None:
    path = tmp_path / "sweeps.db"
    upgrade(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:  # no foreign keys: only the plans matter here
        conn.executemany(
            "INSERT INTO executions (id, account_id, cue_id, transport, scheduled_for, status, triggered_by,"
            " payload, attempts, created_at, updated_at)"
            " VALUES (?, 'a', 'c', 'worker', '2026-01-01', 'pending', 'manual_fire', '{}', 0,"
            " '2026-01-01', '2026-01-01')",
            [(uuid.uuid4().hex,) for _ in range(3000)],
        )
        conn.execute("ANALYZE")

    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "executions" in statement:
            statements.append((statement, parameters))

    async def sweep() -> None:
        db = Database(f"sqlite:///{path}")
        try:
            async with db.unit_of_work() as uow:
                moment = dt.datetime.now(dt.UTC)
                await uow.deliveries.ready_retries(moment)
                await uow.deliveries.stale(moment, 300)
        finally:
            await db.dispose()

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        asyncio.run(sweep())
    finally:
        event.remove(Engine, "before_cursor_execute", seen)

    with sqlite3.connect(path) as conn:
        plans = [
            [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)]
            for statement, parameters in statements
        ]
    assert len(plans) == 2, statements
    assert any("USING INDEX ix_executions_retrying_webhooks" in step for step in plans[0]), plans[0]
    assert any("USING INDEX ix_executions_delivering_webhooks" in step for step in plans[1]), plans[1]
    assert not any(step.startswith("SCAN executions") for plan in plans for step in plan), plans
