"""Engines and the unit of work.

One transaction per call: a UnitOfWork opens it, repositories run statements
inside it, and only the unit of work commits. Hot paths whose whole effect is
one statement use `Database.single_statement()`, which runs that statement
in autocommit mode: one database round trip, no BEGIN/COMMIT exchange.

SQLite is the embedded default: WAL, synchronous=FULL, foreign keys on.
SQLite allows one writer at a time, so writers in this process queue on an
asyncio lock (no busy-wait) and take the database lock up front with BEGIN
IMMEDIATE, which other processes (the `cueline` CLI) then wait for instead of
failing on a lock upgrade.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiosqlite
import psycopg
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from cueline_server.store.partner import PartnerRepository
from cueline_server.store.repositories import (
    AccountRepository,
    AlertRepository,
    ClaimRepository,
    CueRepository,
    DeliveryRepository,
    ExecutionRepository,
    FireKeyRepository,
    WorkerRepository,
)

SQLITE_BUSY_TIMEOUT_MS = 30_000
T = TypeVar("T")


def async_url(url: str) -> URL:
    """Accept plain `postgresql://` and `sqlite:///` URLs and pick the async drivers."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    raise ValueError(f"unsupported database {backend!r}: use sqlite or postgresql")


def sync_url(url: str) -> URL:
    parsed = async_url(url)
    return parsed.set(drivername="sqlite") if parsed.get_backend_name() == "sqlite" else parsed


