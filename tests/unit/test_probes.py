"""/health's queue counts: read once for callers that ask together."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import event

from cueline_server.services.probes import ProbeService
from cueline_server.store.database import Database
from cueline_server.store.migrate import upgrade


def test_concurrent_health_probes_share_one_read_of_the_queue(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'probes.db'}"
    upgrade(url)

    async def scenario() -> None:
        db = Database(url)
        counts: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if "pending_worker_claims" in statement:
                counts.append(statement)

        event.listen(db.engine.sync_engine, "before_cursor_execute", seen)
        probes = ProbeService(db, lambda: None, 300)
        try:
            answers = await asyncio.gather(*(probes.health() for _ in range(20)))
        finally:
            await db.dispose()
        assert len(counts) == 1
        assert {(a.database, tuple(sorted(a.queue.items()))) for a in answers} == {
            (
                "ok",
                (
                    ("pending_retries", 0),
                    ("pending_webhook_deliveries", 0),
                    ("pending_worker_claims", 0),
                    ("stale_executions", 0),
                ),
            )
        }

    asyncio.run(scenario())
