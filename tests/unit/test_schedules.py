from __future__ import annotations

import datetime as dt

import pytest

from cueline_server.errors import ApiError
from cueline_server.services.schedules import check_cron, next_cron_time, zone


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


def test_unknown_zone_is_invalid_timezone() -> None:
    with pytest.raises(ApiError) as raised:
        zone("Mars/Olympus")
    assert (raised.value.code, raised.value.http_status) == ("invalid_timezone", 422)
