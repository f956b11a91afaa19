"""What the harness is doing, on stderr: one line per phase.

Each line tells the time since the harness started, what is being measured,
and either the expected length of a timed phase or its place in a count.
On a terminal the line is finished in place with the phase's real duration;
elsewhere (CI logs) each phase is one plain line, written when it starts.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_STARTED = time.monotonic()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes:02d}:{seconds:02d}"


@contextmanager
def phase(
    what: str, *, expected: float | None = None, count: tuple[int, int] | None = None
) -> Iterator[None]:
    """`with phase("postgres G1 gRPC, 64 callers", expected=6, count=(2, 3)): ...`"""
    stream = sys.stderr
    line = f"[{_clock(time.monotonic() - _STARTED)}] {what}"
    if count is not None:
        line += f", {count[0]}/{count[1]}"
    if expected is not None:
        line += f" (about {expected:.0f} s)" if expected >= 1 else f" (about {expected:.1f} s)"
    live = stream.isatty()
    stream.write(line + (" ..." if live else "\n"))
    stream.flush()
    started = time.monotonic()
    try:
        yield
    finally:
        if live:
            stream.write(f" {time.monotonic() - started:.1f} s\n")
            stream.flush()
