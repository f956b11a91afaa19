"""Group commit: concurrent callers' writes share one statement or transaction.

`Coalescer.submit` queues an item and waits for its result. While no batch is
being written, the queue is flushed after a few turns of the event loop (no
timer), so a lone caller waits for next to nothing; while one is, callers
queue and the next batch takes them all (up to `max_batch`). Under load the
database sees one statement per batch instead of one per call, which is where
the per-call cost of a Python server goes (driver, SQLAlchemy, round trip,
commit).

The turns before each batch let requests that were already read from their
sockets, a few steps short of submitting, join it instead of waiting behind
it. Idle, a turn costs microseconds; under load each turn runs the other
requests' next steps, so the wait grows with the load, and so do the
batches.

A failed batch is retried item by item, so one bad item fails only itself. A
flush that wrote part of a batch and cannot undo it answers the items of the
failed part with `Failed` instead of raising.
Every queued item is written even if its caller stops waiting (a client that
disconnects mid-call); its cancelled future is simply not answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger("cueline.batching")

T = TypeVar("T")
R = TypeVar("R")


# Event-loop turns before a batch is taken. Three took claim-next + report over
# REST from 1,112-1,144 to 1,219-1,354 cycles/s with eight workers on two
# PostgreSQL processes, and REST outcome ingest on SQLite (64 callers) from
# 4,730-4,830 to 5,450-5,530/s, with outcome latency at a fixed rate unchanged;
# six and ten turns bought nothing more (docs/performance.md).
GATHER_TURNS = 3


@dataclass(frozen=True)
class Failed:
    """A flush's answer for an item that failed while others were written: its
    caller gets `error`, and the batch is not retried."""

    error: Exception


class Coalescer(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[Sequence[T]], Awaitable[Sequence[R | Failed]]],
        *,
        max_batch: int = 256,
        gather_turns: int = GATHER_TURNS,
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._gather_turns = gather_turns
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._start()
        return await future

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """Queue several items at once: they go out together where the batch
        size allows. The results are in the order of `items`."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = [loop.create_future() for _ in items]
        self._queue.extend(zip(items, futures, strict=True))
        self._start()
        return list(await asyncio.gather(*futures))

    def _start(self) -> None:
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._queue:
                for _ in range(self._gather_turns):
                    await asyncio.sleep(0)
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._write(batch)
        finally:
            self._draining = None

    async def _write(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], error=exc)
                return
            log.warning("a batch of %d writes failed (%s); writing them one by one", len(batch), exc)
            for entry in batch:
                await self._write([entry])
            return
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, Failed):
                _settle(future, error=result.error)
            else:
                _settle(future, result=result)


def _settle(
    future: asyncio.Future[R], *, result: R | None = None, error: BaseException | None = None
) -> None:
    if future.done():  # the caller stopped waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