def configure_sqlite(engine: Any) -> None:
    """Pragmas on every new connection, and explicit BEGIN control (the sqlite3
    module's implicit transactions are switched off)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=FULL",
            "PRAGMA foreign_keys=ON",
            f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("cueline_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def ensure_sqlite_directory(url: URL) -> None:
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


class _WriterConnection(aiosqlite.Connection):
    """aiosqlite for SQLite's single writer, minus most of its thread hops.

    aiosqlite sends every call to the connection's own thread and back, and a
    write transaction holds the write lock across all of them: a statement,
    its fetch and its cursor's close are three hops, each waiting for a busy
    event loop to resume the writer. Here statements run in the calling thread
    (SQLite releases the GIL while it works). What can wait runs on the
    connection's thread as before: BEGIN, which may wait for another process's
    lock (busy_timeout), and COMMIT, which waits for the disk. Calls on one
    connection never overlap: one unit of work uses it at a time."""

    @classmethod
    async def open(cls, path: str) -> aiosqlite.Connection:
        connection = cls(lambda: sqlite3.connect(path, check_same_thread=False), iter_chunk_size=64)
        connection._thread.daemon = True
        return await connection

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if fn == self._conn.commit or (args and isinstance(args[0], str) and _begins(args[0])):
            return await super()._execute(fn, *args, **kwargs)  # type: ignore[no-untyped-call]
        if not self._running:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` in a write transaction of its own, run whole on the
        connection's thread: BEGIN IMMEDIATE, its statements and COMMIT (or
        ROLLBACK if it raises) are one hop from the event loop."""

        def run(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            return result

        result: T = await super()._execute(run, self._conn)  # type: ignore[no-untyped-call]
        return result


def _begins(sql: str) -> bool:
    return sql.lstrip()[:5].upper() == "BEGIN"


class Database:
    def __init__(self, url: str, *, pool_size: int = 20, prepared_statements: bool = True) -> None:
        self.url = async_url(url)
        self.backend = self.url.get_backend_name()
        ensure_sqlite_directory(self.url)
        if self.backend == "sqlite":
            # Every unit of work ends its own transaction, so the pool's rollback on
            # return would only cost another thread hop per checkout.
            self.engine: AsyncEngine = create_async_engine(
                self.url, pool_size=8, max_overflow=0, pool_reset_on_return=None
            )
            configure_sqlite(self.engine.sync_engine)
            # The single writer has a connection of its own (see _WriterConnection).
            path = self.url.database or ":memory:"
            self._writer: AsyncEngine | None = create_async_engine(
                self.url,
                pool_size=1,
                max_overflow=0,
                pool_reset_on_return=None,
                async_creator=lambda: _WriterConnection.open(path),
            )
            configure_sqlite(self._writer.sync_engine)
            self._write_lock: asyncio.Lock | None = asyncio.Lock()
        else:
            # No overflow: overflow connections are closed on return, so a busy
            # server would reconnect constantly; callers queue for a connection instead.
            self.engine = create_async_engine(
                self.url, pool_size=pool_size, max_overflow=0, connect_args={"prepare_threshold": None}
            )
            # The hot single statements (claims, outcome batches, fires, due deliveries,
            # heartbeats) get a pool of their own, whose connections stay in autocommit
            # mode: switching a pooled connection's mode costs a reset on every checkin.
            # Its statements are prepared on the server at first use and run with their
            # generic plan: each is driven by a primary key or an index in claim order,
            # and planning them anew on every call cost PostgreSQL more CPU than running
            # them. `prepared_statements=False` turns both off, for transaction-pooling
            # proxies that keep neither (PgBouncer before 1.21, or one that refuses the
            # `options` startup parameter). The same parameter sets the sessions' time
            # zone to UTC, in which the driver then gives timestamps as the tables read them.
            hot: dict[str, Any] = {"prepare_threshold": None}
            if prepared_statements:
                options = "-c plan_cache_mode=force_generic_plan -c TimeZone=UTC"
                hot = {"prepare_threshold": 0, "options": options}
            self._autocommit = _HeldConnections(
                create_async_engine(
                    self.url,
                    pool_size=pool_size,
                    max_overflow=0,
                    isolation_level="AUTOCOMMIT",
                    connect_args=hot,
                ),
                pool_size,
            )
            self._writer = None
            self._write_lock = None

    def connect_args(self) -> dict[str, Any]:
        """PostgreSQL: psycopg's connection parameters, for connections outside the pools."""
        _, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
        kwargs.pop("context", None)  # SQLAlchemy's adapters, not a connection parameter
        return dict(kwargs)

    def unit_of_work(self, *, write: bool = True) -> UnitOfWork:
        return UnitOfWork(self, write=write)

    @asynccontextmanager
    async def single_statement(self) -> AsyncIterator[Repositories]:
        """Repositories for work that is exactly one write statement. On
        PostgreSQL the statement runs in autocommit mode, its own transaction in
        one round trip; SQLite, being in-process, uses an ordinary transaction."""
        if self.backend == "sqlite":
            async with self.unit_of_work() as uow:
                yield uow
                await uow.commit()
            return
        async with self._autocommit.repositories() as repos:
            yield repos

    async def sqlite_write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """SQLite: `work` (plain sqlite3 calls) as one write transaction on the
        writer connection's own thread (`_WriterConnection.transaction`), so
        neither its statements nor its commit hold the event loop. A caller
        cancelled meanwhile does not cut it short: the thread finishes it, and
        the next writer's BEGIN queues behind it on the same thread. Errors come
        out as SQLAlchemy's, as from the repositories."""
        assert self._writer is not None and self._write_lock is not None, "SQLite only"
        async with self._write_lock:
            conn = await self._writer.connect()
            try:
                writer = (await conn.get_raw_connection()).driver_connection
                assert isinstance(writer, _WriterConnection)
                return await writer.transaction(work)
            except sqlite3.Error as exc:
                raise sa_exc.DBAPIError.instance(None, None, exc, sqlite3.Error) from exc
            finally:
                await conn.close()

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[Repositories]:
        """Repositories for reads that need no transaction around them: on
        PostgreSQL an autocommit connection (one round trip per statement), on
        SQLite a read transaction (which never waits for the writer)."""
        if self.backend == "sqlite":
            async with self.unit_of_work(write=False) as uow:
                yield uow
            return
        async with self._autocommit.repositories() as repos:
            yield repos

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._writer is not None:
            await self._writer.dispose()
        if self.backend != "sqlite":
            await self._autocommit.dispose()


class _HeldConnections:
    """PostgreSQL's autocommit connections, kept checked out of the engine's
    pool between statements, each with its repositories.

    A checkout from SQLAlchemy's pool and the checkin after it cost about
    0.2 ms of CPU (greenlet switches and the pool's bookkeeping), as much as
    the single statement run in between on the hot paths. An autocommit
    connection keeps no state from one statement to the next, so after a
    statement it goes straight back to the idle list.

    A block that fails keeps its connection only when the error did not come
    from the database. A database error, or a cancellation mid-statement,
    leaves the connection in a state not known: it is dropped. A lost
    connection means the others may be lost too (a failover, a restarted
    database), so the idle ones are dropped with it, as SQLAlchemy's pool
    does; the next statements connect afresh."""

    def __init__(self, engine: AsyncEngine, size: int) -> None:
        self._engine = engine
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Repositories] = []

    @asynccontextmanager
    async def repositories(self) -> AsyncIterator[Repositories]:
        async with self._slots:
            repos = self._idle.pop() if self._idle else Repositories(await self._engine.connect())
            try:
                yield repos
            except psycopg.Error as exc:
                # From a statement run on the driver directly, unseen by SQLAlchemy:
                # raised as SQLAlchemy would have raised it (a deadlock as its
                # OperationalError, a lost connection marked invalidated).
                driver = (await repos.conn.get_raw_connection()).driver_connection
                lost = driver is None or driver.broken
                await self._drop([repos, *(self._take_idle() if lost else ())])
                raise sa_exc.DBAPIError.instance(
                    None, None, exc, psycopg.Error, connection_invalidated=lost
                ) from exc
            except Exception as exc:
                if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
                    await self._drop([repos, *self._take_idle()])
                elif isinstance(exc, sa_exc.DBAPIError) or repos.conn.invalidated:
                    await self._drop([repos])
                else:
                    self._idle.append(repos)
                raise
            except BaseException:
                await self._drop([repos])
                raise
            self._idle.append(repos)

    def _take_idle(self) -> list[Repositories]:
        idle, self._idle = self._idle, []
        return idle

    @staticmethod
    async def _drop(held: Sequence[Repositories]) -> None:
        for repos in held:
            await repos.conn.invalidate()
            await repos.conn.close()

    async def dispose(self) -> None:
        for repos in self._take_idle():
            await repos.conn.close()
        await self._engine.dispose()


