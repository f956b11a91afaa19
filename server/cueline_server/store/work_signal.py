"""New work wakes long-polling workers on every replica (PostgreSQL LISTEN/NOTIFY).

A process wakes its own waiting claims the moment it commits new work; waiters
on other processes (replicas, or the processes of `CUELINE_PROCESSES`) would
otherwise find it only at their next re-check (CUELINE_CLAIM_RECHECK_SECONDS).
So each PostgreSQL process also announces the worker work it created on the
`cueline_work` channel, and listens there for what the others created.

- Announcements are coalesced: one NOTIFY in flight per process, carrying how
  many executions each (account, task) got meanwhile; a payload that would not
  fit says "everything" instead (every waiter looks again).
- The NOTIFY runs on a connection of its own with synchronous_commit off: a
  notification lost in a crash only delays waiters until their re-check. After
  a failed announcement, the next waits a second.
- A process ignores its own announcements (it has woken its waiters already).
- Each time the listener (re)connects it wakes every waiter: what was
  announced while it was not listening went unheard. An idle listening
  connection proves it is alive every few seconds, so a silently dead one is
  replaced rather than trusted.
- Behind a transaction-pooling proxy LISTEN hears nothing; waiters still
  find the work at their re-check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from cueline_server.services.cues import NewWork

log = logging.getLogger("cueline.work_signal")

CHANNEL = "cueline_work"
MAX_PAYLOAD_BYTES = 7_900  # PostgreSQL refuses payloads of 8,000 bytes or more
MAX_WAKES = 1_000  # waiters woken for one (account, task) of one announcement, at most
RETRY_SECONDS = 1.0  # after a failure: before listening again, before announcing again
LISTEN_SECONDS = 1.0  # how often the listener checks whether to stop
ALIVE_CHECK_SECONDS = 10.0  # how often an idle listening connection is proved alive
TIMEOUT_SECONDS = 5.0  # connecting, proving alive, sending one announcement, finishing at stop

Wake = Callable[[Sequence[NewWork] | None], None]
EVERYTHING = None


class WorkSignal:
    def __init__(self, connect_args: dict[str, Any], wake: Wake) -> None:
        self._connect_args = {"connect_timeout": int(TIMEOUT_SECONDS), **connect_args}
        self._wake = wake
        self._origin = uuid.uuid4().hex
        self._pending: Counter[tuple[str, str | None]] | None = Counter()
        self._publishing: asyncio.Task[None] | None = None
        self._publisher: psycopg.AsyncConnection[Any] | None = None
        self._quiet_until = 0.0
        self._closed = False

    # --- announcing ---------------------------------------------------------------------------

    def announce(self, created: Sequence[NewWork] | None) -> None:
        """Called after new work committed (None: what is claimable is not known)."""
        if self._closed:
            return
        if created is EVERYTHING:
            self._pending = None
        else:
            work = [(w.account_id.hex, w.task) for w in created if w.transport == "worker"]
            if not work:
                return
            if self._pending is not None:
                self._pending.update(work)
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.create_task(self._publish())

    async def _publish(self) -> None:
        await asyncio.sleep(max(0.0, self._quiet_until - time.monotonic()))
        while self._pending is None or self._pending:
            work, self._pending = self._pending, Counter()
            try:
                await asyncio.wait_for(self._notify(self.payload(work)), TIMEOUT_SECONDS)
            except Exception as exc:  # a background task: nothing above it would log it
                log.warning("could not announce new work to other processes: %r", exc)
                self._quiet_until = time.monotonic() + RETRY_SECONDS
                await self._close_publisher()
                return

    def payload(self, work: Counter[tuple[str, str | None]] | None) -> str:
        entries = [[account, task, count] for (account, task), count in work.items()] if work else None
        text = json.dumps({"from": self._origin, "work": entries})
        if entries and len(text.encode()) > MAX_PAYLOAD_BYTES:
            return self.payload(EVERYTHING)
        return text

    async def _notify(self, payload: str) -> None:
        if self._publisher is None or self._publisher.closed:
            self._publisher = await psycopg.AsyncConnection.connect(**self._connect_args, autocommit=True)
            await self._publisher.execute("SET synchronous_commit = off")
        await self._publisher.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    async def _close_publisher(self) -> None:
        if self._publisher is not None:
            publisher, self._publisher = self._publisher, None
            await publisher.close()

    # --- listening ----------------------------------------------------------------------------

    def received(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            if message["from"] == self._origin:
                return
            if message["work"] is EVERYTHING:
                self._wake(EVERYTHING)
                return
            self._wake(
                [
                    NewWork(uuid.UUID(hex=account), "worker", task)
                    for account, task, count in message["work"]
                    for _ in range(min(int(count), MAX_WAKES))
                ]
            )
        except Exception:  # anyone may NOTIFY on the channel: a bad message must not stop listening
            log.warning("ignored a %s notification: %.200r", CHANNEL, payload, exc_info=True)

    async def run(self, stopping: asyncio.Event) -> None:
        """Listen until stopping is set, reconnecting after failures; then stop announcing."""
        try:
            while not stopping.is_set():
                try:
                    await self._listen(stopping)
                except Exception as exc:
                    log.warning("listening for other processes' work failed (retrying): %r", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), RETRY_SECONDS)
        finally:
            self._closed = True
            if self._publishing is not None:
                await asyncio.wait([self._publishing], timeout=TIMEOUT_SECONDS)
                self._publishing.cancel()
            await self._close_publisher()

    async def _listen(self, stopping: asyncio.Event) -> None:
        async with await psycopg.AsyncConnection.connect(**self._connect_args, autocommit=True) as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self._wake(EVERYTHING)  # whatever was announced before now went unheard
            checked = time.monotonic()
            while not stopping.is_set():
                async for notification in conn.notifies(timeout=LISTEN_SECONDS):
                    self.received(notification.payload)
                    checked = time.monotonic()
                if time.monotonic() - checked >= ALIVE_CHECK_SECONDS:
                    await asyncio.wait_for(conn.execute("SELECT 1"), TIMEOUT_SECONDS)
                    checked = time.monotonic()
