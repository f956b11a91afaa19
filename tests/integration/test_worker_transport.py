"""The worker transport (contract §5.6) against the real server."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cueline_server.services.identifiers import hash_api_key
from cueline_server.store.database import Database
from cueline_server.store.repositories import claim_next_sqlite
from tests.integration.test_scheduler import wait_for
from tests.support import Server, auth

FAST = {
    "CUELINE_WORKER_CLAIM_LEASE_SECONDS": "2",
    "CUELINE_WORKER_HEARTBEAT_TIMEOUT_SECONDS": "1",
    "CUELINE_WORKER_UNCLAIMED_TIMEOUT_SECONDS": "3",
    "CUELINE_SCHEDULER_POLL_SECONDS": "0.2",
}


@pytest.fixture
def fast_server(database_url: str) -> Iterator[Server]:
    """A server with second-scale leases and timeouts, on a fresh database."""
    running = Server(database_url, env=FAST).start()
    yield running
    running.stop()


def worker_cue(client: httpx.Client, name: str = "w", task: str = "report", **extra: Any) -> dict[str, Any]:
    body = {"name": name, "transport": "worker", "payload": {"task": task},
            "schedule": {"type": "recurring", "cron": "0 0 1 1 *"}, **extra}  # fmt: skip
    response = client.post("/v1/cues", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def fire(client: httpx.Client, cue_id: str, **body: Any) -> str:
    response = client.post(f"/v1/cues/{cue_id}/fire", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def test_concurrent_claimable_lists_each_get_their_own_page(server: Server) -> None:
    """Concurrent lists of one account share reads and responses; those of
    another account or another limit never get them."""
    keys = [server.register() for _ in range(2)]
    fired: list[list[str]] = []
    for key in keys:
        with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
            cue = worker_cue(client)
            fired.append([fire(client, cue["id"]) for _ in range(3)])

    async def lists(key: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.http_url, headers=auth(key)) as client:
            return await asyncio.gather(
                *(client.get("/v1/executions/claimable", params={"limit": 1 + i % 3}) for i in range(24))
            )

    async def all_lists() -> list[list[httpx.Response]]:
        return await asyncio.gather(*(lists(key) for key in keys))

    for mine, responses in zip(fired, asyncio.run(all_lists()), strict=True):
        for i, response in enumerate(responses):
            assert response.status_code == 200, response.text
            assert [item["execution_id"] for item in response.json()["executions"]] == mine[: 1 + i % 3]


def test_claimable_claim_heartbeat_report(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = worker_cue(client)
        other = worker_cue(client, name="other", task="other")
        first, second = fire(client, cue["id"]), fire(client, cue["id"])
        fire(client, other["id"])
        later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
        fire(client, cue["id"], send_at=later)  # not claimable before its time

        listed = client.get("/v1/executions/claimable?task=report").json()["executions"]
        assert [i["execution_id"] for i in listed] == [first, second]
        assert listed[0] == {
            "execution_id": first, "cue_id": cue["id"], "cue_name": "w", "task": "report",
            "scheduled_for": listed[0]["scheduled_for"], "payload": {"task": "report"}, "attempt": 0,
        }  # fmt: skip
        assert len(client.get("/v1/executions/claimable").json()["executions"]) == 3
        # A listed item is never shown stale: renamed, the cue's items carry the new name.
        assert client.patch(f"/v1/cues/{cue['id']}", json={"name": "renamed"}).status_code == 200
        listed = client.get("/v1/executions/claimable?task=report").json()["executions"]
        assert [item["cue_name"] for item in listed] == ["renamed", "renamed"]

        claim = client.post(f"/v1/executions/{first}/claim", json={"worker_id": "box-1"})
        assert claim.status_code == 200, claim.text
        granted = claim.json()
        assert granted["claimed"] is True and granted["execution_id"] == first
        assert granted["lease_seconds"] == 900 and granted["attempts"] == 1 and granted["task"] == "report"
        again = client.post(f"/v1/executions/{first}/claim", json={"worker_id": "box-2"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "claim_failed"

        beat = client.post(f"/v1/executions/{first}/heartbeat", headers={"X-Worker-Id": "box-1"})
        assert beat.status_code == 200 and beat.json()["acknowledged"] is True
        stranger = client.post(f"/v1/executions/{first}/heartbeat", headers={"X-Worker-Id": "box-2"})
        assert stranger.status_code == 403 and stranger.json()["error"]["code"] == "not_execution_owner"
        idle = client.post(f"/v1/executions/{second}/heartbeat")
        assert idle.status_code == 409 and idle.json()["error"]["code"] == "execution_not_claiming"

        stored = client.get(f"/v1/executions/{first}").json()
        assert stored["status"] == "delivering" and stored["claimed_by_worker"] == "box-1"
        assert stored["outcome_deadline_at"] is not None and stored["last_heartbeat_at"] is not None

        report = client.post(f"/v1/executions/{first}/outcome", json={"success": True})
        assert report.status_code == 200
        done = client.get(f"/v1/cues/{cue['id']}").json()
        assert done["run_count"] == 1 and done["last_run"] is not None
        assert client.get(f"/v1/executions/{first}").json()["status"] == "success"


def test_claim_edge_cases(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        webhook = client.post(
            "/v1/cues",
            json={"name": "hook", "callback": {"url": "https://hooks.example.com/x"},
                  "schedule": {"type": "recurring", "cron": "0 0 1 1 *"}},
        ).json()  # fmt: skip
        hooked = fire(client, webhook["id"])
        assert client.post(f"/v1/executions/{hooked}/claim", json={"worker_id": "w"}).status_code == 409
        assert client.post("/v1/executions/not-a-uuid/claim", json={"worker_id": "w"}).status_code == 404
        missing = client.post(f"/v1/executions/{hooked}/claim", json={})
        assert (
            missing.status_code == 422 and missing.json()["error"]["details"][0]["field"] == "body.worker_id"
        )
        empty = client.post("/v1/executions/claim", json={"worker_id": "w"})
        assert (
            empty.status_code == 409
            and empty.json()["error"]["message"] == "No executions available for claiming"
        )


def test_work_is_listed_and_claimed_oldest_first(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = worker_cue(client)
        oldest_first = [fire(client, cue["id"]) for _ in range(3)]  # a fire is scheduled for now
        listed = client.get("/v1/executions/claimable").json()["executions"]
        assert [i["execution_id"] for i in listed] == oldest_first
        page = client.get("/v1/executions/claimable?limit=2").json()["executions"]
        assert [i["execution_id"] for i in page] == oldest_first[:2]
        claimed = [
            client.post("/v1/executions/claim", json={"worker_id": "w"}).json()["execution_id"]
            for _ in oldest_first
        ]
        assert claimed == oldest_first


def test_claim_next_hands_out_each_execution_once(server: Server) -> None:
    """Concurrent claim-next calls share statements (one per account and task):
    each execution goes to one caller, whose worker id its claim records, and
    no account's call gets another account's execution."""
    keys = [server.register(), server.register()]
    created: list[set[str]] = []
    for key in keys:
        with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
            cue = worker_cue(client)
            created.append({fire(client, cue["id"]) for _ in range(30)})
    got: list[dict[str, list[str]]] = [{}, {}]
    conflicts: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(12)

    def worker(account: int, index: int) -> None:
        name = f"a{account}w{index}"
        with httpx.Client(base_url=server.http_url, headers=auth(keys[account])) as client:
            start.wait(10)
            while True:
                response = client.post("/v1/executions/claim", json={"worker_id": name, "task": "report"})
                if response.status_code == 409:
                    with lock:
                        conflicts.append(name)
                    return
                assert response.status_code == 200, response.text
                with lock:
                    got[account].setdefault(response.json()["execution_id"], []).append(name)

    threads = [threading.Thread(target=worker, args=(i % 2, i)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(conflicts) == 12  # each worker stopped only when nothing was left
    for account, key in enumerate(keys):
        # every one claimed, none twice, and only by the account's own workers
        assert set(got[account]) == created[account]
        assert all(len(names) == 1 for names in got[account].values())
        with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
            for execution, (name,) in got[account].items():
                stored = client.get(f"/v1/executions/{execution}").json()
                assert (stored["status"], stored["claimed_by_worker"]) == ("delivering", name)


def test_a_shared_claim_next_statement_gives_the_oldest_to_the_first_worker(server: Server) -> None:
    """Claim-next calls that share a statement are paired with the queue in
    order: the i-th worker named gets the i-th oldest, and a worker beyond the
    claimable ones gets nothing."""
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = worker_cue(client)
        oldest_first = [fire(client, cue["id"]) for _ in range(3)]

    async def claim(workers: list[str]) -> list[str]:
        db = Database(server.database_url)
        try:
            async with db.reader() as repos:
                account = await repos.accounts.by_key_hash(hash_api_key(key))
            assert account is not None
            moment = dt.datetime.now(dt.UTC)
            claim = (account.id, workers, moment, dt.timedelta(minutes=5), moment - dt.timedelta(minutes=3))
            if db.backend == "sqlite":
                rows = await db.sqlite_write(lambda conn: claim_next_sqlite(conn, *claim))
            else:
                async with db.single_statement() as repos:
                    rows = await repos.claims.claim_next(*claim)
            return [str(row.id) for row in rows]
        finally:
            await db.dispose()

    workers = ["first", "second", "third", "fourth"]
    assert asyncio.run(claim(workers)) == oldest_first
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        holders = [client.get(f"/v1/executions/{e}").json()["claimed_by_worker"] for e in oldest_first]
    assert holders == workers[:3]


def test_racing_claims_by_id_have_one_winner_each(server: Server) -> None:
    """The CueAPI worker daemon's cycle: every worker lists the same page and
    claims it in order, so concurrent claims name the same executions. Each
    execution goes to exactly one worker, its claim records that worker, and
    every other claim of it is a 409."""
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = worker_cue(client)
        created = {fire(client, cue["id"]) for _ in range(30)}
        # Another account's claim of one of them is refused like a lost race.
        other = httpx.Client(base_url=server.http_url, headers=auth(server.register()))
        with other:
            stranger = other.post(f"/v1/executions/{min(created)}/claim", json={"worker_id": "x"})
            assert stranger.status_code == 409, stranger.text
    won: dict[str, list[str]] = {}
    lost: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(index: int) -> None:
        name = f"w{index}"
        with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
            listed = [
                item["execution_id"] for item in client.get("/v1/executions/claimable").json()["executions"]
            ]
            start.wait(10)
            for execution in listed:
                response = client.post(f"/v1/executions/{execution}/claim", json={"worker_id": name})
                with lock:
                    if response.status_code == 200:
                        assert response.json()["execution_id"] == execution
                        won.setdefault(execution, []).append(name)
                    else:
                        assert response.status_code == 409, response.text
                        assert response.json()["error"]["code"] == "claim_failed"
                        lost[execution] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(won) == created and all(len(names) == 1 for names in won.values())
    assert all(lost[execution] == 7 for execution in created)
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        for execution, (name,) in won.items():
            stored = client.get(f"/v1/executions/{execution}").json()
            assert (stored["status"], stored["claimed_by_worker"], stored["attempts"]) == (
                "delivering",
                name,
                1,
            )


def test_a_silent_workers_expired_lease_is_recovered(fast_server: Server) -> None:
    key = fast_server.register()
    with httpx.Client(base_url=fast_server.http_url, headers=auth(key)) as client:
        cue = worker_cue(client, retry={"max_attempts": 2})
        execution = fire(client, cue["id"])
        client.post("/v1/worker/heartbeat", json={"worker_id": "crashy"})
        assert (
            client.post(f"/v1/executions/{execution}/claim", json={"worker_id": "crashy"}).status_code == 200
        )
        # The worker dies: no more heartbeats. After the lease and the silence window it is claimable again.
        recovered = wait_for(lambda: client.get(f"/v1/executions/{execution}").json()["status"] == "pending")
        assert recovered
        stored = client.get(f"/v1/executions/{execution}").json()
        assert stored["attempts"] == 1 and stored["claimed_by_worker"] is None
        assert stored["error_message"] == "Reset: claim lease expired and worker heartbeat stale"
        # The second claim uses the last attempt; when that lease expires too, the execution fails.
        assert (
            client.post(f"/v1/executions/{execution}/claim", json={"worker_id": "crashy"}).status_code == 200
        )
        wait_for(lambda: client.get(f"/v1/executions/{execution}").json()["status"] == "failed")
        assert client.get(f"/v1/executions/{execution}").json()["error_message"] == (
            "Claim lease expired; max attempts exhausted"
        )


def test_a_live_worker_keeps_its_claim_past_the_lease(fast_server: Server) -> None:
    key = fast_server.register()
    with httpx.Client(base_url=fast_server.http_url, headers=auth(key)) as client:
        execution = fire(client, worker_cue(client)["id"])
        client.post("/v1/worker/heartbeat", json={"worker_id": "steady"})
        client.post(f"/v1/executions/{execution}/claim", json={"worker_id": "steady"})
        for _ in range(8):  # 4 s: twice the lease, with worker heartbeats only
            client.post("/v1/worker/heartbeat", json={"worker_id": "steady"})
            time.sleep(0.5)
        stored = client.get(f"/v1/executions/{execution}").json()
        assert stored["status"] == "delivering" and stored["claimed_by_worker"] == "steady"
        assert client.post(f"/v1/executions/{execution}/outcome", json={"success": True}).status_code == 200


def test_unclaimed_work_is_missed_and_a_once_cue_fails(fast_server: Server) -> None:
    key = fast_server.register()
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    with httpx.Client(base_url=fast_server.http_url, headers=auth(key)) as client:
        cue = client.post(
            "/v1/cues",
            json={
                "name": "nobody",
                "transport": "worker",
                "schedule": {"type": "once", "at": at.isoformat()},
            },
        ).json()
        executions = wait_for(
            lambda: client.get(f"/v1/executions?cue_id={cue['id']}&status=missed").json()["executions"]
        )
        assert executions[0]["error_message"] == "No worker claimed this execution within timeout window"
        after = client.get(f"/v1/cues/{cue['id']}").json()
        assert after["status"] == "failed" and after["next_run"] is None


def test_a_once_cue_completes_when_its_execution_succeeds(fast_server: Server) -> None:
    key = fast_server.register()
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    with httpx.Client(base_url=fast_server.http_url, headers=auth(key)) as client:
        cue = client.post(
            "/v1/cues",
            json={"name": "once", "transport": "worker", "payload": {"task": "t"},
                  "schedule": {"type": "once", "at": at.isoformat()}},
        ).json()  # fmt: skip
        claimed = wait_for(
            lambda: client.post("/v1/executions/claim", json={"worker_id": "w"}).json().get("claimed")
        )
        assert claimed
        execution = client.get(f"/v1/executions?cue_id={cue['id']}").json()["executions"][0]["id"]
        client.post(f"/v1/executions/{execution}/outcome", json={"success": True})
        after = client.get(f"/v1/cues/{cue['id']}").json()
        assert after["status"] == "completed" and after["run_count"] == 1


def test_replay(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = worker_cue(client)
        original = fire(client, cue["id"], payload_override={"extra": 1})
        in_flight = client.post(f"/v1/executions/{original}/replay")
        assert in_flight.status_code == 409 and in_flight.json()["error"]["code"] == "execution_in_flight"
        client.post(f"/v1/executions/{original}/outcome", json={"success": False, "error": "nope"})
        replay = client.post(f"/v1/executions/{original}/replay")
        assert replay.status_code == 200, replay.text
        body = replay.json()
        assert (
            body["triggered_by"] == "replay"
            and body["replayed_from"] == original
            and body["status"] == "pending"
        )
        copy = client.get(f"/v1/executions/{body['id']}").json()
        assert copy["payload"] == {"task": "report", "extra": 1} and copy["replayed_from"] == original
        assert client.get(f"/v1/cues/{cue['id']}").json()["fired_count"] == 2


def test_fire_idempotency(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = worker_cue(client)
        body = {"idempotency_key": "nightly-2026-03-13", "payload_override": {"day": 13}}
        first = client.post(f"/v1/cues/{cue['id']}/fire", json=body)
        repeat = client.post(f"/v1/cues/{cue['id']}/fire", json=body)
        assert first.status_code == repeat.status_code == 200 and first.json() == repeat.json()
        changed = client.post(f"/v1/cues/{cue['id']}/fire", json={**body, "payload_override": {"day": 14}})
        assert changed.status_code == 409 and changed.json()["error"]["code"] == "idempotency_key_conflict"
        assert client.get(f"/v1/cues/{cue['id']}").json()["fired_count"] == 1
        other_cue = worker_cue(client, name="second")
        assert client.post(f"/v1/cues/{other_cue['id']}/fire", json=body).json()["id"] != first.json()["id"]


def test_concurrent_first_uses_of_a_fire_key_create_one_execution(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = worker_cue(client)
    ids: list[str] = []
    start = threading.Barrier(8)

    def fire_once() -> None:
        with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
            start.wait()
            response = client.post(f"/v1/cues/{cue['id']}/fire", json={"idempotency_key": "k"})
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])

    threads = [threading.Thread(target=fire_once) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(ids) == 8 and len(set(ids)) == 1
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        assert client.get(f"/v1/executions?cue_id={cue['id']}").json()["total"] == 1


def test_execution_list_filters(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = worker_cue(client)
        done, failed, waiting = (fire(client, cue["id"]) for _ in range(3))
        client.post(f"/v1/executions/{done}/claim", json={"worker_id": "box-1"})
        client.post(
            f"/v1/executions/{done}/outcome",
            json={"success": True, "external_id": "e", "result_type": "report"},
        )
        client.post(f"/v1/executions/{failed}/outcome", json={"success": False})

        def ids(query: str) -> set[str]:
            response = client.get(f"/v1/executions?{query}")
            assert response.status_code == 200, response.text
            return {e["id"] for e in response.json()["executions"]}

        assert ids("status__in=success,failed") == {done, failed}
        assert ids("status=pending") == {waiting}
        assert ids("worker_id=box-1") == {done}
        assert ids("outcome_state=reported_failure") == {failed}
        assert ids("triggered_by=manual_fire") == {done, failed, waiting}
        assert ids("has_evidence=true") == {done} and ids("has_evidence=false") == {failed, waiting}
        assert ids("result_type=report") == {done}
        # Past the last page: no rows, and still the filtered set's summary.
        beyond = client.get("/v1/executions?worker_id=box-1&offset=5").json()
        assert beyond["executions"] == [] and beyond["total"] == 1 and beyond["has_more"] is False
        claimed = client.get(f"/v1/executions/{done}").json()["claimed_at"]
        assert claimed is not None and beyond["oldest_claimed_at"] == claimed
        for query, status, code in [
            ("status=pending&status__in=failed", 400, "conflicting_filters"),
            ("status__in=failed,asleep", 400, "invalid_status_in"),
            ("status__in=", 400, "invalid_status_in"),
            ("outcome_state=great", 422, "validation_error"),
            ("triggered_by=magic", 422, "validation_error"),
        ]:
            response = client.get(f"/v1/executions?{query}")
            assert response.status_code == status and response.json()["error"]["code"] == code, query
