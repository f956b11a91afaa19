"""The event loop `cueline serve` runs on (CUELINE_EVENT_LOOP).

uvloop's loop spends less CPU per socket event, connection and callback than
asyncio's own; both transports run on the one loop, so each call costs less
(measured in docs/performance.md). "auto" takes uvloop when it is installed,
as it is on Linux and macOS, and asyncio's loop elsewhere; "asyncio" forces
asyncio's own loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

CHOICES = ("auto", "uvloop", "asyncio")


class UnknownEventLoop(ValueError):
    pass


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop named by `choice`; None for asyncio's own."""
    if choice not in CHOICES:
        raise UnknownEventLoop(f"CUELINE_EVENT_LOOP must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            raise UnknownEventLoop(
                f"CUELINE_EVENT_LOOP is uvloop, but it cannot be imported: {exc}"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