class Repositories:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.accounts = AccountRepository(conn)
        self.cues = CueRepository(conn)
        self.executions = ExecutionRepository(conn)
        self.claims = ClaimRepository(conn)
        self.fire_keys = FireKeyRepository(conn)
        self.deliveries = DeliveryRepository(conn)
        self.alerts = AlertRepository(conn)
        self.workers = WorkerRepository(conn)
        self.partner = PartnerRepository(conn)


class UnitOfWork(Repositories):
    """`async with db.unit_of_work() as uow: ...; await uow.commit()`.
    Leaving the block without commit rolls back."""

    def __init__(self, db: Database, *, write: bool) -> None:
        self._db = db
        self._write = write
        self._locked = False

    async def __aenter__(self) -> UnitOfWork:
        if self._write and self._db._write_lock is not None:
            await self._db._write_lock.acquire()
            self._locked = True
        try:
            if self._write and self._db._writer is not None:
                conn = await self._db._writer.connect()
                conn = await conn.execution_options(cueline_begin="IMMEDIATE")
            else:
                conn = await self._db.engine.connect()
            await conn.begin()
        except BaseException:
            self._release()
            raise
        super().__init__(conn)
        return self

    async def commit(self) -> None:
        await self.conn.commit()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.conn.in_transaction():
                await self.conn.rollback()
            await self.conn.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._locked and self._db._write_lock is not None:
            self._db._write_lock.release()
            self._locked = False
