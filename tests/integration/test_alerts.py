"""Alerts (contract §5.9) and the alert webhook."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.test_scheduler import wait_for
from tests.integration.test_webhooks import LOCAL
from tests.support import Receiver, Server, auth, signed


@pytest.fixture
def alerting(database_url: str) -> Iterator[tuple[Server, Receiver]]:
    receiver = Receiver()
    server = Server(database_url, env=LOCAL).start()
    yield server, receiver
    server.stop()
    receiver.close()


def test_alerts_are_raised_listed_acknowledged_and_sent(alerting: tuple[Server, Receiver]) -> None:
    server, receiver = alerting
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        refused = client.patch("/v1/auth/me", json={})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "no_fields"
        me = client.patch("/v1/auth/me", json={"alert_webhook_url": receiver.url("/alerts")})
        assert me.status_code == 200 and me.json()["alert_webhook_url"] == receiver.url("/alerts")
        secret = client.get("/v1/auth/webhook-secret").json()["webhook_secret"]
        cue = client.post(
            "/v1/cues",
            json={
                "name": "flaky",
                "transport": "worker",
                "alerts": {"consecutive_failures": 2},
                "verification": {"mode": "require_external_id"},
                "schedule": {"type": "recurring", "cron": "0 0 1 1 *"},
            },
        ).json()
        runs = [client.post(f"/v1/cues/{cue['id']}/fire").json()["id"] for _ in range(3)]
        client.post(f"/v1/executions/{runs[0]}/outcome", json={"success": True})  # verification_failed
        client.post(f"/v1/executions/{runs[1]}/outcome", json={"success": False})
        client.post(f"/v1/executions/{runs[2]}/outcome", json={"success": False})  # second failure in a row

        def kinds() -> list[str]:
            return sorted(a["alert_type"] for a in client.get("/v1/alerts").json()["alerts"])

        try:
            wait_for(lambda: kinds() == ["consecutive_failures", "verification_failed"])
        except AssertionError:
            raise AssertionError(client.get("/v1/alerts").json()) from None
        listed = client.get("/v1/alerts?alert_type=consecutive_failure").json()
        assert listed["total"] == 1
        streak = listed["alerts"][0]
        assert streak["execution_id"] == runs[2] and streak["severity"] == "critical"
        assert streak["metadata"]["consecutive_failures"] == 2 and streak["acknowledged"] is False
        acked = client.post(f"/v1/alerts/{streak['id']}/acknowledge")
        assert acked.status_code == 200 and acked.json()["acknowledged"] is True
        assert client.post(f"/v1/alerts/{streak['id']}/acknowledge").json()["acknowledged"] is True
        assert client.get("/v1/alerts?acknowledged=false").json()["total"] == 1
        # by cue and since, on a page past the end: no rows, and still the total
        since = streak["created_at"].replace("Z", "+00:00")
        query = {"cue_id": cue["id"], "since": since}
        first = client.get("/v1/alerts", params=query).json()
        assert streak["id"] in [alert["id"] for alert in first["alerts"]]
        beyond = client.get("/v1/alerts", params={**query, "offset": 5}).json()
        assert beyond["alerts"] == [] and beyond["total"] == first["total"] == len(first["alerts"])
        later = (dt.datetime.fromisoformat(since) + dt.timedelta(hours=1)).isoformat()
        assert client.get("/v1/alerts", params={"cue_id": cue["id"], "since": later}).json()["total"] == 0
        assert client.get("/v1/alerts", params={"cue_id": "cue_000000000000"}).json()["total"] == 0
        bad = client.get("/v1/alerts?alert_type=bored")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_filter"
        assert client.post("/v1/alerts/not-a-uuid/acknowledge").status_code == 404

        sent = wait_for(lambda: len(receiver.to("/alerts")) == 2 and receiver.to("/alerts"))
        for request in sent:
            body = json.loads(request.body)
            assert request.headers["X-CueAPI-Alert-Type"] == body["alert_type"]
            assert request.headers["X-CueAPI-Alert-Id"] == body["id"]
            assert signed(secret, request.headers, request.body)
