from __future__ import annotations

import datetime as dt

import pytest

from cueline_server.errors import ApiError
from cueline_server.services.schedules import check_cron, next_cron_time, preview, previous_cron_times, zone


def test_next_run_is_computed_in_the_zone_and_stored_in_utc() -> None:
    after = dt.datetime(2026, 3, 28, 12, 0, tzinfo=dt.UTC)
    # Europe/Berlin moves to CEST (UTC+2) on 2026-03-29.
    assert next_cron_time("0 9 * * *", "Europe/Berlin", after) == dt.datetime(
        2026, 3, 29, 7, 0, tzinfo=dt.UTC
    )
    assert next_cron_time("@daily", "UTC", after) == dt.datetime(2026, 3, 29, 0, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize("expression", ["", "   ", "61 * * * *", "* * *", "x" * 101])
def test_bad_cron_is_invalid_schedule(expression: str) -> None:
    with pytest.raises(ApiError) as raised:
        check_cron(expression)
    assert (raised.value.code, raised.value.http_status) == ("invalid_schedule", 400)


@pytest.mark.parametrize("name", ["Mars/Olympus", "America", "Etc", "x" * 300, "zone.tab", "UTC/", " UTC"])
def test_unknown_zone_is_invalid_timezone(name: str) -> None:
    """Names the zone database refuses in other ways (a directory, a name too long
    for a file, a file that holds no zone) are unknown zones too."""
    with pytest.raises(ApiError) as raised:
        zone(name)
    assert (raised.value.code, raised.value.http_status) == ("invalid_timezone", 422)


def test_a_skipped_time_is_shifted_forward_and_a_repeated_one_fires_once() -> None:
    berlin = "Europe/Berlin"
    # 2026-03-29: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist and fires at 03:30 CEST.
    spring = next_cron_time("30 2 * * *", berlin, dt.datetime(2026, 3, 28, 12, tzinfo=dt.UTC))
    assert spring == dt.datetime(2026, 3, 29, 1, 30, tzinfo=dt.UTC)
    following = next_cron_time("30 2 * * *", berlin, spring)
    assert following == dt.datetime(2026, 3, 30, 0, 30, tzinfo=dt.UTC)  # 02:30 CEST
    # 2026-10-25: 03:00 CEST falls back to 02:00 CET, so 02:30 happens twice; it fires once, the first time.
    autumn = next_cron_time("30 2 * * *", berlin, dt.datetime(2026, 10, 24, 12, tzinfo=dt.UTC))
    assert autumn == dt.datetime(2026, 10, 25, 0, 30, tzinfo=dt.UTC)
    assert next_cron_time("30 2 * * *", berlin, autumn) == dt.datetime(2026, 10, 26, 1, 30, tzinfo=dt.UTC)


def test_previous_slots_walk_back_newest_first() -> None:
    until = dt.datetime(2026, 1, 1, 12, 7, tzinfo=dt.UTC)
    slots = previous_cron_times("*/5 * * * *", "UTC", until)
    assert [next(slots) for _ in range(3)] == [
        dt.datetime(2026, 1, 1, 12, 5, tzinfo=dt.UTC),
        dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC),
        dt.datetime(2026, 1, 1, 11, 55, tzinfo=dt.UTC),
    ]
    on_a_slot = previous_cron_times("*/5 * * * *", "UTC", dt.datetime(2026, 1, 1, 12, 5, tzinfo=dt.UTC))
    assert next(on_a_slot) == dt.datetime(2026, 1, 1, 12, 5, tzinfo=dt.UTC)


def test_walks_of_one_expression_are_independent() -> None:
    """Every walk of an expression starts from the same parsed expression: two
    walks in progress at once, in both directions and in two zones, each keep
    their own position."""
    utc = dt.UTC
    back = previous_cron_times("*/15 * * * *", "UTC", dt.datetime(2026, 1, 1, 12, 0, tzinfo=utc))
    back_in_tokyo = previous_cron_times(
        "*/15 * * * *", "Asia/Tokyo", dt.datetime(2026, 1, 1, 3, 20, tzinfo=utc)
    )
    walked = []
    for _ in range(3):
        walked.append((next(back), next(back_in_tokyo)))
        # A third walk between their steps, forward from elsewhere.
        forward = next_cron_time("*/15 * * * *", "UTC", dt.datetime(2030, 6, 1, 8, 1, tzinfo=utc))
        assert forward == dt.datetime(2030, 6, 1, 8, 15, tzinfo=utc)
    assert walked == [
        (dt.datetime(2026, 1, 1, 12, 0, tzinfo=utc), dt.datetime(2026, 1, 1, 3, 15, tzinfo=utc)),
        (dt.datetime(2026, 1, 1, 11, 45, tzinfo=utc), dt.datetime(2026, 1, 1, 3, 0, tzinfo=utc)),
        (dt.datetime(2026, 1, 1, 11, 30, tzinfo=utc), dt.datetime(2026, 1, 1, 2, 45, tzinfo=utc)),
    ]


def test_slots_end_with_the_expression_and_the_calendar() -> None:
    """A year field that has run out, and the calendar's first and last days,
    end the walk instead of failing it."""
    now = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    assert next_cron_time("0 0 1 1 * 0 2020", "UTC", now) is None
    assert next_cron_time("0 0 1 1 * 0 2027", "UTC", now) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    end = dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.UTC)
    assert preview("recurring", "* * * * *", None, "UTC", end, 100) == []
    start = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
    first = preview("recurring", "0 * * * *", None, "America/New_York", start, 2)
    assert len(first) == 2 and first[0].at > start
