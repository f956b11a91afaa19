"""Bad input over REST: every client mistake gets its documented 4xx, never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support import Server, auth

VALID = {"name": "ok", "transport": "worker", "schedule": {"type": "recurring", "cron": "*/5 * * * *"}}


def error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["status"] == response.status_code
    return dict(body["error"])


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({**VALID, "retry": {"max_attempts": 11}}, 422, "validation_error", "body.retry.max_attempts"),
        ({**VALID, "name": "   "}, 422, "validation_error", "body.name"),
        ({**VALID, "name": "x" * 256}, 422, "validation_error", "body.name"),
        ({k: v for k, v in VALID.items() if k != "schedule"}, 422, "validation_error", "body.schedule"),
        ({**VALID, "transport": "carrier-pigeon"}, 422, "validation_error", "body.transport"),
        ({**VALID, "payload": [1, 2]}, 422, "validation_error", "body.payload"),
        ({**VALID, "retry": {"backoff_minutes": [1, 2000]}}, 422, "validation_error", "body.retry.backoff_minutes.1"),
        ({**VALID, "delivery": {"timeout_seconds": "soon"}}, 422, "validation_error", "body.delivery.timeout_seconds"),
        ({**VALID, "transport": "webhook"}, 422, "validation_error", "body.callback.url"),
        ({**VALID, "callback": {"url": "https://x.example", "transport": "worker"}}, 422, "validation_error",
         "body.callback.transport"),
        ({**VALID, "callback": {"url": "https://x.example", "method": "DELETE"}}, 422, "validation_error",
         "body.callback.method"),
        ({**VALID, "callback": {"url": "https://x.example", "headers": {"X-CueAPI-Signature": "forged"}}}, 422,
         "validation_error", "body.callback.headers.X-CueAPI-Signature"),
        ({**VALID, "schedule": {"type": "weekly"}}, 400, "invalid_schedule", None),
        ({**VALID, "schedule": {"type": "recurring", "cron": "61 * * * *"}}, 400, "invalid_schedule", None),
        ({**VALID, "schedule": {"type": "recurring", "cron": "*" * 101}}, 400, "invalid_schedule", None),
        ({**VALID, "schedule": {"type": "recurring", "cron": ""}}, 400, "invalid_schedule", None),
        ({**VALID, "schedule": {"type": "once", "at": "2001-01-01T00:00:00Z"}}, 400, "invalid_schedule", None),
        ({**VALID, "schedule": {"type": "once", "at": "tomorrow"}}, 422, "validation_error", "body.schedule.at"),
        ({**VALID, "schedule": {"type": "recurring", "cron": "* * * * *", "timezone": "Mars/Olympus"}}, 422,
         "invalid_timezone", None),
        ({**VALID, "schedule": {"type": "recurring", "cron": "* * * * *", "timezone": "America"}}, 422,
         "invalid_timezone", None),
        ({**VALID, "payload": {"text": "nul\u0000"}}, 400, "invalid_payload", None),
        ({**VALID, "name": "nul\u0000"}, 422, "validation_error", "body.name"),
        ({**VALID, "transport": "webhook", "callback": {"url": "https://[zz]/"}}, 422, "validation_error",
         "body.callback.url"),
        ({**VALID, "transport": "webhook", "callback": {"url": "https://x.example:99999/"}}, 422,
         "validation_error", "body.callback.url"),
        ({**VALID, "on_failure": {"webhook": "https://[::1/"}}, 400, "invalid_callback_url", None),
        ({**VALID, "callback": {"url": "https://x.example", "headers": {"X-Team": "\u0000"}}}, 422,
         "validation_error", "body.callback.headers.X-Team"),
        ({**VALID, "callback": {"url": "https://x.example", "headers": {"X-Team": "café"}}}, 422,
         "validation_error", "body.callback.headers.X-Team"),
        ({**VALID, "callback": {"url": "https://x.example", "headers": {"X-Team": " padded"}}}, 422,
         "validation_error", "body.callback.headers.X-Team"),
        ({**VALID, "callback": {"url": "https://x.example", "headers": {"X-Team": "a\r\nX-Evil: 1"}}}, 422,
         "validation_error", "body.callback.headers.X-Team"),
    ],
)  # fmt: skip
def test_create_cue_rejects(
    server: Server, body: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    key = server.register()
    response = httpx.post(f"{server.http_url}/v1/cues", json=body, headers=auth(key))
    assert response.status_code == status, response.text
    err = error(response)
    assert err["code"] == code
    if field is not None:
        assert err["details"][0]["field"] == field
        assert err["message"].startswith(f"{field}: ")


def test_checks_run_in_the_documented_order(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        assert client.post("/v1/cues", json=VALID).status_code == 201
        # A duplicate name (409) is reported before an invalid schedule (400).
        dup = client.post("/v1/cues", json={**VALID, "schedule": {"type": "weekly"}})
        assert dup.status_code == 409 and error(dup)["code"] == "duplicate_cue_name"
        # The invalid timezone (422) is reported before the invalid cron (400).
        tz = client.post(
            "/v1/cues",
            json={
                **VALID,
                "name": "b",
                "schedule": {"type": "recurring", "cron": "bad", "timezone": "No/Where"},
            },
        )
        assert error(tz)["code"] == "invalid_timezone"
        for i in range(9):
            assert client.post("/v1/cues", json={**VALID, "name": f"n{i}"}).status_code == 201
        limit = client.post("/v1/cues", json={**VALID, "name": "eleventh"})
        assert limit.status_code == 403 and error(limit) == {
            "code": "cue_limit_exceeded", "message": "Active cue limit of 10 reached", "status": 403,
        }  # fmt: skip


def test_update_rejections(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        first = client.post("/v1/cues", json=VALID).json()
        client.post("/v1/cues", json={**VALID, "name": "other"})
        path = f"/v1/cues/{first['id']}"
        for body, status, code, field in [
            ({"transport": "webhook"}, 422, "validation_error", "body.transport"),
            ({"colour": "blue"}, 422, "validation_error", "body.colour"),
            ({"status": "completed"}, 422, "validation_error", "body.status"),
            ({"name": "other"}, 409, "duplicate_cue_name", None),
            ({"name": None}, 422, "validation_error", "body.name"),
        ]:
            response = client.patch(path, json=body)
            assert response.status_code == status, (body, response.text)
            assert error(response)["code"] == code
            if field:
                assert error(response)["details"][0]["field"] == field
        assert client.get(path).json()["name"] == first["name"]  # nothing was half-written


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({}, 422, "validation_error", "body.success"),
        ({"success": "yes"}, 422, "validation_error", "body.success"),
        ({"success": 1}, 422, "validation_error", "body.success"),
        ({"success": True, "result": "x" * 8193}, 422, "validation_error", "body.result"),
        ({"success": True, "external_id": "x" * 501}, 422, "validation_error", "body.external_id"),
        ({"success": True, "result_url": "ftp://x"}, 422, "validation_error", "body.result_url"),
        ({"success": True, "metadata": {"blob": "x" * 10_240}}, 400, "metadata_too_large", None),
        ({"success": True, "metadata": "text"}, 422, "validation_error", "body.metadata"),
        ({"success": True, "artifacts": {"a": 1}}, 422, "validation_error", "body.artifacts"),
        ({"success": True, "result": "a\u0000b"}, 422, "validation_error", "body.result"),
        ({"success": True, "external_id": "\u0000"}, 422, "validation_error", "body.external_id"),
    ],
)
def test_outcome_rejects_and_keeps_the_slot(
    server: Server, body: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue = client.post("/v1/cues", json=VALID).json()
        execution = client.post(f"/v1/cues/{cue['id']}/fire").json()
        path = f"/v1/executions/{execution['id']}/outcome"
        response = client.post(path, json=body)
        assert response.status_code == status, response.text
        assert error(response)["code"] == code
        if field:
            assert error(response)["details"][0]["field"] == field
        assert client.post(path, json={"success": True}).status_code == 200


def test_nul_characters_are_refused_by_name_and_name_nothing_in_a_path(server: Server) -> None:
    """PostgreSQL's text cannot hold U+0000: in a field it is the caller's mistake
    (422 naming the field, on SQLite too), in a path it names no resource (404)."""
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        execution = client.post(f"/v1/cues/{client.post('/v1/cues', json=VALID).json()['id']}/fire").json()
        refused = [
            (client.post(f"/v1/executions/{execution['id']}/claim", json={"worker_id": "w\u0000"}), "body.worker_id"),
            (client.post("/v1/executions/claim", json={"worker_id": "w", "task": "\u0000"}), "body.task"),
            (client.post("/v1/worker/heartbeat", json={"worker_id": "w", "handlers": ["\u0000"]}),
             "body.handlers.0"),
            (client.get("/v1/executions/claimable", params={"task": "t\u0000"}), "query.task"),
            (client.get("/v1/executions", params={"cue_id": "cue_\u0000"}), "query.cue_id"),
            (client.post(f"/v1/executions/{execution['id']}/outcome",
                         json={"success": True, "metadata": {"k": ["a\u0000b"]}}), "body.metadata.k.0"),
            (client.post(f"/v1/executions/{execution['id']}/outcome",
                         json={"success": True, "metadata": {"k\u0000": 1}}), "body.metadata"),
        ]  # fmt: skip
        for response, field in refused:
            assert response.status_code == 422, (response.request.url, response.text)
            assert error(response)["details"][0]["field"] == field
        unknown = [
            (client.get("/v1/cues/cue_a%00b"), "cue_not_found"),
            (client.delete("/v1/workers/w%00"), "worker_not_found"),
            (client.post("/v1/executions/a%00b/outcome", json={"success": True}), "execution_not_found"),
        ]
        for response, code in unknown:
            assert response.status_code == 404, (response.request.url, response.text)
            assert error(response)["code"] == code
        # Nothing was taken: the execution is still there to claim.
        claimed = client.post(f"/v1/executions/{execution['id']}/claim", json={"worker_id": "w"})
        assert claimed.status_code == 200, claimed.text


def test_transport_level_errors(server: Server) -> None:
    key = server.register()
    with httpx.Client(base_url=server.http_url) as client:
        cases = [
            (client.post("/v1/cues", content=b"{not json", headers=auth(key)), 400, "invalid_json"),
            (client.post("/v1/cues", content=b"[1]", headers=auth(key)), 422, "validation_error"),
            (client.post("/v1/cues", content=b"", headers=auth(key)), 422, "validation_error"),
            (client.post("/v1/cues", content=b'{"a": NaN}', headers=auth(key)), 400, "invalid_json"),
            (client.post("/v1/cues", content=b'{"a":' + b"[" * 65 + b"]" * 65 + b"}", headers=auth(key)), 400,
             "invalid_json"),  # nested deeper than 64 levels
            (client.post("/v1/cues", content=b'{"name":"deep","transport":"worker","schedule":{"type":"recurring",'
             b'"cron":"* * * * *"},"payload":{"a":' + b"[" * 400 + b"]" * 400 + b"}}", headers=auth(key)), 400,
             "invalid_json"),
            (client.post("/v1/cues", content=b"\xff\xfe", headers=auth(key)), 400, "invalid_json"),
            (client.post("/v1/cues", content=b" " * (1_048_577), headers=auth(key)), 413, "request_too_large"),
            (client.get("/v1/cues"), 401, "invalid_api_key"),
            (client.get("/v1/cues", headers={"Authorization": "Basic abc"}), 401, "invalid_api_key"),
            (client.get("/v1/cues", headers=auth("cue_sk_" + "0" * 32)), 401, "invalid_api_key"),
            (client.get("/v1/cues", headers=auth("sk_live_nope")), 401, "invalid_api_key"),
            (client.get("/v1/cues/cue_missing00000", headers=auth(key)), 404, "cue_not_found"),
            (client.get("/v1/cues/not-an-id", headers=auth(key)), 404, "cue_not_found"),
            (client.get("/v1/executions/not-a-uuid", headers=auth(key)), 404, "execution_not_found"),
            (client.get("/v1/executions/" + "0" * 8 + "-0000-0000-0000-" + "0" * 12, headers=auth(key)), 404,
             "execution_not_found"),
            (client.post("/v1/executions/nope/outcome", json={"success": True}, headers=auth(key)), 404,
             "execution_not_found"),
            (client.get("/v1/cues?limit=101", headers=auth(key)), 422, "validation_error"),
            (client.get("/v1/cues?limit=many", headers=auth(key)), 422, "validation_error"),
            (client.get("/v1/cues?status=sleeping", headers=auth(key)), 422, "validation_error"),
            (client.get("/v1/nothing/here", headers=auth(key)), 404, "http_error"),
            (client.put("/v1/cues", headers=auth(key)), 405, "http_error"),
            (client.post("/v1/auth/register", json={"email": "not-an-email"}), 422, "validation_error"),
        ]  # fmt: skip
        for response, status, code in cases:
            assert response.status_code == status, (response.request.url, response.text)
            assert error(response)["code"] == code
            assert response.headers["content-type"] == "application/json"


def test_empty_required_ignored_and_non_object_bodies(server: Server) -> None:
    """An empty body is {} where the body is optional and a 422 on `body` where
    it is required; a body the method ignores must still be a JSON object."""
    key = server.register()
    with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
        cue_id = client.post("/v1/cues", json=VALID).json()["id"]
        execution = f"/v1/executions/{client.post(f'/v1/cues/{cue_id}/fire').json()['id']}"
        required = [
            ("POST", "/v1/auth/register"), ("PATCH", "/v1/auth/me"), ("PATCH", f"/v1/cues/{cue_id}"),
            ("POST", "/v1/executions/claim"), ("POST", f"{execution}/claim"), ("POST", f"{execution}/outcome"),
            ("PATCH", f"{execution}/evidence"), ("POST", "/v1/worker/heartbeat"),
        ]  # fmt: skip
        for verb, path in required:
            empty = client.request(verb, path, content=b"", headers={"Content-Type": "application/json"})
            assert empty.status_code == 422, (verb, path, empty.text)
            assert error(empty)["details"] == [{"field": "body", "message": "Field required"}], (verb, path)
        not_object = client.post(f"{execution}/claim", content=b"[1]")
        assert error(not_object)["details"] == [
            {"field": "body", "message": "Input should be a valid dictionary"}
        ]
        # Optional bodies: empty is {} (the fire above had none either).
        assert client.post(f"{execution}/verify", content=b"").status_code == 409  # no outcome yet: not a 422
        claimed = client.post(f"{execution}/claim", json={"worker_id": "w"})
        assert claimed.status_code == 200, claimed.text
        assert (
            client.post(f"{execution}/heartbeat", content=b"", headers={"X-Worker-Id": "w"}).status_code
            == 200
        )
        # A body the method ignores is still read: not JSON is 400, not an object is 422.
        garbage = client.post(f"{execution}/heartbeat", content=b"{bad", headers={"X-Worker-Id": "w"})
        assert garbage.status_code == 400 and error(garbage)["code"] == "invalid_json"
        listed = client.post(f"{execution}/replay", content=b'"text"')
        assert listed.status_code == 422 and error(listed)["details"][0]["field"] == "body"
        ignored = client.post(f"{execution}/heartbeat", json={"anything": 1}, headers={"X-Worker-Id": "w"})
        assert ignored.status_code == 200, ignored.text
        # A literal path with another verb is 405, not the {execution_id} route.
        assert client.get("/v1/executions/claim").status_code == 405


def test_trailing_slash_is_the_same_route(server: Server) -> None:
    key = server.register()
    response = httpx.get(f"{server.http_url}/v1/cues/", headers=auth(key))
    assert response.status_code == 200 and "cues" in response.json()
