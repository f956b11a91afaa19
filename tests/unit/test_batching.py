"""Group commit: how concurrent submissions are batched, and failures isolated.

Most tests take batches the moment the drain runs (`gather_turns=0`), which
pins down the queueing itself; the last shows what the gathering turns add."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from cueline_server.store.batching import GATHER_TURNS, Coalescer


class Store:
    """A flush that records its batches; it can be held open and refuses "bad"."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def flush(self, items: Sequence[str]) -> list[str]:
        self.batches.append(list(items))
        await self.gate.wait()
        if "bad" in items:
            raise ValueError("bad item")
        return [item.upper() for item in items]


def test_a_lone_write_goes_at_once_and_queued_ones_share_a_batch() -> None:
    async def scenario() -> None:
        store = Store()
        coalescer = Coalescer(store.flush, max_batch=4, gather_turns=0)
        assert await coalescer.submit("a") == "A"
        store.gate.clear()
        first = asyncio.create_task(coalescer.submit("b"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # "b" is being written; the rest queue behind it
        rest = [asyncio.create_task(coalescer.submit(x)) for x in "cdefgh"]
        await asyncio.sleep(0)
        store.gate.set()
        assert await first == "B"
        assert [await task for task in rest] == list("CDEFGH")
        assert store.batches == [["a"], ["b"], ["c", "d", "e", "f"], ["g", "h"]]

    asyncio.run(scenario())


def test_a_failing_batch_is_retried_item_by_item() -> None:
    async def scenario() -> None:
        store = Store()
        coalescer = Coalescer(store.flush, gather_turns=0)
        store.gate.clear()
        blocker = asyncio.create_task(coalescer.submit("x"))
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(coalescer.submit(x)) for x in ("a", "bad", "c")]
        await asyncio.sleep(0)
        store.gate.set()
        assert await blocker == "X"
        assert await tasks[0] == "A" and await tasks[2] == "C"
        with pytest.raises(ValueError, match="bad item"):
            await tasks[1]
        assert store.batches[1:] == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]

    asyncio.run(scenario())


def test_a_caller_that_stops_waiting_still_has_its_item_written() -> None:
    async def scenario() -> None:
        store = Store()
        coalescer = Coalescer(store.flush, gather_turns=0)
        store.gate.clear()
        blocker = asyncio.create_task(coalescer.submit("x"))
        await asyncio.sleep(0)
        impatient = asyncio.create_task(coalescer.submit("late"))
        await asyncio.sleep(0)
        impatient.cancel()
        store.gate.set()
        assert await blocker == "X"
        follower = await coalescer.submit("y")
        assert follower == "Y" and ["late"] in store.batches

    asyncio.run(scenario())


def test_submitted_together_written_together_answered_in_order() -> None:
    async def scenario() -> None:
        store = Store()
        coalescer = Coalescer(store.flush, max_batch=3, gather_turns=0)
        store.gate.clear()
        single = asyncio.create_task(coalescer.submit("a"))
        await asyncio.sleep(0)
        many = asyncio.create_task(coalescer.submit_many(["b", "c", "d", "e"]))
        await asyncio.sleep(0)
        store.gate.set()
        assert await single == "A"
        assert await many == ["B", "C", "D", "E"]
        assert store.batches == [["a"], ["b", "c", "d"], ["e"]]

    asyncio.run(scenario())


def test_a_submission_a_loop_turn_behind_joins_the_batch() -> None:
    async def scenario() -> None:
        for turns, expected in ((0, [["a"], ["b"]]), (GATHER_TURNS, [["a", "b"]])):
            store = Store()
            coalescer = Coalescer(store.flush, gather_turns=turns)
            first = asyncio.create_task(coalescer.submit("a"))
            await asyncio.sleep(0)  # "a" is queued and the drain is started
            await asyncio.sleep(0)  # the drain runs: at once, or it waits its turns
            second = asyncio.create_task(coalescer.submit("b"))
            assert (await first, await second) == ("A", "B")
            assert store.batches == expected, turns
        assert await Coalescer(Store().flush).submit("alone") == "ALONE"

    asyncio.run(scenario())
