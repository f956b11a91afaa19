"""Verification and evidence after the report, and the outcome deadline (contract §5.5)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.test_scheduler import wait_for
from tests.support import Server, auth


def reported(client: httpx.Client, mode: str | None, report: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "name": f"v-{mode}",
        "transport": "worker",
        "schedule": {"type": "recurring", "cron": "0 0 1 1 *"},
    }
    if mode:
        body["verification"] = {"mode": mode}
    cue = client.post("/v1/cues", json=body).json()
    execution = client.post(f"/v1/cues/{cue['id']}/fire").json()["id"]
    response = client.post(f"/v1/executions/{execution}/outcome", json=report)
    assert response.status_code == 200, response.text
    return execution, response.json()


def test_policies_set_the_state_at_report_time(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cases: list[tuple[str | None, dict[str, Any], str, str | None]] = [
            (None, {"success": True}, "reported_success", None),
            ("manual", {"success": True}, "verification_pending", None),
            ("require_external_id", {"success": True, "external_id": "x"}, "verified_success", None),
            (
                "require_result_url",
                {"success": True},
                "verification_failed",
                "require_result_url: result_url missing",
            ),
            (
                "require_artifacts",
                {"success": True, "artifacts": []},
                "verification_failed",
                "require_artifacts: artifacts missing",
            ),
        ]
        for mode, report, state, reason in cases:
            execution, response = reported(client, mode, report)
            assert (response["outcome_state"], response["reason"]) == (state, reason), mode
            stored = client.get(f"/v1/executions/{execution}").json()
            expected_validation = {"verified_success": "valid", "verification_failed": "invalid"}.get(state)
            assert stored["outcome"]["validation_state"] == expected_validation


def test_verify_and_pending_from_states(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        execution, _ = reported(client, None, {"success": True, "summary": "42 rows"})
        pending = client.post(f"/v1/executions/{execution}/verification-pending")
        assert pending.json() == {"execution_id": execution, "outcome_state": "verification_pending"}
        rejected = client.post(
            f"/v1/executions/{execution}/verify", json={"valid": False, "reason": "wrong day"}
        )
        assert rejected.status_code == 200 and rejected.json()["outcome_state"] == "verification_failed"
        stored = client.get(f"/v1/executions/{execution}").json()
        assert stored["outcome"]["summary"] == "42 rows | verification rejected: wrong day"
        assert stored["outcome_success"] is True  # the report itself is unchanged
        again = client.post(f"/v1/executions/{execution}/verify")
        assert again.status_code == 409 and again.json()["error"] == {
            "code": "invalid_state",
            "message": "Cannot verify from state 'verification_failed'",
            "status": 409,
        }
        assert client.post(f"/v1/executions/{execution}/verification-pending").status_code == 409

        cue = client.post(
            "/v1/cues",
            json={
                "name": "fresh",
                "transport": "worker",
                "schedule": {"type": "recurring", "cron": "0 0 1 1 *"},
            },
        ).json()
        unreported = client.post(f"/v1/cues/{cue['id']}/fire").json()["id"]
        nothing = client.post(f"/v1/executions/{unreported}/verify")
        assert (
            nothing.status_code == 409
            and nothing.json()["error"]["message"] == "Cannot verify from state 'null'"
        )
        no_outcome = client.post(f"/v1/executions/{unreported}/verification-pending")
        assert no_outcome.status_code == 409 and no_outcome.json()["error"]["code"] == "no_outcome"
        evidence = client.patch(f"/v1/executions/{unreported}/evidence", json={"external_id": "x"})
        assert evidence.status_code == 409 and evidence.json()["error"]["message"] == (
            "Report outcome first before appending evidence"
        )
        assert client.post("/v1/executions/not-a-uuid/verify").status_code == 404


def test_evidence_re_runs_a_failed_policy(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        execution, first = reported(client, "require_external_id", {"success": True})
        assert first["outcome_state"] == "verification_failed"
        added = client.patch(
            f"/v1/executions/{execution}/evidence",
            json={"external_id": "job-7", "summary": "s" * 600, "metadata": {"n": 1}},
        )
        assert added.json() == {
            "execution_id": execution,
            "outcome_state": "verified_success",
            "evidence_updated": True,
        }
        stored = client.get(f"/v1/executions/{execution}").json()["outcome"]
        assert stored["external_id"] == "job-7" and stored["validation_state"] == "valid"
        assert len(stored["summary"]) == 500 and stored["evidence_metadata"] == {"n": 1}
        too_big = client.patch(f"/v1/executions/{execution}/evidence", json={"metadata": {"x": "y" * 10_240}})
        assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "metadata_too_large"


@pytest.fixture
def deadline_server(database_url: str) -> Iterator[Server]:
    running = Server(database_url, env={"CUELINE_SCHEDULER_POLL_SECONDS": "0.2"}).start()
    yield running
    running.stop()


def test_a_missed_deadline_makes_the_outcome_unknown_and_a_late_report_is_flagged(
    deadline_server: Server,
) -> None:
    key = deadline_server.register()
    with httpx.Client(base_url=deadline_server.http_url, headers=auth(key)) as client:
        cue = client.post(
            "/v1/cues",
            json={
                "name": "slow",
                "transport": "worker",
                "delivery": {"outcome_deadline_seconds": 1},
                "schedule": {"type": "recurring", "cron": "0 0 1 1 *"},
            },
        ).json()
        execution = client.post(f"/v1/cues/{cue['id']}/fire").json()["id"]
        client.post(f"/v1/executions/{execution}/claim", json={"worker_id": "w"})
        wait_for(lambda: client.get(f"/v1/executions/{execution}").json()["outcome_state"] == "unknown")
        stored = client.get(f"/v1/executions/{execution}").json()
        assert stored["outcome_success"] is None and stored["status"] == "delivering"
        late = client.post(f"/v1/executions/{execution}/outcome", json={"success": True})
        assert late.status_code == 200 and late.json()["late"] is True
        assert late.json()["outcome_state"] == "reported_success"
        assert client.post(f"/v1/executions/{execution}/outcome", json={"success": True}).status_code == 409


def test_an_idempotent_repeat_gets_the_original_response(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = client.post(
            "/v1/cues",
            json={
                "name": "idem",
                "transport": "worker",
                "verification": {"mode": "require_result_url"},
                "schedule": {"type": "recurring", "cron": "0 0 1 1 *"},
            },
        ).json()
        execution = client.post(f"/v1/cues/{cue['id']}/fire").json()["id"]
        path = f"/v1/executions/{execution}/outcome"
        report = {"success": True, "metadata": {"n": 1}}
        first = client.post(path, json=report, headers={"Idempotency-Key": "attempt-1"})
        assert first.status_code == 200 and first.json()["reason"] == "require_result_url: result_url missing"
        client.patch(f"/v1/executions/{execution}/evidence", json={"result_url": "https://r.example/1"})
        repeat = client.post(path, json=report, headers={"Idempotency-Key": "attempt-1"})
        assert repeat.status_code == 200 and repeat.json() == first.json()  # the original, not today's state
        changed = client.post(path, json={"success": False}, headers={"Idempotency-Key": "attempt-1"})
        assert changed.status_code == 409 and changed.json()["error"]["code"] == "idempotency_key_conflict"
        other_key = client.post(path, json=report, headers={"Idempotency-Key": "attempt-2"})
        assert (
            other_key.status_code == 409 and other_key.json()["error"]["code"] == "outcome_already_recorded"
        )
        assert client.post(path, json=report).status_code == 409
