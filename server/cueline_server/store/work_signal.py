"""New work wakes long-polling workers on every replica (PostgreSQL LISTEN/NOTIFY).

A process wakes its own waiting claims the moment it commits new work; waiters
on other processes (replicas, or the processes of `CUELINE_PROCESSES`) would
otherwise find it only at their next re-check, up to a second later. So each
PostgreSQL process also announces the worker work it created on the
`cueline_work` channel, and listens there for what the others created.

- Announcements are coalesced: one NOTIFY in flight per process, carrying
  every (account, task) created meanwhile; a payload that would not fit says
  "everything" instead (every waiter looks again).
- The NOTIFY runs on a connection of its own with synchronous_commit off: a
  notification lost in a crash only delays waiters until their re-check.
- A process ignores its own announcements (it has woken its waiters already).
- Each time the listener (re)connects it wakes every waiter: what was
  announced while it was not listening went unheard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from cueline_server.services.cues import NewWork

log = logging.getLogger("cueline.work_signal")

CHANNEL = "cueline_work"
MAX_PAYLOAD_BYTES = 7_900  # PostgreSQL refuses payloads of 8,000 bytes or more
RECONNECT_SECONDS = 1.0
LISTEN_TIMEOUT_SECONDS = 1.0  # how often the listener checks whether to stop

Wake = Callable[[Sequence[NewWork] | None], None]
EVERYTHING = None


class WorkSignal:
    def __init__(self, connect_args: dict[str, Any], wake: Wake) -> None:
        self._connect_args = connect_args
        self._wake = wake
        self._origin = uuid.uuid4().hex
        self._pending: set[tuple[str, str | None]] | None = set()
        self._publishing: asyncio.Task[None] | None = None
        self._publisher: psycopg.AsyncConnection[Any] | None = None

    # --- announcing ---------------------------------------------------------------------------

    def announce(self, created: Sequence[NewWork] | None) -> None:
        """Called after new work committed (None: what is claimable is not known)."""
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
        while self._pending is None or self._pending:
            work, self._pending = self._pending, set()
            try:
                await self._notify(self.payload(work))
            except (psycopg.Error, OSError) as exc:
                log.warning("could not announce new work to other processes: %s", exc)
                await self._close_publisher()
                return

    def payload(self, work: set[tuple[str, str | None]] | None) -> str:
        text = json.dumps({"from": self._origin, "work": list(work) if work else None})
        if work and len(text.encode()) > MAX_PAYLOAD_BYTES:
            return self.payload(EVERYTHING)
        return text

    async def _notify(self, payload: str) -> None:
        if self._publisher is None or self._publisher.closed:
            self._publisher = await psycopg.AsyncConnection.connect(
                **self._connect_args, autocommit=True, options="-c synchronous_commit=off"
            )
        await self._publisher.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    async def _close_publisher(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None

    # --- listening ----------------------------------------------------------------------------

    def received(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            if message["from"] == self._origin:
                return
            work = message["work"]
            if work is EVERYTHING:
                self._wake(EVERYTHING)
            else:
                self._wake([NewWork(uuid.UUID(account), "worker", task) for account, task in work])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed %s notification: %.200r", CHANNEL, payload)

    async def run(self, stopping: asyncio.Event) -> None:
        """Listen until stopping is set, reconnecting after failures."""
        try:
            while not stopping.is_set():
                try:
                    await self._listen(stopping)
                except (psycopg.Error, OSError) as exc:
                    log.warning("listening for other processes' work failed (retrying): %s", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), RECONNECT_SECONDS)
        finally:
            if self._publishing is not None:
                await asyncio.gather(self._publishing, return_exceptions=True)
            await self._close_publisher()

    async def _listen(self, stopping: asyncio.Event) -> None:
        async with await psycopg.AsyncConnection.connect(**self._connect_args, autocommit=True) as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self._wake(EVERYTHING)  # whatever was announced before now went unheard
            while not stopping.is_set():
                async for notification in conn.notifies(timeout=LISTEN_TIMEOUT_SECONDS):
                    self.received(notification.payload)
                    if stopping.is_set():
                        break
