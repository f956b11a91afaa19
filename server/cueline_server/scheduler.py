"""The scheduler: fires each due cue at its time, not at a polling tick.

It sleeps until the earliest `next_run` in the database (or until a cue
changes on this process, or at most `scheduler_poll_seconds`), then fires
everything due, in batches, each batch one transaction. Exactly one
execution per (cue, scheduled slot): due cues are taken with SKIP LOCKED, the
insert skips a slot that already has an execution (a unique index), and the
cue's next_run moves in the same transaction; so replicas and restarts never
double-fire. Housekeeping runs on every pass.

On PostgreSQL it starts `scheduler_lead_seconds` early: a batch of cues due
within the lead is locked, planned and inserted ahead of time, and its
transaction commits when the first of their due times has come (cues of the
batch due later stay locked until then and go in a later batch). What is left
at the due moment is the COMMIT. A change to a cue held this way (or an outcome
report that settles it, which the outcome service writes apart from its batch)
waits for the firing, as it would had it come a moment later.
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
# The least wait before looking again at due cues another scheduler holds.
HELD_RETRY_SECONDS = 0.005
Housekeeping = Callable[[dt.datetime], Awaitable[None]]


def scheduler_lead(settings: Settings, db: Database) -> float:
    """How long before their time cues are taken: 0 on SQLite, which has one
    writer, so a transaction held open ahead of time would stall every other write."""
    return settings.scheduler_lead_seconds if db.backend == "postgresql" else 0.0


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
        self._lead = dt.timedelta(seconds=scheduler_lead(settings, db))
        self._housekeeping = housekeeping
        self._wake = asyncio.Event()
        self.last_pass: dt.datetime | None = None

    def wake(self) -> None:
        """A cue's schedule changed: look again now."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                delay = await self._until_next(took=await self.pass_once())
            except Exception:
                log.exception("scheduler pass failed; retrying")
                delay = self._poll
            self._wake.clear()
            waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stopping.wait())]
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()

    async def _earliest(self) -> dt.datetime | None:
        async with self._db.reader() as repos:
            return await repos.cues.earliest_next_run()

    async def _until_next(self, took: int) -> float:
        """How long to sleep, at most a poll: until the lead before the earliest
        next run. If the pass before took none although one was that close,
        another scheduler holds it until it commits, at the cue's time at the
        latest: until then (and not round in a loop meanwhile)."""
        earliest = await self._earliest()
        if earliest is None:
            return self._poll
        until = (earliest - now()).total_seconds()
        lead = self._lead.total_seconds()
        wait = max(HELD_RETRY_SECONDS, until) if until <= lead and not took else until - lead
        return max(0.0, min(self._poll, wait))

    async def pass_once(self) -> int:
        """Fire everything due within the lead, then run the housekeeping steps.
        Firing starts only if the earliest next run is that close: on the safety
        poll, which mostly finds nothing due, one index read instead of a
        transaction per lane."""
        fired = 0
        failed: Exception | None = None
        earliest = await self._earliest()
        if earliest is not None and earliest - self._lead <= now():
            # Cues already due go out in small batches first, so the first
            # commits come at once; cues still ahead all commit at their time,
            # so there full batches cost no lag.
            try:
                fired = await self._fire_everything_due(BATCH if earliest > now() else FIRST_BATCH)
            except Exception as exc:  # raised after the housekeeping, which must not wait on it
                failed = exc
        moment = now()
        for step in self._housekeeping:
            try:
                await step(moment)
            except Exception:
                log.exception("housekeeping step %s failed", getattr(step, "__name__", step))
        if failed is not None:
            raise failed
        self.last_pass = moment
        return fired

    async def _fire_everything_due(self, first: int) -> int:
        if self._db.backend == "postgresql":
            lanes = (self._fire_all_due(first) for _ in range(PARALLEL_BATCHES))
            return sum(await asyncio.gather(*lanes))
        return await self._fire_all_due(BATCH)

    async def _fire_all_due(self, first: int) -> int:
        """Batches until one comes back short, growing from `first` to BATCH."""
        fired = 0
        size = first
        while True:
            batch = await self.fire_due(now() + self._lead, size)
            fired += batch
            if batch < size:
                return fired
            size = min(BATCH, size * 4)

    async def fire_due(self, horizon: dt.datetime, limit: int = BATCH) -> int:
        """One batch of the cues due by `horizon`: returns how many were taken
        (not executions created)."""
        async with self._db.unit_of_work() as uow:
            due = await uow.cues.due(horizon, limit)
            if not due:
                return 0
            # A batch fires at one moment: now, or its first cue's time if that is
            # still ahead. Cues due later than that stay locked until it commits,
            # then go in a later batch.
            moment = max(now(), due[0].next_run)
            rows: list[dict[str, Any]] = []
            steps: list[dict[str, Any]] = []
            # Cues on the same schedule due at the same slot (common: cron
            # expressions cluster on the hour) share one plan.
            plans: dict[tuple[Any, ...], tuple[list[dt.datetime], dt.datetime | None]] = {}
            for cue in due:
                if cue.next_run > moment:
                    break
                schedule = (cue.schedule_type, cue.cron, cue.timezone, cue.next_run, cue.catch_up)
                if schedule not in plans:
                    try:
                        plans[schedule] = plan_firing(
                            schedule_type=cue.schedule_type,
                            cron=cue.cron,
                            timezone=cue.timezone,
                            next_run=cue.next_run,
                            catch_up=cue.catch_up,
                            now=moment,
                            grace=self._grace,
                        )
                    except Exception:
                        # One cue's schedule must not hold up every other cue's:
                        # it stops (next_run null) until its schedule is changed.
                        log.exception("cue %s: its schedule cannot be planned; it stops firing", cue.id)
                        plans[schedule] = ([], None)
                slots, next_run = plans[schedule]
                rows += [
                    new_execution(
                        cue, triggered_by="scheduled", payload=cue.payload, scheduled_for=slot, at=moment
                    )
                    for slot in slots
                ]
                steps.append({"cue_id": cue.id, "next_run": next_run, "fired": 0})
            inserted = await uow.executions.add_scheduled(rows)
            counts = Counter(inserted)
            for step in steps:
                step["fired"] = counts[step["cue_id"]]
            await uow.cues.advance(steps, moment)
            # Due times are on the wall clock and asyncio sleeps on the monotonic
            # one: look at the wall clock again before committing.
            while (ahead := (moment - now()).total_seconds()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(ahead)
            await uow.commit()
        if inserted:
            fired_cues = set(inserted)
            self._work_created([NewWork.of(row) for row in rows if row["cue_id"] in fired_cues])
            log.debug("fired %d executions for %d cues", len(inserted), len(steps))
        return len(due)
