"""The /health and /status probes (contract §3.3)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from cueline_server import __version__
from cueline_server.services.accounts import now
from cueline_server.store.database import Database

SCHEDULER_STALE_AFTER = dt.timedelta(seconds=30)


@dataclass(frozen=True)
class Health:
    status: str
    version: str
    timestamp: dt.datetime
    database: str
    scheduler: str
    queue: dict[str, int]


class ProbeService:
    def __init__(
        self, db: Database, scheduler_last_pass: Callable[[], dt.datetime | None], stale_after_seconds: int
    ) -> None:
        self._db = db
        self._last_pass = scheduler_last_pass
        self._stale = dt.timedelta(seconds=stale_after_seconds)

    def scheduler(self, moment: dt.datetime) -> str:
        last = self._last_pass()
        if last is None:
            return "unknown"
        return "stale" if moment - last > SCHEDULER_STALE_AFTER else "ok"

    async def health(self) -> Health:
        moment = now()
        queue = dict.fromkeys(
            ("pending_webhook_deliveries", "pending_retries", "pending_worker_claims", "stale_executions"), 0
        )
        database = "ok"
        try:
            async with self._db.unit_of_work(write=False) as uow:
                counts = await uow.executions.queue_counts(moment, moment - self._stale)
            queue = {name: int(value) for name, value in counts._mapping.items()}
        except Exception:
            database = "error"
        scheduler = self.scheduler(moment)
        status = "healthy" if database == "ok" and scheduler != "stale" else "degraded"
        return Health(status, __version__, moment, database, scheduler, queue)

    async def status(self) -> tuple[str, str | None, int]:
        if not await self._db.ping():
            return "down", "database unreachable", 503
        if self.scheduler(now()) == "stale":
            return "degraded", "scheduler stale", 200
        return "healthy", None, 200
