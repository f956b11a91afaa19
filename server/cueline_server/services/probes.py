"""The /health and /status probes (contract §3.3)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from cueline_server import __version__
from cueline_server.services.accounts import now
from cueline_server.store.database import Database

SCHEDULER_STALE_AFTER = dt.timedelta(seconds=30)
# /health is unauthenticated and never rate-limited, and its queue counts read
# every execution in flight: they are read at most this often, and callers
# that arrive while a read is under way share it.
QUEUE_COUNTS_MAX_AGE = dt.timedelta(seconds=1)
QUEUE_COUNTS = ("pending_webhook_deliveries", "pending_retries", "pending_worker_claims", "stale_executions")


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
        self._counted: tuple[dt.datetime, dict[str, int]] | None = None
        self._counting: asyncio.Future[dict[str, int]] | None = None

    def scheduler(self, moment: dt.datetime) -> str:
        last = self._last_pass()
        if last is None:
            return "unknown"
        return "stale" if moment - last > SCHEDULER_STALE_AFTER else "ok"

    async def health(self) -> Health:
        moment = now()
        try:
            queue, database = await self._queue_counts(moment), "ok"
        except Exception:
            queue, database = dict.fromkeys(QUEUE_COUNTS, 0), "error"
        scheduler = self.scheduler(moment)
        status = "healthy" if database == "ok" and scheduler != "stale" else "degraded"
        return Health(status, __version__, moment, database, scheduler, queue)

    async def _queue_counts(self, moment: dt.datetime) -> dict[str, int]:
        """The counts read less than QUEUE_COUNTS_MAX_AGE ago, or a read of them
        (one at a time; a failed read is not kept)."""
        if self._counted is not None and moment - self._counted[0] < QUEUE_COUNTS_MAX_AGE:
            return self._counted[1]
        if self._counting is None:
            self._counting = asyncio.ensure_future(self._read_queue_counts(moment))
        # Shielded: a caller that goes away does not cancel the read the others wait for.
        return await asyncio.shield(self._counting)

    async def _read_queue_counts(self, moment: dt.datetime) -> dict[str, int]:
        try:
            async with self._db.reader() as repos:
                counts = await repos.executions.queue_counts(moment, moment - self._stale)
            queue = {name: int(counts._mapping[name]) for name in QUEUE_COUNTS}
            self._counted = (moment, queue)
            return queue
        finally:
            self._counting = None

    async def status(self) -> tuple[str, str | None, int]:
        if not await self._db.ping():
            return "down", "database unreachable", 503
        if self.scheduler(now()) == "stale":
            return "degraded", "scheduler stale", 200
        return "healthy", None, 200
