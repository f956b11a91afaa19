"""Claims by id that race. On one process, a claim of an execution loses at
once, without waiting for a statement, while another claim of it is under way
there or for a while after it was claimed there; the execution is not held back
once the claim under way has failed or that while has passed. Claims of one id
by two accounts in one statement: only the owner's can win. Concurrent calls
for the same claimable list share one read. A claim-next batch
whose statement for one account fails still answers the others'."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import text, update

from cueline_server.config import Settings
from cueline_server.errors import ApiError
from cueline_server.services.accounts import AccountService, Authenticator, Caller, now
from cueline_server.services.claims import ClaimablePage, ClaimService
from cueline_server.services.cues import CueService
from cueline_server.store.database import Database
from cueline_server.store.migrate import upgrade
from cueline_server.store.repositories import ClaimRepository, ClaimRequest, claim_each_sqlite
from cueline_server.store.tables import executions


async def _caller(db: Database, settings: Settings, email: str) -> Caller:
    authenticator = Authenticator(db, cache_seconds=0)
    key = (await AccountService(db, settings, authenticator).register(email)).api_key
    return await authenticator.authenticate(f"Bearer {key}")


async def _fire(cues: CueService, caller: Caller, cue_id: str) -> str:
    fired = await cues.fire(caller, cue_id, send_at=None, payload_override=None, replace=False)
    return fired.execution_id


async def _accounts_and_cue(db: Database, settings: Settings) -> tuple[Caller, Caller, str]:
    """Two accounts, and a worker cue of the first."""
    owner = await _caller(db, settings, "owner@example.com")
    stranger = await _caller(db, settings, "stranger@example.com")
    cue = await CueService(db, settings).create(
        owner,
        {"name": "race", "transport": "worker", "schedule.type": "recurring", "schedule.cron": "0 0 1 1 *"},
    )
    return owner, stranger, str(cue.row.id)


async def _services_and_cue(db: Database, settings: Settings) -> tuple[ClaimService, CueService, Caller, str]:
    """Claim and cue services, an account, and a worker cue of it."""
    owner, _, cue_id = await _accounts_and_cue(db, settings)
    return ClaimService(db, settings), CueService(db, settings), owner, cue_id


async def _put_back(db: Database, execution: str) -> None:
    """Make a claimed execution pending again: what only a hand-written
    statement can do before its lease ends."""
    async with db.unit_of_work() as uow:
        await uow.conn.execute(
            update(executions)
            .where(executions.c.id == uuid.UUID(execution))
            .values(status="pending", claimed_by_worker=None, lease_expires_at=None, recover_after=None)
        )
        await uow.commit()


def _ids(page: ClaimablePage) -> list[str]:
    return [str(row.id) for row in page.rows]


Read = Callable[..., Awaitable[Any]]


def _through(
    monkeypatch: pytest.MonkeyPatch,
    wrapper: Callable[[Read, ClaimRepository, tuple[Any, ...]], Awaitable[Any]],
) -> None:
    """Every claimable list's read goes through `wrapper`, given the real read."""
    read = ClaimRepository.claimable_page

    async def wrapped(self: ClaimRepository, *args: Any) -> Any:
        return await wrapper(read, self, args)

    monkeypatch.setattr(ClaimRepository, "claimable_page", wrapped)


def _run(
    database_url: str, scenario: Callable[[Database, Settings], Awaitable[None]], **settings_: Any
) -> None:
    upgrade(database_url)
    settings = Settings(database_url=database_url, **settings_)

    async def run() -> None:
        db = Database(database_url)
        try:
            await scenario(db, settings)
        finally:
            await db.dispose()

    asyncio.run(run())


