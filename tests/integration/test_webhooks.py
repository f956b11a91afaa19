"""Webhook delivery (contract §5.7-5.10) to a real local receiver."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.test_scheduler import wait_for
from tests.support import Receiver, Server, auth, signed

LOCAL = {
    "CUELINE_ALLOW_PRIVATE_CALLBACKS": "true",
    "CUELINE_ALLOW_HTTP_CALLBACKS": "true",
    "CUELINE_SCHEDULER_POLL_SECONDS": "0.2",
}


@pytest.fixture
def hooks(database_url: str) -> Iterator[tuple[Server, Receiver]]:
    receiver = Receiver()
    server = Server(database_url, env=LOCAL).start()
    yield server, receiver
    server.stop()
    receiver.close()


def webhook_cue(client: httpx.Client, url: str, **extra: Any) -> dict[str, Any]:
    body = {
        "name": extra.pop("name", "hook"),
        "callback": {"url": url},
        "payload": {"n": 12345678901234567890},
        "schedule": {"type": "recurring", "cron": "0 0 1 1 *"},
        **extra,
    }
    response = client.post("/v1/cues", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def execution(client: httpx.Client, execution_id: str) -> dict[str, Any]:
    return dict(client.get(f"/v1/executions/{execution_id}").json())


def test_signed_delivery_and_response_body_outcome(hooks: tuple[Server, Receiver]) -> None:
    server, receiver = hooks
    key = server.register()
    receiver.script["/hook"] = [
        (200, b'{"success": false, "error": "disk full", "external_id": "job-9"}', 0.0)
    ]
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        secret = client.get("/v1/auth/webhook-secret").json()["webhook_secret"]
        assert secret.startswith("whsec_") and len(secret) == 70
        cue = webhook_cue(
            client,
            receiver.url("/hook"),
            callback={"url": receiver.url("/hook"), "headers": {"X-Team": "ops"}},
        )
        fired = client.post(f"/v1/cues/{cue['id']}/fire").json()
        done = wait_for(lambda: execution(client, fired["id"])["outcome"])
        assert done

        [request] = receiver.to("/hook")
        headers = {k.lower(): v for k, v in request.headers.items()}
        assert signed(secret, headers, request.body)
        assert headers["x-cueapi-execution-id"] == fired["id"] and headers["x-cueapi-attempt"] == "1"
        assert headers["x-cueapi-cue-id"] == cue["id"] and headers["x-team"] == "ops"
        envelope = json.loads(request.body)
        assert envelope == {
            "attempt": 1, "cue_id": cue["id"], "execution_id": fired["id"], "name": "hook",
            "payload": {"n": 12345678901234567890}, "scheduled_for": fired["scheduled_for"],
        }  # fmt: skip
        assert request.body == json.dumps(envelope, sort_keys=True).encode()  # Python's default separators

        stored = execution(client, fired["id"])
        assert stored["status"] == "success" and stored["http_status"] == 200 and stored["attempts"] == 1
        assert stored["outcome_state"] == "reported_failure" and stored["outcome"]["external_id"] == "job-9"
        assert client.get(f"/v1/cues/{cue['id']}").json()["run_count"] == 1


def test_retries_then_success(hooks: tuple[Server, Receiver]) -> None:
    server, receiver = hooks
    key = server.register()
    receiver.script["/flaky"] = [(500, b"oops", 0.0), (503, b"", 0.0)]
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = webhook_cue(client, receiver.url("/flaky"), retry={"max_attempts": 3, "backoff_minutes": [0]})
        fired = client.post(f"/v1/cues/{cue['id']}/fire").json()
        wait_for(lambda: execution(client, fired["id"])["status"] == "success")
        attempts = [r.headers["X-CueAPI-Attempt"] for r in receiver.to("/flaky")]
        assert attempts == ["1", "2", "3"]
        stored = execution(client, fired["id"])
        assert stored["attempts"] == 3 and stored["error_message"] is None and stored["outcome"] is None


def test_final_failure_runs_on_failure(hooks: tuple[Server, Receiver]) -> None:
    server, receiver = hooks
    key = server.register()
    receiver.script["/down"] = [(302, b"", 0.0), (404, b"", 0.0)]
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        secret = client.get("/v1/auth/webhook-secret").json()["webhook_secret"]
        cue = webhook_cue(
            client, receiver.url("/down"), retry={"max_attempts": 2, "backoff_minutes": [0]},
            on_failure={"webhook": receiver.url("/alarm"), "pause": True},
        )  # fmt: skip
        fired = client.post(f"/v1/cues/{cue['id']}/fire").json()
        wait_for(lambda: execution(client, fired["id"])["status"] == "failed")
        stored = execution(client, fired["id"])
        assert stored["error_message"] == "Webhook endpoint not found (404)" and stored["attempts"] == 2
        assert len(receiver.to("/elsewhere")) == 0  # the 302 was not followed
        [notice] = wait_for(lambda: receiver.to("/alarm"))
        event = json.loads(notice.body)
        assert (
            event["event"] == "cue.failed" and event["execution_id"] == fired["id"] and event["attempts"] == 2
        )
        assert event["last_http_status"] == 404
        assert signed(secret, notice.headers, notice.body)
        after = client.get(f"/v1/cues/{cue['id']}").json()
        assert after["status"] == "paused" and after["run_count"] == 0 and after["last_run"] is not None


def test_timeout_and_regenerated_secret(hooks: tuple[Server, Receiver]) -> None:
    server, receiver = hooks
    key = server.register()
    receiver.script["/slow"] = [(200, b"{}", 2.5)]
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        refused = client.post("/v1/auth/webhook-secret/regenerate")
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "confirmation_required"
        secret = client.post(
            "/v1/auth/webhook-secret/regenerate", headers={"X-Confirm-Destructive": "true"}
        ).json()["webhook_secret"]
        cue = webhook_cue(
            client,
            receiver.url("/slow"),
            delivery={"timeout_seconds": 1},
            retry={"max_attempts": 2, "backoff_minutes": [0]},
        )
        fired = client.post(f"/v1/cues/{cue['id']}/fire").json()
        wait_for(lambda: execution(client, fired["id"])["status"] == "success")
        first, second = receiver.to("/slow")
        assert execution(client, fired["id"])["attempts"] == 2
        for request in (first, second):
            assert signed(secret, request.headers, request.body)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://hooks.example.com/x", "URL must use https://"),
        ("https://user:pw@hooks.example.com/x", "Credentials in callback URLs are not allowed"),
        ("https://localhost/x", "Hostname is not allowed"),
        ("https://metadata.google.internal/x", "Hostname is not allowed"),
        ("https://127.0.0.1/x", "Callback URL resolves to blocked address range"),
        ("https://169.254.169.254/latest", "Callback URL resolves to blocked address range"),
        ("https://[::ffff:10.0.0.1]/x", "Callback URL resolves to blocked address range"),
    ],
)
def test_callback_urls_are_checked(server: Server, url: str, message: str) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        response = client.post(
            "/v1/cues",
            json={
                "name": "n",
                "callback": {"url": url},
                "schedule": {"type": "recurring", "cron": "* * * * *"},
            },
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"] == {"code": "invalid_callback_url", "message": message, "status": 400}
        unresolvable = client.post(
            "/v1/cues",
            json={"name": "ok", "callback": {"url": "https://example.com/webhook"},
                  "on_failure": {"webhook": "https://10.1.2.3/alarm"},
                  "schedule": {"type": "recurring", "cron": "* * * * *"}},
        )  # fmt: skip
        assert unresolvable.status_code == 400
        assert unresolvable.json()["error"]["message"].startswith("on_failure.webhook: ")


def test_link_local_stays_blocked_at_delivery_even_with_the_switches(hooks: tuple[Server, Receiver]) -> None:
    server, _ = hooks
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        refused = client.post(
            "/v1/cues",
            json={"name": "n", "callback": {"url": "http://169.254.169.254/"},
                  "schedule": {"type": "recurring", "cron": "* * * * *"}},
        )  # fmt: skip
        assert refused.status_code == 400
