"""The scheduler: fires each due cue at its time, not at a polling tick.

It sleeps until the earliest `next_run` in the database (or until a cue
changes on this process, or at most `scheduler_poll_seconds`), then fires
everything due, in batches, each batch one transaction. Exactly one
execution per (cue, scheduled slot): due cues are taken with SKIP LOCKED, the
insert skips a slot that already has an execution (a unique index), and the
cue's next_run moves in the same transaction; so replicas and restarts never
double-fire. Housekeeping runs on every pass.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cueline_server.config import Settings
from cueline_server.services.accounts import now
from cueline_server.services.cues import NewWork, WorkCreated, new_execution
from cueline_server.services.schedules import plan_firing
from cueline_server.store.database import Database

log = logging.getLogger("cueline.scheduler")

BATCH = 500
# On PostgreSQL a pass runs this many batch transactions at once: SKIP LOCKED
# gives each its own cues, and the database's share of one batch (the inserts,
# their index and foreign-key work) overlaps with the others' and with Python's.
# Their first batches are small, so the cues due first are committed within
# milliseconds; later ones grow to BATCH for throughput. SQLite has one writer,
# so there a pass runs full batches one at a time: smaller ones would only add
# transactions in front of the last cue.
PARALLEL_BATCHES = 4
FIRST_BATCH = 50
Housekeeping = Callable[[dt.datetime], Awaitable[None]]


class Scheduler:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        housekeeping: Sequence[Housekeeping] = (),
        work_created: WorkCreated = lambda created: None,
    ) -> None:
        self._db = db
        self._work_created = work_created
        self._poll = settings.scheduler_poll_seconds
        self._grace = dt.timedelta(seconds=settings.catch_up_grace_seconds)
        self._housekeeping = housekeeping
        self._wake = asyncio.Event()
        self.last_pass: dt.datetime | None = None

    def wake(self) -> None:
        """A cue's schedule changed: look again now."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        look_first = False
        while not stopping.is_set():
            try:
                await self.pass_once(look_first=look_first)
                delay, expected = await self._until_next()
            except Exception:
                log.exception("scheduler pass failed; retrying")
                delay, expected = self._poll, False
            self._wake.clear()
            waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stopping.wait())]
            done, _ = await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()
            # Woken neither by a change nor at a cue's known time: this is the
            # safety poll, and most polls find nothing due.
            look_first = not done and not expected

    async def _earliest(self) -> dt.datetime | None:
        async with self._db.reader() as repos:
            return await repos.cues.earliest_next_run()

    async def _until_next(self) -> tuple[float, bool]:
        """How long to sleep, and whether a cue is due at the end of it."""
        earliest = await self._earliest()
        if earliest is None:
            return self._poll, False
        until = (earliest - now()).total_seconds()
        return max(0.0, min(self._poll, until)), until <= self._poll

    async def pass_once(self, *, look_first: bool = False) -> int:
        """Fire everything due now, then run the housekeeping steps. With
        `look_first`, firing starts only if the earliest next run has come: one
        index read instead of a transaction per lane when nothing is due."""
        fired = 0
        if not look_first or ((earliest := await self._earliest()) is not None and earliest <= now()):
            fired = await self._fire_everything_due()
        moment = now()
        for step in self._housekeeping:
            try:
                await step(moment)
            except Exception:
                log.exception("housekeeping step %s failed", getattr(step, "__name__", step))
        self.last_pass = moment
        return fired

    async def _fire_everything_due(self) -> int:
        if self._db.backend == "postgresql":
            lanes = (self._fire_all_due(FIRST_BATCH) for _ in range(PARALLEL_BATCHES))
            return sum(await asyncio.gather(*lanes))
        return await self._fire_all_due(BATCH)

    async def _fire_all_due(self, first: int) -> int:
        """Batches until one comes back short, growing from `first` to BATCH."""
        fired = 0
        size = first
        while True:
            batch = await self.fire_due(now(), size)
            fired += batch
            if batch < size:
                return fired
            size = min(BATCH, size * 4)

    async def fire_due(self, moment: dt.datetime, limit: int = BATCH) -> int:
        """One batch: returns how many cues were due (not executions created)."""
        async with self._db.unit_of_work() as uow:
            due = await uow.cues.due(moment, limit)
            if not due:
                return 0
            rows: list[dict[str, Any]] = []
            steps: list[dict[str, Any]] = []
            # Cues on the same schedule due at the same slot (common: cron
            # expressions cluster on the hour) share one plan.
            plans: dict[tuple[Any, ...], tuple[list[dt.datetime], dt.datetime | None]] = {}
            for cue in due:
                schedule = (cue.schedule_type, cue.cron, cue.timezone, cue.next_run, cue.catch_up)
                if schedule not in plans:
                    plans[schedule] = plan_firing(
                        schedule_type=cue.schedule_type,
                        cron=cue.cron,
                        timezone=cue.timezone,
                        next_run=cue.next_run,
                        catch_up=cue.catch_up,
                        now=moment,
                        grace=self._grace,
                    )
                slots, next_run = plans[schedule]
                rows += [
                    new_execution(cue, triggered_by="scheduled", payload=cue.payload, scheduled_for=slot)
                    for slot in slots
                ]
                steps.append({"cue_id": cue.id, "next_run": next_run, "fired": 0})
            inserted = await uow.executions.add_scheduled(rows)
            counts = Counter(inserted)
            for step in steps:
                step["fired"] = counts[step["cue_id"]]
            await uow.cues.advance(steps, moment)
            await uow.commit()
        if inserted:
            fired_cues = set(inserted)
            self._work_created([NewWork.of(row) for row in rows if row["cue_id"] in fired_cues])
            log.debug("fired %d executions for %d cues", len(inserted), len(due))
        return len(due)
