"""Catch-up planning for due cues (contract §5.2)."""

from __future__ import annotations

import datetime as dt

from cueline_server.services.schedules import plan_firing

T = dt.datetime(2026, 5, 1, 12, 0, 30, tzinfo=dt.UTC)
GRACE = dt.timedelta(seconds=60)


def plan(
    catch_up: str, next_run: dt.datetime, schedule_type: str = "recurring"
) -> tuple[list[str], str | None]:
    slots, following = plan_firing(
        schedule_type=schedule_type, cron="* * * * *", timezone="UTC", next_run=next_run,
        catch_up=catch_up, now=T, grace=GRACE,
    )  # fmt: skip
    return [s.strftime("%H:%M") for s in slots], following.strftime("%H:%M") if following else None


def test_on_time_all_policies_fire_the_current_slot() -> None:
    for policy in ("run_once_if_missed", "skip_missed", "replay_all_missed"):
        assert plan(policy, T.replace(second=0)) == (["12:00"], "12:01")


def test_after_downtime() -> None:
    three_hours_ago = T - dt.timedelta(hours=3)
    assert plan("run_once_if_missed", three_hours_ago) == (["12:00"], "12:01")
    assert plan("skip_missed", three_hours_ago) == (["12:00"], "12:01")  # 12:00 is within the grace
    replayed, following = plan("replay_all_missed", three_hours_ago)
    assert (
        len(replayed) == 100 and replayed[0] == "10:21" and replayed[-1] == "12:00" and following == "12:01"
    )


def test_skip_missed_drops_a_slot_older_than_the_grace() -> None:
    slots, following = plan_firing(
        schedule_type="recurring", cron="0 * * * *", timezone="UTC", next_run=T - dt.timedelta(hours=5),
        catch_up="skip_missed", now=T + dt.timedelta(minutes=5), grace=GRACE,
    )  # fmt: skip
    assert slots == [] and following == dt.datetime(2026, 5, 1, 13, tzinfo=dt.UTC)


def test_a_once_cue_fires_however_late() -> None:
    assert plan("skip_missed", T - dt.timedelta(days=2), schedule_type="once") == (["12:00"], None)
