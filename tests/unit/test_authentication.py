"""API-key look-ups: calls that miss the cache together read the account once,
and after a key is rotated on this process no call uses what a look-up started
before the rotation read."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Engine, event

from cueline_server.config import Settings
from cueline_server.errors import ApiError
from cueline_server.services.accounts import AccountService, Authenticator
from cueline_server.store.database import Database
from cueline_server.store.migrate import upgrade


def _count_account_reads(reads: list[str]) -> Any:
    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM accounts" in statement:
            reads.append(statement)

    return seen


def test_concurrent_misses_share_one_read(database_url: str) -> None:
    upgrade(database_url)
    reads: list[str] = []
    seen = _count_account_reads(reads)

    async def scenario() -> None:
        db = Database(database_url)
        try:
            authenticator = Authenticator(db, cache_seconds=60)
            accounts = AccountService(db, Settings(database_url=database_url), authenticator)
            key = (await accounts.register("many@example.com")).api_key
            header = f"Bearer {key}"
            event.listen(Engine, "before_cursor_execute", seen)
            try:
                callers = await asyncio.gather(*(authenticator.authenticate(header) for _ in range(64)))
                assert len({caller.account_id for caller in callers}) == 1
                assert len(reads) == 1, reads
                await authenticator.authenticate(header)  # cached now
                assert len(reads) == 1, reads

                # An unknown key: every waiter gets the same refusal, from one read
                # of the key and one of the rotated keys.
                reads.clear()
                bogus = "Bearer cue_sk_" + "0" * 32
                refused = await asyncio.gather(
                    *(authenticator.authenticate(bogus) for _ in range(16)), return_exceptions=True
                )
                codes = {answer.code if isinstance(answer, ApiError) else repr(answer) for answer in refused}
                assert codes == {"invalid_api_key"}, refused
                assert len(reads) == 2, reads
            finally:
                event.remove(Engine, "before_cursor_execute", seen)
        finally:
            await db.dispose()

    asyncio.run(scenario())


def test_forget_outlasts_a_look_up_under_way(database_url: str) -> None:
    """`forget` (a key rotated on this process) lands after a look-up has read the
    account but before it finished: that look-up must not cache what it read, and
    calls after `forget` must read afresh instead of joining it."""
    upgrade(database_url)
    reads: list[str] = []
    count = _count_account_reads(reads)

    async def scenario() -> None:
        db = Database(database_url)
        authenticator = Authenticator(db, cache_seconds=60)
        accounts = AccountService(db, Settings(database_url=database_url), authenticator)
        header = f"Bearer {(await accounts.register('rotate@example.com')).api_key}"
        account_id = (await Authenticator(db, 0).authenticate(header)).account_id
        has_read = asyncio.Event()

        def read_done(*_: Any) -> None:
            if reads:
                has_read.set()

        async def forget_after_the_read() -> asyncio.Future[Any]:
            has_read.clear()
            under_way = asyncio.ensure_future(authenticator.authenticate(header))
            await has_read.wait()  # it has read and is still closing its transaction
            assert not under_way.done()
            authenticator.forget(account_id)
            return under_way

        event.listen(Engine, "before_cursor_execute", count)
        event.listen(Engine, "after_cursor_execute", read_done)
        try:
            await (await forget_after_the_read())
            assert len(reads) == 1, reads
            await authenticator.authenticate(header)  # not cached by the look-up under way
            assert len(reads) == 2, reads
            await authenticator.authenticate(header)  # cached by the look-up after `forget`
            assert len(reads) == 2, reads

            authenticator.forget(account_id)
            reads.clear()
            under_way = await forget_after_the_read()
            await authenticator.authenticate(header)  # a look-up of its own
            assert len(reads) == 2, reads
            await under_way
        finally:
            event.remove(Engine, "after_cursor_execute", read_done)
            event.remove(Engine, "before_cursor_execute", count)
            await db.dispose()

    asyncio.run(scenario())