def test_a_claim_of_an_execution_another_claim_holds_loses_at_once(database_url: str) -> None:
    async def scenario(db: Database, settings: Settings) -> None:
        claims, cues = ClaimService(db, settings), CueService(db, settings)
        owner, _, cue_id = await _accounts_and_cue(db, settings)
        execution = await _fire(cues, owner, cue_id)

        first = asyncio.create_task(claims.claim(owner, "w1", execution))
        await asyncio.sleep(0)  # w1's claim is submitted and waits for its statement
        with pytest.raises(ApiError) as lost:
            await claims.claim(owner, "w2", execution)
        assert (lost.value.code, lost.value.http_status) == ("claim_failed", 409)
        assert not first.done(), "the loser waited for the winner's statement"
        won = await first
        assert (str(won.id), won.attempts) == (execution, 1)

        # The claim under way has finished: the next claim is decided by the
        # execution's state again, and another execution is not held back.
        with pytest.raises(ApiError):
            await claims.claim(owner, "w2", execution)
        second = await _fire(cues, owner, cue_id)
        assert str((await claims.claim(owner, "w2", second)).id) == second

    _run(database_url, scenario)


def test_an_execution_claimed_on_this_process_moments_ago_loses_without_the_database(
    database_url: str,
) -> None:
    async def scenario(db: Database, settings: Settings) -> None:
        claims, cues = ClaimService(db, settings), CueService(db, settings)
        owner, _, cue_id = await _accounts_and_cue(db, settings)
        execution = await _fire(cues, owner, cue_id)
        assert str((await claims.claim_next(owner, "w1", None)).id) == execution
        await _put_back(db, execution)
        with pytest.raises(ApiError) as lost:
            await claims.claim(owner, "w2", execution)  # decided from memory
        assert lost.value.code == "claim_failed"
        # Another process asks the database, where the execution is claimable.
        assert str((await ClaimService(db, settings).claim(owner, "w3", execution)).id) == execution

        # Half the lease later this process asks the database too.
        await _put_back(db, execution)
        await asyncio.sleep(settings.worker_claim_lease_seconds / 2 + 0.05)
        assert str((await claims.claim(owner, "w2", execution)).id) == execution

    _run(database_url, scenario, worker_claim_lease_seconds=1)


def test_the_claimable_list_leaves_out_what_a_claim_here_would_refuse(database_url: str) -> None:
    """Under way or claimed moments ago on this process: not listed there, and
    the page is still filled up to its limit."""

    async def scenario(db: Database, settings: Settings) -> None:
        claims, cues = ClaimService(db, settings), CueService(db, settings)
        owner, _, cue_id = await _accounts_and_cue(db, settings)
        fired = [await _fire(cues, owner, cue_id) for _ in range(4)]

        async def listed(service: ClaimService, limit: int | None = None) -> list[str]:
            return _ids(await service.claimable(owner, None, limit))

        assert await listed(claims) == fired
        under_way = asyncio.create_task(claims.claim(owner, "w1", fired[0]))
        await asyncio.sleep(0)
        assert await listed(claims, 2) == fired[1:3]
        await under_way
        await _put_back(db, fired[0])  # claimable in the database, claimed moments ago here
        assert await listed(claims) == fired[1:]
        assert await listed(ClaimService(db, settings)) == fired

    _run(database_url, scenario)


def test_concurrent_calls_for_one_list_share_one_read(database_url: str) -> None:
    """They get the same page; another account, task or limit gets its own, and
    a list asked later reads again."""

    async def scenario(db: Database, settings: Settings) -> None:
        claims, cues = ClaimService(db, settings), CueService(db, settings)
        owner, stranger, cue_id = await _accounts_and_cue(db, settings)
        fired = [await _fire(cues, owner, cue_id) for _ in range(3)]
        pages = await asyncio.gather(
            *(claims.claimable(owner, None, None) for _ in range(3)),
            claims.claimable(owner, None, 2),
            claims.claimable(owner, "other", None),
            claims.claimable(stranger, None, None),
        )
        assert pages[0] is pages[1] is pages[2]
        assert len({id(page) for page in pages[2:]}) == 4
        listed = [_ids(page) for page in pages]
        assert listed == [fired, fired, fired, fired[:2], [], []]
        newer = await _fire(cues, owner, cue_id)
        assert _ids(await claims.claimable(owner, None, None)) == [*fired, newer]

    _run(database_url, scenario)


