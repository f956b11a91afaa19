"""Workers: heartbeats and the registry of live workers."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass

from cueline_server.errors import worker_not_found
from cueline_server.services.accounts import Caller, now
from cueline_server.store.database import Database

STALE_AFTER_SECONDS = 900


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    last_heartbeat: dt.datetime
    seconds_since_heartbeat: int
    heartbeat_status: str
    handlers: list[str]
    registered_since: dt.datetime


class WorkerService:
    def __init__(self, db: Database, heartbeat_timeout_seconds: int) -> None:
        self._db = db
        self._timeout = heartbeat_timeout_seconds

    async def heartbeat(self, caller: Caller, worker_id: str, handlers: Sequence[str] | None) -> dt.datetime:
        moment = now()
        encoded = json.dumps(list(handlers)) if handlers is not None else None
        async with self._db.single_statement() as repos:
            await repos.workers.heartbeat(caller.account_id, worker_id, encoded, moment)
        return moment

    async def all(self, caller: Caller) -> list[WorkerView]:
        async with self._db.unit_of_work(write=False) as uow:
            rows = await uow.workers.all(caller.account_id)
        moment = now()
        views = []
        for row in rows:
            age = int((moment - row.last_heartbeat).total_seconds())
            status = "active" if age < self._timeout else "stale" if age < STALE_AFTER_SECONDS else "dead"
            handlers = json.loads(row.handlers) if row.handlers else []
            views.append(
                WorkerView(row.worker_id, row.last_heartbeat, age, status, handlers, row.registered_since)
            )
        return views

    async def delete(self, caller: Caller, worker_id: str) -> None:
        if "\x00" in worker_id:  # no worker could register such an id (validation refuses it)
            raise worker_not_found()
        async with self._db.unit_of_work() as uow:
            if not await uow.workers.delete(caller.account_id, worker_id):
                raise worker_not_found()
            await uow.commit()
