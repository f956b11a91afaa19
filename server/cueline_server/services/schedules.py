"""Schedules: cron expressions in IANA zones, and one-time fire times.

Cron is evaluated with croniter in the cue's zone and stored in UTC. Next-run
times are computed from zone-aware datetimes, so they follow DST changes.

Parsing an expression is most of what building a croniter costs, and a
recurring cue's firing walks its expression twice (the slots due, the next
run), so each expression is parsed once and its walkers are copies of that.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import (
    CroniterBadCronError,
    CroniterBadDateError,
    CroniterError,
    CroniterNotAlphaError,
    croniter,
)

from cueline_server.errors import ApiError

MAX_CRON_LENGTH = 100
# Distinct expressions whose parsed croniter is remembered.
PARSED_EXPRESSIONS = 4096


def invalid_schedule(message: str) -> ApiError:
    return ApiError("invalid_schedule", message, 400)


def zone(name: str) -> ZoneInfo:
    """The IANA zone, or 422 invalid_timezone."""
    try:
        if not name or name != name.strip():
            raise ValueError(name)
        return ZoneInfo(name)
    # A name that is a directory of the zone database ("America") or too long for
    # a file name fails as OSError.
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ApiError("invalid_timezone", f"Invalid timezone: '{name}'", 422) from None


def check_cron(expression: str | None) -> str:
    if expression is None or not expression.strip():
        raise invalid_schedule("Cron expression is required")
    if len(expression) > MAX_CRON_LENGTH:
        raise invalid_schedule(f"Cron expression must be at most {MAX_CRON_LENGTH} characters")
    try:
        _parsed(expression)
    except CroniterError:
        raise invalid_schedule(f"Invalid cron expression: '{expression}'") from None
    return expression


@lru_cache(maxsize=PARSED_EXPRESSIONS)
def _parsed(expression: str) -> croniter:
    """The parsed expression; an invalid one raises (and is not remembered)."""
    return croniter(expression, dt.datetime(2000, 1, 1))


def _walker(expression: str, start: dt.datetime) -> croniter:
    """A croniter for `expression` at the naive wall-clock time `start`. Walking
    copies the parsed fields rather than changing them, so copies are independent."""
    walker = copy.copy(_parsed(expression))
    walker.set_current(start, force=True)
    return walker


def _instant(wall: dt.datetime, where: ZoneInfo) -> dt.datetime:
    """A wall-clock time in a zone as a UTC instant. A time that a DST change
    skips is shifted forward by the gap (02:30 on a spring-forward night is
    03:30); a time that occurs twice means its first occurrence, so it fires once."""
    return wall.replace(tzinfo=where, fold=0).astimezone(dt.UTC)


def _slots(expression: str, timezone: str, start: dt.datetime, forward: bool) -> Iterator[dt.datetime]:
    """Cron slots as UTC instants, walking wall-clock time in the zone. The walk
    ends where the expression has no more slots (a year field that has run out,
    a date that never comes, or the calendar's end at the years 1 and 9999)."""
    where = zone(timezone)
    try:
        wall = start.astimezone(where).replace(tzinfo=None)
        walker = _walker(expression, wall if forward else wall + dt.timedelta(seconds=1))
    except OverflowError:
        return
    except (CroniterBadCronError, CroniterNotAlphaError) as exc:
        raise invalid_schedule(f"Invalid cron expression: '{expression}'") from exc
    while True:
        try:
            step = walker.get_next(dt.datetime) if forward else walker.get_prev(dt.datetime)
            instant = _instant(step, where)
        except (CroniterBadDateError, OverflowError):
            return
        except (CroniterBadCronError, CroniterNotAlphaError) as exc:
            raise invalid_schedule(f"Invalid cron expression: '{expression}'") from exc
        yield instant


def next_cron_time(expression: str, timezone: str, after: dt.datetime) -> dt.datetime | None:
    """The first cron slot strictly after `after`, in UTC; None when the
    expression has none (its last year has passed)."""
    for slot in _slots(expression, timezone, after, forward=True):
        if slot > after:
            return slot
    return None


def previous_cron_times(expression: str, timezone: str, until: dt.datetime) -> Iterator[dt.datetime]:
    """Cron slots at or before `until`, newest first, each distinct."""
    last: dt.datetime | None = None
    for slot in _slots(expression, timezone, until, forward=False):
        if slot <= until and (last is None or slot < last):
            last = slot
            yield slot


REPLAY_CAP = 100
_SECOND_DAY = dt.datetime(1, 1, 2, tzinfo=dt.UTC)


def plan_firing(
    *,
    schedule_type: str,
    cron: str | None,
    timezone: str,
    next_run: dt.datetime,
    catch_up: str,
    now: dt.datetime,
    grace: dt.timedelta,
) -> tuple[list[dt.datetime], dt.datetime | None]:
    """The slots to fire for a due cue, oldest first, and its next run.

    A once cue fires its one slot however late. For a recurring cue, the due
    window W is every slot from next_run up to now; its newest slot is the
    current one and the rest were missed while nothing was running:
    run_once_if_missed fires the newest; skip_missed fires it only when it is
    no older than the grace; replay_all_missed fires all of W, the newest 100
    at most. The next run is the first slot strictly after now."""
    if schedule_type == "once":
        return [next_run], None
    assert cron is not None
    window: list[dt.datetime] = []
    for slot in previous_cron_times(cron, timezone, now):
        if slot < next_run:
            break
        window.append(slot)
        if catch_up != "replay_all_missed" or len(window) == REPLAY_CAP:
            break
    if not window:  # next_run is later than the newest slot: fire it, it is due
        window = [next_run]
    if catch_up == "skip_missed" and now - window[0] > grace:
        window = []
    return window[::-1], next_cron_time(cron, timezone, now)


@dataclass(frozen=True)
class FireTime:
    at: dt.datetime
    local: dt.datetime
    dst_transition: bool


def preview(
    schedule_type: str | None,
    cron: str | None,
    at: dt.datetime | None,
    timezone: str,
    after: dt.datetime,
    count: int,
) -> list[FireTime]:
    """The next `count` fire times, each with its local time and whether the
    zone's UTC offset changed since the one before (a DST transition). Times
    are looked for from the second day of year 1 at the earliest, where every
    zone's local time is still on the calendar."""
    where = zone(timezone)
    after = max(after, _SECOND_DAY)
    if schedule_type == "once":
        if at is None:
            raise invalid_schedule("Scheduled time must be in the future")
        times = [at] if at > after else []
    elif schedule_type == "recurring":
        expression = check_cron(cron)
        times = []
        for slot in _slots(expression, timezone, after, forward=True):
            if slot > after and (not times or slot > times[-1]):
                times.append(slot)
            if len(times) == count:
                break
    else:
        raise invalid_schedule("Schedule type must be 'once' or 'recurring'")
    result: list[FireTime] = []
    previous = after.astimezone(where).utcoffset()
    for moment in times:
        local = moment.astimezone(where)
        result.append(FireTime(moment, local, local.utcoffset() != previous))
        previous = local.utcoffset()
    return result