def test_a_list_asked_while_its_read_is_under_way_reads_again(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read under way may have been made before the caller's own writes."""

    async def scenario(db: Database, settings: Settings) -> None:
        claims, cues, owner, cue_id = await _services_and_cue(db, settings)
        first = await _fire(cues, owner, cue_id)
        queried, released = asyncio.Event(), asyncio.Event()

        async def held_back(read: Read, repository: ClaimRepository, args: tuple[Any, ...]) -> Any:
            rows = await read(repository, *args)
            queried.set()
            await released.wait()
            return rows

        _through(monkeypatch, held_back)
        under_way = asyncio.create_task(claims.claimable(owner, None, None))
        await queried.wait()
        second = await _fire(cues, owner, cue_id)
        later = asyncio.create_task(claims.claimable(owner, None, None))
        await asyncio.sleep(0.05)
        released.set()
        assert _ids(await under_way) == [first]
        assert _ids(await later) == [first, second]

    _run(database_url, scenario)


def test_a_failed_list_read_fails_only_the_calls_that_shared_it(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(db: Database, settings: Settings) -> None:
        claims, cues, owner, cue_id = await _services_and_cue(db, settings)
        fired = await _fire(cues, owner, cue_id)
        failed_reads = 0

        async def failing(read: Read, repository: ClaimRepository, args: tuple[Any, ...]) -> Any:
            nonlocal failed_reads
            if args[3] == "broken":  # the task
                failed_reads += 1
                raise RuntimeError("read failed for the test")
            return await read(repository, *args)

        _through(monkeypatch, failing)
        answers = await asyncio.gather(
            claims.claimable(owner, "broken", None),
            claims.claimable(owner, "broken", None),
            claims.claimable(owner, None, None),
            return_exceptions=True,
        )
        assert [type(answer) for answer in answers[:2]] == [RuntimeError, RuntimeError]
        assert failed_reads == 1, "the calls that shared the read were not retried one by one"
        assert not isinstance(answers[2], BaseException), answers[2]
        assert _ids(answers[2]) == [fired]

    _run(database_url, scenario)


@pytest.mark.parametrize("zone", ["UTC", "America/New_York"])
def test_the_readers_execution_read_matches_the_transactional_one(database_url: str, zone: str) -> None:
    """On PostgreSQL the reader's read runs on the driver directly: the same
    columns, values and time zones as SQLAlchemy's, whatever the session's time
    zone (the reader's sessions are set to UTC; a proxy may not pass that on)."""

    async def scenario(db: Database, settings: Settings) -> None:
        claims, cues, owner, cue_id = await _services_and_cue(db, settings)
        execution = uuid.UUID(await _fire(cues, owner, cue_id))
        await claims.claim(owner, "w1", str(execution))  # sets the claim's times and worker
        async with db.reader() as repos:
            if db.backend == "postgresql":
                await repos.conn.exec_driver_sql(f"SET TIME ZONE '{zone}'")
            read = await repos.executions.read(owner.account_id, execution)
        async with db.unit_of_work(write=False) as uow:
            got = await uow.executions.get(owner.account_id, execution)
        assert read is not None and got is not None
        assert read._fields == tuple(got._fields)
        assert tuple(read) == tuple(got)
        assert isinstance(read.claimed_at, dt.datetime)  # so the timestamps below are not none
        assert all(value.tzinfo is dt.UTC for value in read if isinstance(value, dt.datetime))

    _run(database_url, scenario)


def test_claims_and_the_claimable_list_read_as_the_tables_do(database_url: str) -> None:
    """Claims and the claimable list run on the driver directly (on SQLite, on
    the writer's or the reader's thread): their values have the types and the
    values SQLAlchemy reads from the tables (execution ids as UUIDs, times in
    UTC to the microsecond), for a claim by id, a claim-next and the list."""

    async def scenario(db: Database, settings: Settings) -> None:
        claims, cues, owner, cue_id = await _services_and_cue(db, settings)
        oldest, newer = [uuid.UUID(await _fire(cues, owner, cue_id)) for _ in range(2)]

        async def matches_the_table(row: Any) -> None:
            async with db.unit_of_work(write=False) as uow:
                stored = await uow.executions.get(owner.account_id, row.id)
            assert stored is not None
            shared = [name for name in row._fields if name in stored._fields]
            assert {"id", "cue_id", "scheduled_for", "payload"} <= set(shared)
            assert [getattr(row, name) for name in shared] == [getattr(stored, name) for name in shared]
            assert type(row.id) is uuid.UUID
            assert all(
                value.tzinfo is dt.UTC
                for value in (getattr(row, name) for name in shared)
                if isinstance(value, dt.datetime)
            )

        listed = (await claims.claimable(owner, None, None)).rows
        assert [row.id for row in listed] == [oldest, newer]
        for row in listed:
            await matches_the_table(row)
        by_id = await claims.claim(owner, "w1", str(newer))
        by_next = await claims.claim_next(owner, "w2", None)
        assert (by_id.id, by_next.id) == (newer, oldest)
        for row in (by_id, by_next):
            assert isinstance(row.lease_expires_at, dt.datetime)
            await matches_the_table(row)

    _run(database_url, scenario)


def test_another_accounts_claim_in_the_same_statement_is_not_handed_the_owners(database_url: str) -> None:
    async def scenario(db: Database, settings: Settings) -> None:
        owner, stranger, cue_id = await _accounts_and_cue(db, settings)
        execution = uuid.UUID(await _fire(CueService(db, settings), owner, cue_id))
        moment = now()
        requests = [
            ClaimRequest(stranger.account_id, execution, "s1"),
            ClaimRequest(owner.account_id, execution, "w1"),
        ]
        claim = (requests, moment, dt.timedelta(minutes=5), moment - dt.timedelta(minutes=3))
        if db.backend == "sqlite":
            to_stranger, to_owner = await db.sqlite_write(lambda conn: claim_each_sqlite(conn, *claim))
        else:
            async with db.single_statement() as repos:
                to_stranger, to_owner = await repos.claims.claim_each(*claim)
        assert to_stranger is None
        assert to_owner is not None and to_owner.id == execution

    _run(database_url, scenario)


def test_a_claim_next_batch_failing_for_one_account_still_answers_the_others(database_url: str) -> None:
    """On PostgreSQL each account of a claim-next batch is its own autocommitted
    statement, so a failure in a later one leaves the earlier claims committed:
    their callers must get them, not a retry that finds nothing. (SQLite writes
    the batch in one transaction, which a failure rolls back whole.)"""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite's batch is one transaction")

    async def scenario(db: Database, settings: Settings) -> None:
        claims, cues = ClaimService(db, settings), CueService(db, settings)
        owner, stranger, cue_id = await _accounts_and_cue(db, settings)
        mine = await _fire(cues, owner, cue_id)
        theirs = await CueService(db, settings).create(
            stranger,
            {
                "name": "other",
                "transport": "worker",
                "schedule.type": "recurring",
                "schedule.cron": "0 0 1 1 *",
            },
        )
        await _fire(cues, stranger, str(theirs.row.id))
        async with db.unit_of_work() as uow:  # the stranger's claims fail in the database
            await uow.conn.execute(
                text(
                    "CREATE FUNCTION refuse_claim() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'refused for the test'; END $$"
                )
            )
            await uow.conn.execute(
                text(
                    "CREATE TRIGGER refuse_claim BEFORE UPDATE ON executions FOR EACH ROW "
                    f"WHEN (NEW.account_id = '{stranger.account_id}') EXECUTE FUNCTION refuse_claim()"
                )
            )
            await uow.commit()

        answers = await asyncio.gather(
            claims.claim_next(owner, "w1", None),
            claims.claim_next(stranger, "s1", None),
            return_exceptions=True,
        )
        assert not isinstance(answers[0], BaseException), answers[0]
        assert str(answers[0].id) == mine
        assert isinstance(answers[1], Exception) and "refused for the test" in str(answers[1])

    _run(database_url, scenario)
