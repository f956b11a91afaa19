"""Worker transport: claims, leases, per-execution heartbeats, replays, and the
sweeps that recover expired leases and expire unclaimed work (contract §5.6)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from cueline_server.config import Settings
from cueline_server.errors import ApiError, execution_not_found
from cueline_server.services.accounts import Caller, now
from cueline_server.services.cues import NewWork, WorkCreated, new_execution
from cueline_server.services.identifiers import parse_uuid
from cueline_server.services.outcomes import stale_claim
from cueline_server.store.batching import GATHER_TURNS, Coalescer, Failed
from cueline_server.store.database import Database, Repositories
from cueline_server.store.repositories import AnyRow, ClaimRequest, claim_each_sqlite, claim_next_sqlite

log = logging.getLogger("cueline.claims")

SWEEP_BATCH = 500
# How many executions claimed on this process are remembered, and for how long
# at most (never past half the lease): ClaimService._held.
HELD_MAX = 10_000
HELD_SECONDS = 30.0
FINAL = ("success", "failed", "missed")


def claim_failed(message: str) -> ApiError:
    return ApiError("claim_failed", message, 409)


@dataclass(frozen=True)
class _Listing:
    """A claimable list call: its account, filters and page size."""

    account_id: uuid.UUID
    task: str | None
    agent: str | None
    page: int


class ClaimablePage:
    """A claimable page; concurrent calls for the same list share one (`ClaimService.claimable`)."""

    __slots__ = ("__weakref__", "rows")

    def __init__(self, rows: Iterable[AnyRow]) -> None:
        self.rows = tuple(rows)


@dataclass(frozen=True)
class _NextClaim:
    """A claim-next call: the oldest claimable execution of the account (of the task, if named)."""

    account_id: uuid.UUID
    task: str | None
    worker_id: str


class _Waiter:
    """A long poll waiting for work of one account (and task, if it named one)."""

    __slots__ = ("offered", "parked", "task", "woken")

    def __init__(self, task: str | None) -> None:
        self.task = task
        self.woken = asyncio.Event()
        self.parked = False  # waiting, not querying
        self.offered: set[str | None] = set()  # tasks of the work it was woken for

    def takes(self, task: str | None) -> bool:
        return self.task is None or self.task == task


class ClaimService:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        work_created: WorkCreated = lambda created: None,
        failed: Callable[[Sequence[uuid.UUID]], None] = lambda ids: None,
    ) -> None:
        self._db = db
        self._work_created = work_created
        self._failed = failed
        self._waiters: dict[uuid.UUID, list[_Waiter]] = {}
        self._closing = False  # shutting down: long polls answer what they have at once
        self.lease = dt.timedelta(seconds=settings.worker_claim_lease_seconds)
        self._silence = dt.timedelta(seconds=settings.worker_heartbeat_timeout_seconds)
        self._unclaimed = dt.timedelta(seconds=settings.worker_unclaimed_timeout_seconds)
        self._recheck = settings.claim_recheck_seconds
        self._by_id: Coalescer[ClaimRequest, AnyRow | None] = Coalescer(self._claim_each)
        # (account, execution) of each claim by id under way on this process
        self._claiming: set[tuple[uuid.UUID, uuid.UUID]] = set()
        # Executions this process claimed, each with the monotonic time until
        # which nothing can have taken its claim back: a lease ends no earlier
        # than it was granted for, and only a lapsed lease is claimed again.
        self._held: OrderedDict[uuid.UUID, float] = OrderedDict()
        self._held_for = min(HELD_SECONDS, self.lease.total_seconds() / 2)
        self._next: Coalescer[_NextClaim, AnyRow | None] = Coalescer(self._claim_next_each)
        # Per list: the read its next calls join (not begun yet), and the read under way.
        self._list_next: dict[_Listing, asyncio.Task[ClaimablePage]] = {}
        self._list_reading: dict[_Listing, asyncio.Task[ClaimablePage]] = {}

    async def claimable(
        self, caller: Caller, task: str | None, limit: int | None, *, agent: str | None = None
    ) -> ClaimablePage:
        """The claimable page, without the executions a claim by id on this
        process would refuse at once (`claim`): a list shows what a claim would
        accept. Concurrent calls for the same list share one read, and get the
        same page object."""
        listing = _Listing(caller.account_id, task, agent, 50 if limit is None else limit)
        read = self._list_next.get(listing)
        if read is None:
            read = self._list_next[listing] = asyncio.ensure_future(
                self._shared_read(listing, self._list_reading.get(listing))
            )
        # Shielded: a caller that goes away does not cancel the others' read.
        return await asyncio.shield(read)

    async def _shared_read(
        self, listing: _Listing, under_way: asyncio.Task[ClaimablePage] | None
    ) -> ClaimablePage:
        """One read of a list for every call that joins it before it begins.
        It begins after the list's read under way, if any, and a few turns of
        the event loop (as a `Coalescer` batch does), so calls that arrive
        meanwhile share it. Every call joined before the read began, so each
        sees all it wrote before; other lists are read independently. A failed
        read fails the calls that shared it, and only those."""
        this = cast("asyncio.Task[ClaimablePage]", asyncio.current_task())
        try:
            if under_way is not None:
                await asyncio.wait([under_way])
            for _ in range(GATHER_TURNS):
                await asyncio.sleep(0)
        finally:  # from here on, a new call starts another read
            if self._list_next.get(listing) is this:
                del self._list_next[listing]
        self._list_reading[listing] = this
        try:
            return await self._read_page(listing)
        finally:
            if self._list_reading.get(listing) is this:
                del self._list_reading[listing]

    async def _read_page(self, listing: _Listing) -> ClaimablePage:
        """It reads as many more rows as there are claims under way (at most
        twice the page), for those it leaves out."""
        moment = now()
        async with self._db.reader() as repos:
            rows = await repos.claims.claimable_page(
                listing.account_id,
                moment,
                moment - self._silence,
                listing.task,
                listing.page + min(len(self._claiming), listing.page),
                listing.agent,
            )
        clock = time.monotonic()
        kept = (row for row in rows if not self._refused(listing.account_id, row.id, clock))
        return ClaimablePage(itertools.islice(kept, listing.page))

    def _refused(self, account_id: uuid.UUID, execution_id: uuid.UUID, clock: float) -> bool:
        """Whether a claim of the execution loses without asking the database:
        another claim of it is under way on this process, or this process
        claimed it moments ago (its lease cannot have lapsed yet)."""
        held = self._held.get(execution_id)
        return (account_id, execution_id) in self._claiming or (held is not None and held > clock)

    def work_arrived(self, created: Sequence[NewWork] | None = None) -> None:
        """New claimable work may exist. Each new worker execution wakes one
        waiting long poll of its account that takes its task (one parked in
        its wait first, the longest waiting first), so waiters do not all race
        for one execution; unknown work (None) wakes them all."""
        if created is None:
            for waiters in self._waiters.values():
                for waiter in waiters:
                    waiter.woken.set()
            return
        for work in created:
            if work.transport == "worker":
                self._wake_one(work.account_id, work.task)

    def stop_waiting(self) -> None:
        """The server is shutting down: waiting long polls answer now with what
        they have (nothing), rather than hold the shutdown for their wait."""
        self._closing = True
        self.work_arrived(None)

    def _wake_one(self, account_id: uuid.UUID, task: str | None) -> None:
        chosen: _Waiter | None = None
        for waiter in self._waiters.get(account_id, ()):
            if waiter.takes(task):
                if waiter.woken.is_set():
                    if waiter.parked:  # about to look already: it will find this too
                        return
                    continue
                if waiter.parked:
                    chosen = waiter
                    break
                chosen = chosen or waiter
        if chosen is not None:
            chosen.offered.add(task)
            chosen.woken.set()

    async def claim_batch(
        self, caller: Caller, worker_id: str, task: str | None, limit: int, wait_seconds: float
    ) -> Sequence[AnyRow]:
        """Up to `limit` claims; with nothing claimable, wait up to wait_seconds.
        Waiters wake at once for work created on this process or announced by
        another (PostgreSQL), and re-check every claim_recheck_seconds for work
        nothing announced (a send_at that came due, a missed announcement)."""
        if wait_seconds <= 0:
            return await self._claim(caller, worker_id, task=task, limit=limit)
        deadline = time.monotonic() + wait_seconds
        waiter = _Waiter(task)
        waiters = self._waiters.setdefault(caller.account_id, [])
        waiters.append(waiter)
        try:
            while True:
                waiter.woken.clear()  # before the query, so work committed during it wakes the next
                waiter.offered.clear()
                rows = await self._claim(caller, worker_id, task=task, limit=limit)
                remaining = deadline - time.monotonic()
                if rows or remaining <= 0 or self._closing:
                    return rows
                waiter.parked = True
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(waiter.woken.wait(), min(remaining, self._recheck))
                finally:
                    waiter.parked = False
        finally:
            waiters.remove(waiter)
            if not waiters and self._waiters.get(caller.account_id) is waiters:
                del self._waiters[caller.account_id]
            if waiter.woken.is_set():
                # Woken for work it may not have taken (it left with other rows,
                # or was cancelled): hand the wake on to another waiter.
                for offered in waiter.offered:
                    self._wake_one(caller.account_id, offered)

    async def claim(self, caller: Caller, worker_id: str, execution_id: str) -> AnyRow:
        """Claims one named execution. Under the CueAPI worker protocol every
        worker claims the head of the same listed page, so most claims by id
        lose a race; those this process can decide lose at once, and their
        worker moves on to the next execution instead of waiting for a
        statement to be told no. That is when the execution was claimed on this
        process moments ago (its lease cannot have lapsed yet), or while another
        claim of it is under way here (as if that claim had locked the row)."""
        parsed = parse_uuid(execution_id)
        if parsed is None:
            raise execution_not_found()
        asked = time.monotonic()
        if self._refused(caller.account_id, parsed, asked):
            raise claim_failed("Execution not available for claiming")
        key = (caller.account_id, parsed)
        self._claiming.add(key)
        try:
            row = await self._by_id.submit(ClaimRequest(caller.account_id, parsed, worker_id))
        finally:
            self._claiming.discard(key)
        if row is None:
            raise claim_failed("Execution not available for claiming")
        self._hold((row,), asked)
        return row

    def _hold(self, rows: Sequence[AnyRow], asked: float) -> None:
        """Remember executions just claimed (and committed) on this process, by
        a claim asked for at `asked` (monotonic): their leases began later, so
        the window is counted from then, however long the statement waited."""
        until = asked + self._held_for
        for row in rows:
            self._held[row.id] = until
            self._held.move_to_end(row.id)
        while len(self._held) > HELD_MAX:
            self._held.popitem(last=False)

    async def _claim_each(self, requests: Sequence[ClaimRequest]) -> list[AnyRow | None]:
        """Concurrent claims by id share one statement (on SQLite one
        transaction, run whole on the writer's thread)."""
        moment = now()
        if self._db.backend == "sqlite":
            silent_since = moment - self._silence
            return await self._db.sqlite_write(
                lambda conn: claim_each_sqlite(conn, requests, moment, self.lease, silent_since)
            )
        async with self._db.single_statement() as repos:
            return await repos.claims.claim_each(requests, moment, self.lease, moment - self._silence)

    async def claim_next(self, caller: Caller, worker_id: str, task: str | None) -> AnyRow:
        asked = time.monotonic()
        row = await self._next.submit(_NextClaim(caller.account_id, task, worker_id))
        if row is None:
            raise claim_failed("No executions available for claiming")
        self._hold((row,), asked)
        return row

    async def _claim_next_each(self, requests: Sequence[_NextClaim]) -> list[AnyRow | Failed | None]:
        """Concurrent claim-next calls of one account and task share one
        statement: it takes as many of the oldest claimable executions as there
        are calls, the oldest for the call that came first. Each account and
        task is its own statement (autocommitted on PostgreSQL; on SQLite the
        batch is one transaction). On PostgreSQL a statement that fails fails
        only its own calls: the claims of the others are committed, and are
        theirs."""
        groups: dict[tuple[uuid.UUID, str | None], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.account_id, request.task), []).append(index)
        claimed: list[AnyRow | Failed | None] = [None] * len(requests)
        moment = now()
        if self._db.backend == "sqlite":  # one transaction, run whole on the writer's thread

            def claim_groups(conn: sqlite3.Connection) -> None:
                for (account_id, task), indexes in groups.items():
                    workers = [requests[index].worker_id for index in indexes]
                    rows = claim_next_sqlite(
                        conn, account_id, workers, moment, self.lease, moment - self._silence, task
                    )
                    for index, row in zip(indexes, rows, strict=False):  # fewer rows: nothing more to claim
                        claimed[index] = row

            await self._db.sqlite_write(claim_groups)
            return claimed
        kept = False  # a statement of this batch has committed
        async with self._db.single_statement() as repos:
            for (account_id, task), indexes in groups.items():
                try:
                    rows = await repos.claims.claim_next(
                        account_id,
                        [requests[index].worker_id for index in indexes],
                        moment,
                        self.lease,
                        moment - self._silence,
                        task=task,
                    )
                except Exception as exc:
                    if not kept:
                        raise  # nothing of the batch is kept: the coalescer retries it call by call
                    log.warning("a claim-next statement of a batch failed: %s", exc)
                    for index in indexes:
                        claimed[index] = Failed(exc)
                    continue
                kept = True
                for index, row in zip(indexes, rows, strict=False):  # fewer rows: nothing more to claim
                    claimed[index] = row
        return claimed

    async def _claim(
        self, caller: Caller, worker_id: str, *, task: str | None = None, limit: int = 1
    ) -> Sequence[AnyRow]:
        asked = time.monotonic()
        moment = now()
        claim = (caller.account_id, [worker_id] * limit, moment, self.lease, moment - self._silence)
        if self._db.backend == "sqlite":
            rows = await self._db.sqlite_write(lambda conn: claim_next_sqlite(conn, *claim, task))
        else:
            async with self._db.single_statement() as repos:
                rows = await repos.claims.claim_next(*claim, task=task)
        self._hold(rows, asked)
        return rows

    async def heartbeat(
        self, caller: Caller, execution_id: str, worker_id: str | None, fencing_token: int | None = None
    ) -> dt.datetime:
        """Extends the lease to now + lease and the outcome deadline to at least
        now + the cue's outcome_deadline_seconds."""
        parsed = parse_uuid(execution_id)
        if parsed is None:
            raise execution_not_found()
        moment = now()
        async with self._db.unit_of_work() as uow:
            held = await uow.claims.holder(caller.account_id, parsed)
            if held is None:
                raise execution_not_found()
            if held.transport != "worker" or held.status != "delivering":
                raise ApiError("execution_not_claiming", "Execution is not currently claimed", 409)
            if worker_id is not None and worker_id != held.claimed_by_worker:
                raise ApiError("not_execution_owner", "This execution is claimed by another worker", 403)
            if fencing_token is not None and fencing_token != held.attempts:
                raise stale_claim()
            deadline = moment + dt.timedelta(seconds=held.outcome_deadline_seconds)
            if held.outcome_deadline_at is not None:
                deadline = max(deadline, held.outcome_deadline_at)
            lease_until = moment + self.lease
            await uow.claims.extend(parsed, moment, lease_until, deadline)
            await uow.commit()
        return lease_until

    async def replay(self, caller: Caller, execution_id: str) -> AnyRow:
        parsed = parse_uuid(execution_id)
        if parsed is None:
            raise execution_not_found()
        moment = now()
        async with self._db.unit_of_work() as uow:
            original = await uow.executions.get(caller.account_id, parsed)
            if original is None:
                raise execution_not_found()
            if original.status not in FINAL:
                raise ApiError(
                    "execution_in_flight", "Cannot replay an execution that is still in progress", 409
                )
            cue = await uow.cues.get(caller.account_id, original.cue_id)
            assert cue is not None
            values = new_execution(cue, triggered_by="replay", payload=original.payload, scheduled_for=moment)
            values["replayed_from"] = original.id
            await uow.executions.add(values)
            await uow.cues.count_fired(cue.id, 1, moment)
            row = await uow.executions.get(caller.account_id, values["id"])
            assert row is not None
            await uow.commit()
        self._work_created([NewWork.of(values)])
        return row

    # --- housekeeping -----------------------------------------------------------------------

    async def recover_leases(self, moment: dt.datetime) -> None:
        """Expired leases of silent workers go back to pending (attempts kept),
        or fail once the cue's max_attempts are used. Those of live workers are
        put off until their worker could first count as silent."""
        async with self._db.unit_of_work() as uow:
            failed, released = await uow.claims.recover_expired(moment, moment - self._silence, SWEEP_BATCH)
            await _settle(uow, failed, moment)
            await uow.claims.defer_live_leases(moment, moment - self._silence, self._silence, SWEEP_BATCH)
            await uow.commit()
        self._failed([row.id for row in failed])
        if released:
            self._work_created(None)

    async def expire_unclaimed(self, moment: dt.datetime) -> None:
        async with self._db.unit_of_work() as uow:
            missed = await uow.claims.expire_unclaimed(moment - self._unclaimed, moment, SWEEP_BATCH)
            await _settle(uow, missed, moment)
            await uow.commit()
        self._failed([row.id for row in missed])


async def _settle(repos: Repositories, finished: Sequence[AnyRow], moment: dt.datetime) -> None:
    await repos.cues.record_results([(row.cue_id, row.status) for row in finished], moment)
