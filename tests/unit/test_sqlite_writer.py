"""SQLite's writer transactions run whole on the writer connection's thread
(`Database.sqlite_write`), on a real database file."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from cueline_server.store.database import Database

T = TypeVar("T")


def run_with_database(path: Path, scenario: Callable[[Database], Awaitable[T]]) -> T:
    """`scenario` on a fresh database file holding one table, t."""

    async def main() -> T:
        db = Database(f"sqlite:///{path / 'writer.db'}")
        try:
            await db.sqlite_write(lambda conn: conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
            return await scenario(db)
        finally:
            await db.dispose()

    return asyncio.run(main())


async def committed(db: Database) -> list[int]:
    async with db.reader() as repos:
        return list((await repos.conn.execute(text("SELECT n FROM t ORDER BY n"))).scalars())


def test_a_failed_transaction_leaves_nothing_and_raises_sqlalchemys_error(tmp_path: Path) -> None:
    def duplicate(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("INSERT INTO t VALUES (1)")

    async def scenario(db: Database) -> list[int]:
        with pytest.raises(sa_exc.IntegrityError):
            await db.sqlite_write(duplicate)
        # The writer is free and usable again.
        await db.sqlite_write(lambda conn: conn.execute("INSERT INTO t VALUES (2)"))
        return await committed(db)

    assert run_with_database(tmp_path, scenario) == [2]


def test_a_cancelled_caller_does_not_cut_its_transaction_short(tmp_path: Path) -> None:
    started = threading.Event()

    def slow(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (1)")
        started.set()
        time.sleep(0.3)
        conn.execute("INSERT INTO t VALUES (2)")

    async def scenario(db: Database) -> tuple[list[int], list[int]]:
        first = asyncio.create_task(db.sqlite_write(slow))
        assert await asyncio.to_thread(started.wait, 10)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        # The next writer starts after the whole first transaction, and sees it.
        async with db.unit_of_work() as uow:
            seen = list((await uow.conn.execute(text("SELECT n FROM t ORDER BY n"))).scalars())
            await uow.conn.execute(text("INSERT INTO t VALUES (3)"))
            await uow.commit()
        return seen, await committed(db)

    assert run_with_database(tmp_path, scenario) == ([1, 2], [1, 2, 3])
