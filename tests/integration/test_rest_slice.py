"""The vertical slice over REST: register -> create -> fire -> outcome, with the documented shapes."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx

from tests.integration.test_scheduler import wait_for
from tests.support import Server, auth

CUE_FIELDS = {
    "id",
    "name",
    "description",
    "status",
    "transport",
    "schedule",
    "callback",
    "payload",
    "retry",
    "next_run",
    "last_run",
    "run_count",
    "fired_count",
    "on_failure",
    "verification",
    "delivery",
    "alerts",
    "catch_up",
    "warning",
    "created_at",
    "updated_at",
}
EXECUTION_FIELDS = {
    "id",
    "cue_id",
    "scheduled_for",
    "status",
    "triggered_by",
    "replayed_from",
    "payload",
    "http_status",
    "response_body",
    "attempts",
    "error_message",
    "next_retry",
    "started_at",
    "delivered_at",
    "last_attempt_at",
    "claimed_by_worker",
    "claimed_at",
    "last_heartbeat_at",
    "outcome_success",
    "outcome_state",
    "outcome_deadline_at",
    "created_at",
    "updated_at",
    "outcome",
}


def worker_cue(client: httpx.Client, key: str, name: str = "nightly", **extra: Any) -> dict[str, Any]:
    body = {
        "name": name,
        "transport": "worker",
        "schedule": {"type": "recurring", "cron": "0 3 * * *", "timezone": "Europe/Berlin"},
        "payload": {"task": "report", "big": 12345678901234567890, "ratio": 0.5, "text": "grüße"},
        **extra,
    }
    response = client.post("/v1/cues", json=body, headers=auth(key))
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_register_create_fire_outcome_and_write_once(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url) as client:
        cue = worker_cue(client, key)
        assert set(cue) == CUE_FIELDS
        assert cue["id"].startswith("cue_") and len(cue["id"]) == 16
        assert cue["status"] == "active"
        assert cue["callback"] == {"url": None, "method": "POST", "headers": {}}
        assert cue["payload"]["big"] == 12345678901234567890  # no float rounding
        assert cue["retry"] == {"max_attempts": 3, "backoff_minutes": [1, 5, 15]}
        assert cue["warning"] == "No active workers found. Start a cueapi-worker to process this cue."
        # 03:00 in Berlin is 02:00 UTC in winter.
        assert cue["next_run"].endswith("T02:00:00Z")

        fired = client.post(f"/v1/cues/{cue['id']}/fire", headers=auth(key))
        assert fired.status_code == 200, fired.text
        execution = fired.json()
        assert execution["status"] == "pending" and execution["triggered_by"] == "manual_fire"
        assert execution["cue_id"] == cue["id"]

        path = f"/v1/executions/{execution['id']}/outcome"
        first = client.post(
            path, json={"success": True, "result": "done", "metadata": {"rows": 142}}, headers=auth(key)
        )
        assert first.status_code == 200, first.text
        assert first.json() == {
            "execution_id": execution["id"],
            "outcome_recorded": True,
            "outcome_state": "reported_success",
            "reason": None,
            "late": False,
        }
        second = client.post(path, json={"success": False}, headers=auth(key))
        assert second.status_code == 409
        assert second.json() == {
            "error": {
                "code": "outcome_already_recorded",
                "message": "Outcome has already been recorded for this execution",
                "status": 409,
            }
        }

        stored = client.get(f"/v1/executions/{execution['id']}", headers=auth(key)).json()
        assert set(stored) == EXECUTION_FIELDS
        assert stored["outcome_success"] is True and stored["outcome_state"] == "reported_success"
        assert stored["status"] == "success"  # worker transport: the report completes the execution
        assert stored["outcome"]["success"] is True and stored["outcome"]["result"] == "done"
        assert stored["outcome"]["metadata"] == {"rows": 142}  # an integer stays an integer
        assert stored["payload"]["big"] == 12345678901234567890

        detail = client.get(f"/v1/cues/{cue['id']}", headers=auth(key)).json()
        assert detail["fired_count"] == 1 and detail["execution_total"] == 1
        assert [e["id"] for e in detail["executions"]] == [execution["id"]]
        assert {"execution_limit", "execution_offset"} <= set(detail)


def test_responses_carry_request_ids_and_json(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url) as client:
        ids = set()
        for path in ("/v1/cues", "/v1/nowhere", "/v1/auth/me"):
            response = client.get(path, headers=auth(key))
            assert response.headers["content-type"] == "application/json"
            ids.add(response.headers["x-request-id"])
        assert len(ids) == 3


def test_list_pages_and_filters(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url) as client:
        created = [worker_cue(client, key, name=f"cue-{i}")["id"] for i in range(3)]
        client.patch(f"/v1/cues/{created[0]}", json={"status": "paused"}, headers=auth(key))
        page = client.get("/v1/cues?limit=2&offset=0", headers=auth(key)).json()
        assert page["total"] == 3 and page["limit"] == 2 and page["offset"] == 0
        assert [c["id"] for c in page["cues"]] == created[::-1][:2]  # newest first
        beyond = client.get("/v1/cues?offset=10", headers=auth(key)).json()
        assert beyond["cues"] == [] and beyond["total"] == 3
        paused = client.get("/v1/cues?status=paused", headers=auth(key)).json()
        assert [c["id"] for c in paused["cues"]] == [created[0]]

        for cue_id in created:
            client.post(f"/v1/cues/{cue_id}/fire", headers=auth(key))
        listed = client.get(f"/v1/executions?cue_id={created[1]}", headers=auth(key)).json()
        assert listed["total"] == 1 and listed["has_more"] is False and listed["oldest_claimed_at"] is None
        everything = client.get("/v1/executions?limit=2", headers=auth(key)).json()
        assert everything["total"] == 3 and everything["has_more"] is True


def test_update_merges_and_recomputes(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url) as client:
        cue = worker_cue(client, key, retry={"max_attempts": 4, "backoff_minutes": [2]})
        path = f"/v1/cues/{cue['id']}"
        paused = client.patch(path, json={"status": "paused"}, headers=auth(key)).json()
        assert paused["status"] == "paused" and paused["next_run"] is None
        merged = client.patch(path, json={"retry": {"max_attempts": 6}}, headers=auth(key)).json()
        assert merged["retry"] == {"max_attempts": 6, "backoff_minutes": [2]}
        moved = client.patch(
            path,
            json={"status": "active", "schedule": {"type": "recurring", "cron": "30 12 * * *"}},
            headers=auth(key),
        ).json()
        assert moved["schedule"]["timezone"] == "Europe/Berlin"  # an omitted timezone is kept
        assert moved["status"] == "active" and moved["next_run"] is not None
        next_run = dt.datetime.fromisoformat(moved["next_run"].replace("Z", "+00:00"))
        assert next_run.astimezone(dt.timezone(dt.timedelta(hours=1))).hour == 12  # CET in November
        assert client.patch(path, json={}, headers=auth(key)).json()["updated_at"] == moved["updated_at"]


def test_delete_frees_the_name_and_hides_executions(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url) as client:
        cue = worker_cue(client, key, name="reused")
        execution = client.post(f"/v1/cues/{cue['id']}/fire", headers=auth(key)).json()
        deleted = client.delete(f"/v1/cues/{cue['id']}", headers=auth(key))
        assert deleted.status_code == 204 and deleted.content == b""
        assert client.get(f"/v1/executions/{execution['id']}", headers=auth(key)).status_code == 404
        assert client.delete(f"/v1/cues/{cue['id']}", headers=auth(key)).status_code == 404
        worker_cue(client, key, name="reused")


def test_fire_payload_override_and_send_at(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url) as client:
        cue = worker_cue(client, key)
        later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).replace(microsecond=0)
        merged = client.post(
            f"/v1/cues/{cue['id']}/fire",
            json={"payload_override": {"region": "eu"}, "send_at": later.isoformat()},
            headers=auth(key),
        ).json()
        assert merged["scheduled_for"] == later.strftime("%Y-%m-%dT%H:%M:%SZ")
        stored = client.get(f"/v1/executions/{merged['id']}", headers=auth(key)).json()
        assert stored["payload"]["region"] == "eu" and stored["payload"]["task"] == "report"
        replaced = client.post(
            f"/v1/cues/{cue['id']}/fire",
            json={"payload_override": {"only": 1}, "merge_strategy": "replace"},
            headers=auth(key),
        ).json()
        assert client.get(f"/v1/executions/{replaced['id']}", headers=auth(key)).json()["payload"] == {
            "only": 1
        }


def test_accounts_are_isolated(server: Server) -> None:
    owner, stranger = server.register(), server.register()
    with httpx.Client(base_url=server.http_url) as client:
        cue = worker_cue(client, owner)
        execution = client.post(f"/v1/cues/{cue['id']}/fire", headers=auth(owner)).json()
        assert client.get(f"/v1/cues/{cue['id']}", headers=auth(stranger)).status_code == 404
        assert client.get(f"/v1/executions/{execution['id']}", headers=auth(stranger)).status_code == 404
        outcome = client.post(
            f"/v1/executions/{execution['id']}/outcome", json={"success": True}, headers=auth(stranger)
        )
        assert outcome.status_code == 404
        assert client.get("/v1/cues", headers=auth(stranger)).json()["total"] == 0
        # The stranger's failed attempt did not consume the write-once slot.
        mine = client.post(
            f"/v1/executions/{execution['id']}/outcome", json={"success": True}, headers=auth(owner)
        )
        assert mine.status_code == 200


def test_workers_heartbeat_list_delete(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url) as client:
        beat = client.post(
            "/v1/worker/heartbeat", json={"worker_id": "box/7", "handlers": ["report"]}, headers=auth(key)
        )
        assert beat.status_code == 200 and beat.json()["acknowledged"] is True
        workers = client.get("/v1/workers", headers=auth(key)).json()["workers"]
        assert [(w["worker_id"], w["heartbeat_status"], w["handlers"]) for w in workers] == [
            ("box/7", "active", ["report"])
        ]
        assert worker_cue(client, key)["warning"] is None  # a live worker exists now
        assert client.delete("/v1/workers/box%2F7", headers=auth(key)).status_code == 204
        missing = client.delete("/v1/workers/box%2F7", headers=auth(key))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "worker_not_found"


def test_account_summary(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url) as client:
        worker_cue(client, key)
        me = client.get("/v1/auth/me", headers=auth(key)).json()
        assert me["plan"] == "free" and me["active_cues"] == 1 and me["active_cue_limit"] == 10
        assert me["api_key_prefix"] == key[:12] and me["has_webhook_secret"] is True
        duplicate = client.post("/v1/auth/register", json={"email": me["email"].upper()})
        assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "duplicate_email"


def test_probes_and_openapi(server: Server) -> None:
    with httpx.Client(base_url=server.http_url) as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "SERVING"}
        spec = client.get("/openapi.json").json()
        assert (
            spec["paths"]["/v1/executions/{execution_id}/outcome"]["post"]["operationId"] == "RecordOutcome"
        )
        assert "201" in spec["paths"]["/v1/cues"]["post"]["responses"]
        assert "204" in spec["paths"]["/v1/cues/{cue_id}"]["delete"]["responses"]


def test_health_and_status_probes(server: Server) -> None:
    with httpx.Client(base_url=server.http_url) as client:

        def after_first_pass() -> httpx.Response | None:  # the scheduler is "unknown" until then
            response = client.get("/health")
            return None if response.json()["services"]["scheduler"] == "unknown" else response

        health = wait_for(after_first_pass, timeout=10)
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "healthy" and body["services"] == {"database": "ok", "scheduler": "ok"}
        assert set(body["queue"]) == {
            "pending_webhook_deliveries",
            "pending_retries",
            "pending_worker_claims",
            "stale_executions",
        }
        assert all(isinstance(v, int) for v in body["queue"].values())
        status = client.get("/status")
        assert status.status_code == 200 and status.json() == {"status": "healthy", "reason": None}

        # The counts are read at most once a second, whoever asks: new work shows within a few.
        before = body["queue"]["pending_worker_claims"]
        key = server.register()
        cue = worker_cue(client, key)
        for _ in range(2):
            assert client.post(f"/v1/cues/{cue['id']}/fire", headers=auth(key)).status_code == 200
        wait_for(
            lambda: client.get("/health").json()["queue"]["pending_worker_claims"] >= before + 2, timeout=10
        )
