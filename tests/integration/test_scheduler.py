"""The scheduler against the real server: on time, once per slot, across restarts and replicas."""

from __future__ import annotations

import datetime as dt
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest

from tests.support import Server, auth, new_database


def once_cue(client: httpx.Client, name: str, at: dt.datetime, **extra: Any) -> dict[str, Any]:
    body = {"name": name, "transport": "worker", "schedule": {"type": "once", "at": at.isoformat()}, **extra}
    response = client.post("/v1/cues", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def executions_of(client: httpx.Client, cue_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/executions?cue_id={cue_id}&limit=100").json()["executions"])


def wait_for(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def soon(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


def test_a_once_cue_fires_at_its_time_exactly_once(server: Server) -> None:
    key = server.register()
    at = soon(1.5).replace(microsecond=0) + dt.timedelta(seconds=1)
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = once_cue(client, "once", at, payload={"task": "t", "n": 1})
        assert cue["next_run"] == at.strftime("%Y-%m-%dT%H:%M:%SZ")
        fired = wait_for(lambda: executions_of(client, cue["id"]))
        time.sleep(1.5)  # a second pass must not fire again
        assert len(executions_of(client, cue["id"])) == 1
        execution = fired[0]
        assert execution["triggered_by"] == "scheduled" and execution["status"] == "pending"
        assert execution["scheduled_for"] == cue["next_run"] and execution["payload"] == {"task": "t", "n": 1}
        after = client.get(f"/v1/cues/{cue['id']}").json()
        assert after["next_run"] is None and after["fired_count"] == 1 and after["status"] == "active"


def test_a_recurring_cue_is_due_at_its_next_slot(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = client.post(
            "/v1/cues",
            json={"name": "minutely", "transport": "worker", "catch_up": "replay_all_missed",
                  "schedule": {"type": "recurring", "cron": "* * * * *"}},
        ).json()  # fmt: skip
        first = dt.datetime.fromisoformat(cue["next_run"].replace("Z", "+00:00"))
        assert first > dt.datetime.now(dt.UTC) and first.second == 0


def test_a_cron_that_runs_out_of_slots_stops_alone(server: Server) -> None:
    """croniter's year field lets a recurring cue have a last slot. After it the
    cue's next run is null, and other cues fire on as before."""
    key = server.register()
    last = soon(2.5).replace(microsecond=0)
    cron = f"{last.minute} {last.hour} {last.day} {last.month} * {last.second} {last.year}"
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        ending = client.post(
            "/v1/cues",
            json={
                "name": "last-slot",
                "transport": "worker",
                "schedule": {"type": "recurring", "cron": cron},
            },
        )
        assert ending.status_code == 201, ending.text
        assert ending.json()["next_run"] == last.strftime("%Y-%m-%dT%H:%M:%SZ")
        after = once_cue(client, "after-it", last + dt.timedelta(seconds=2))
        wait_for(lambda: executions_of(client, after["id"]))
        assert len(executions_of(client, ending.json()["id"])) == 1
        assert client.get(f"/v1/cues/{ending.json()['id']}").json()["next_run"] is None
        # A schedule with no slot left is refused where it is given.
        past = client.post(
            "/v1/cues",
            json={
                "name": "past",
                "transport": "worker",
                "schedule": {"type": "recurring", "cron": "0 0 1 1 * 0 2020"},
            },
        )
        assert past.status_code == 400 and past.json()["error"]["code"] == "invalid_schedule"


def test_paused_cues_do_not_fire(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = once_cue(client, "paused", soon(1.5))
        client.patch(f"/v1/cues/{cue['id']}", json={"status": "paused"})
        time.sleep(3)
        assert executions_of(client, cue["id"]) == []
        resumed = client.patch(f"/v1/cues/{cue['id']}", json={"status": "active"}).json()
        assert resumed["next_run"] is not None  # a once cue whose time passed fires at once on resume
        assert len(wait_for(lambda: executions_of(client, cue["id"]))) == 1


def test_catch_up_after_downtime(database_url: str) -> None:
    server = Server(database_url).start()
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = once_cue(client, "during-downtime", soon(2))
    server.stop()
    time.sleep(3)
    restarted = Server(database_url).start()
    try:
        with httpx.Client(base_url=restarted.http_url, headers=auth(key)) as client:
            assert len(wait_for(lambda: executions_of(client, cue["id"]))) == 1
            time.sleep(1.5)
            assert len(executions_of(client, cue["id"])) == 1
    finally:
        restarted.stop()


@pytest.mark.postgres
def test_three_replicas_fire_each_slot_once(postgres_admin_url: str) -> None:
    url = new_database(postgres_admin_url)
    replicas = [Server(url).start() for _ in range(3)]
    try:
        keys = [replicas[0].register() for _ in range(3)]
        at = soon(3)
        cue_ids: list[tuple[str, str]] = []
        for index, key in enumerate(keys):
            # Each account creates its cues on a different replica, so every replica is woken.
            with httpx.Client(base_url=replicas[index].http_url, headers=auth(key)) as client:
                cue_ids += [(key, once_cue(client, f"c{i}", at)["id"]) for i in range(10)]
        counts: Counter[str] = Counter()

        def all_fired() -> bool:
            counts.clear()
            for key, cue_id in cue_ids:
                with httpx.Client(base_url=replicas[0].http_url, headers=auth(key)) as client:
                    counts[cue_id] = len(executions_of(client, cue_id))
            return all(counts[c] >= 1 for _, c in cue_ids)

        wait_for(all_fired, timeout=30)
        time.sleep(2)
        all_fired()
        assert set(counts.values()) == {1}
    finally:
        for replica in replicas:
            replica.stop()


def test_preview_marks_dst_transitions(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        response = client.post(
            "/v1/schedules/preview",
            json={"schedule": {"type": "recurring", "cron": "30 2 * * *", "timezone": "Europe/Berlin"},
                  "count": 3, "after": "2026-03-27T12:00:00Z"},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        times = response.json()["fire_times"]
        assert [t["at"] for t in times] == [
            "2026-03-28T01:30:00Z",
            "2026-03-29T01:30:00Z",
            "2026-03-30T00:30:00Z",
        ]
        # 02:30 does not exist on 2026-03-29 (clocks jump to 03:00): it fires at 03:30 CEST.
        assert [t["local_time"] for t in times] == [
            "2026-03-28T02:30:00+01:00", "2026-03-29T03:30:00+02:00", "2026-03-30T02:30:00+02:00",
        ]  # fmt: skip
        assert [t["dst_transition"] for t in times] == [False, True, False]
        assert client.get("/v1/cues").json()["total"] == 0  # nothing was created
        bad = client.post("/v1/schedules/preview", json={"schedule": {"type": "recurring", "cron": "nope"}})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_schedule"


def test_many_cues_due_in_one_pass_each_fire_once(server: Server) -> None:
    key = server.register()
    at = soon(2)
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue_ids = [once_cue(client, f"same-second-{i}", at)["id"] for i in range(8)]

        def fired() -> list[int]:
            return [len(executions_of(client, cue_id)) for cue_id in cue_ids]

        wait_for(lambda: all(fired()))
        time.sleep(1)
        assert fired() == [1] * 8


# A long lead, so that the transactions opened ahead of time stay open long
# enough to look at, pause into, and crash in.
LEAD = {"CUELINE_SCHEDULER_LEAD_SECONDS": "2"}


def whole_second(seconds: float) -> dt.datetime:
    return soon(seconds).replace(microsecond=0) + dt.timedelta(seconds=1)


def parse(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def any_session(database_url: str, condition: str) -> bool:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND {condition}"
        ).fetchone()
    return row is not None and row[0] > 0


def firing_ahead(database_url: str) -> bool:
    """Whether a transaction has been open and idle, waiting to commit, for a while:
    only the scheduler's firing ahead of time holds one."""
    return any_session(
        database_url, "state = 'idle in transaction' AND xact_start < now() - interval '200 milliseconds'"
    )


def waiting_on_a_lock(database_url: str) -> bool:
    return any_session(database_url, "wait_event_type = 'Lock'")


@contextmanager
def leading_server(postgres_admin_url: str) -> Iterator[tuple[str, httpx.Client]]:
    """A server with the long lead on a fresh database: its URL, and a client of a new account."""
    url = new_database(postgres_admin_url)
    server = Server(url, env=LEAD).start()
    try:
        with httpx.Client(base_url=server.http_url, headers=auth(server.register())) as client:
            yield url, client
    finally:
        server.stop()


@pytest.mark.postgres
def test_cues_taken_ahead_commit_each_at_its_own_time(postgres_admin_url: str) -> None:
    with leading_server(postgres_admin_url) as (_, client):
        first = whole_second(2.5)
        # Within one lead of each other: one transaction takes all of a later pass's cues.
        moments = [first + dt.timedelta(seconds=n) for n in range(3)]
        for index, at in enumerate(moments):
            for n in range(3):
                once_cue(client, f"ahead-{index}-{n}", at)
        seen: dict[str, tuple[dt.datetime, dict[str, Any]]] = {}
        visible: list[list[str]] = []
        deadline = time.monotonic() + 30
        while len(seen) < 9 and time.monotonic() < deadline:
            listed = client.get("/v1/executions?limit=100").json()["executions"]
            answered = dt.datetime.now(dt.UTC)
            for execution in listed:
                seen.setdefault(execution["id"], (answered, execution))
            visible.append(sorted({e["scheduled_for"] for e in listed}))
            time.sleep(0.02)
        assert len(seen) == 9
        for answered, execution in seen.values():
            scheduled = parse(execution["scheduled_for"])
            # Neither visible nor created before its time.
            assert answered >= scheduled and parse(execution["created_at"]) >= scheduled
        # Each moment's executions became visible at once, and apart from the next moment's.
        stamps = [at.strftime("%Y-%m-%dT%H:%M:%SZ") for at in moments]
        prefixes = [stamps[:n] for n in range(4)]
        assert all(shot in prefixes for shot in visible)
        assert stamps[:1] in visible and stamps[:2] in visible


@pytest.mark.postgres
def test_a_crash_while_firing_ahead_loses_nothing(postgres_admin_url: str) -> None:
    url = new_database(postgres_admin_url)
    server = Server(url, env=LEAD).start()
    key = server.register()
    at = whole_second(3)
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = once_cue(client, "killed-before-its-time", at)
        wait_for(lambda: firing_ahead(url), timeout=10)
        assert executions_of(client, cue["id"]) == []
    server.stop(signal.SIGKILL)
    restarted = Server(url).start()
    try:
        with httpx.Client(base_url=restarted.http_url, headers=auth(key)) as client:
            fired = wait_for(lambda: executions_of(client, cue["id"]))
            assert [e["scheduled_for"] for e in fired] == [cue["next_run"]]
            time.sleep(1.5)
            assert len(executions_of(client, cue["id"])) == 1
            assert client.get(f"/v1/cues/{cue['id']}").json()["fired_count"] == 1
    finally:
        restarted.stop()


@pytest.mark.postgres
def test_a_pause_inside_the_lead_waits_for_the_firing(postgres_admin_url: str) -> None:
    with leading_server(postgres_admin_url) as (url, client):
        at = whole_second(3)
        cue = once_cue(client, "paused-too-late", at)
        wait_for(lambda: firing_ahead(url), timeout=10)
        paused = client.patch(f"/v1/cues/{cue['id']}", json={"status": "paused"})
        assert paused.status_code == 200, paused.text
        assert paused.json()["status"] == "paused"
        # The cue was already being fired: its one execution is there, at its time.
        fired = executions_of(client, cue["id"])
        assert [e["scheduled_for"] for e in fired] == [cue["next_run"]]
        assert dt.datetime.now(dt.UTC) >= at


@pytest.mark.postgres
def test_a_report_waiting_for_a_firing_holds_up_no_other_report(postgres_admin_url: str) -> None:
    """A worker report settles its cue, so a report on a cue being fired ahead
    of time waits for that firing; reports on other cues are answered meanwhile."""
    with (
        leading_server(postgres_admin_url) as (url, client),
        httpx.Client(base_url=client.base_url, headers=client.headers) as second_client,
    ):
        at = whole_second(3)
        fired = once_cue(client, "fired-ahead", at)
        other = once_cue(client, "due-later", at + dt.timedelta(hours=1))
        first, second = (client.post(f"/v1/cues/{cue['id']}/fire").json()["id"] for cue in (fired, other))
        for execution in (first, second):
            claimed = client.post(f"/v1/executions/{execution}/claim", json={"worker_id": "w"})
            assert claimed.status_code == 200, claimed.text
        wait_for(lambda: firing_ahead(url), timeout=10)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                second_client.post, f"/v1/executions/{first}/outcome", json={"success": True}
            )
            wait_for(lambda: waiting_on_a_lock(url), timeout=5)
            answered = client.post(f"/v1/executions/{second}/outcome", json={"success": True})
            assert answered.status_code == 200, answered.text
            assert firing_ahead(url) and not waiting.done()
            assert waiting.result().status_code == 200, waiting.result().text
        assert dt.datetime.now(dt.UTC) >= at
        # The cue fired at its time, then the report settled it.
        runs = executions_of(client, fired["id"])
        assert sorted(e["triggered_by"] for e in runs) == ["manual_fire", "scheduled"]
        assert client.get(f"/v1/cues/{fired['id']}").json()["status"] == "completed"
