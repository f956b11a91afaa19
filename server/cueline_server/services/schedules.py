"""Schedules: cron expressions in IANA zones, and one-time fire times.

Cron is evaluated with croniter in the cue's zone and stored in UTC. Next-run
times are computed from zone-aware datetimes, so they follow DST changes.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterNotAlphaError, croniter

from cueline_server.errors import ApiError

MAX_CRON_LENGTH = 100


def invalid_schedule(message: str) -> ApiError:
    return ApiError("invalid_schedule", message, 400)


def zone(name: str) -> ZoneInfo:
    """The IANA zone, or 422 invalid_timezone."""
    try:
        if not name or name != name.strip():
            raise ValueError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ApiError("invalid_timezone", f"Invalid timezone: '{name}'", 422) from None


def check_cron(expression: str | None) -> str:
    if expression is None or not expression.strip():
        raise invalid_schedule("Cron expression is required")
    if len(expression) > MAX_CRON_LENGTH:
        raise invalid_schedule(f"Cron expression must be at most {MAX_CRON_LENGTH} characters")
    if not croniter.is_valid(expression):
        raise invalid_schedule(f"Invalid cron expression: '{expression}'")
    return expression


def next_cron_time(expression: str, timezone: str, after: dt.datetime) -> dt.datetime:
    """The first cron slot strictly after `after`, in UTC."""
    local = after.astimezone(zone(timezone))
    try:
        slot: dt.datetime = croniter(expression, local).get_next(dt.datetime)
    except (CroniterBadCronError, CroniterBadDateError, CroniterNotAlphaError) as exc:
        raise invalid_schedule(f"Invalid cron expression: '{expression}'") from exc
    return slot.astimezone(dt.UTC)
