"""Partner actions (contract partner-v2): the three partner paths driven over
plain HTTP as a partner would, the internal API over gRPC as an internal
service would, both token endpoints, secrets, audit events and races."""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2

from cueline.partner.v1 import (
    actions_pb2,
    actions_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    directory_pb2,
    directory_pb2_grpc,
)
from cueline_server.services.secrets import SecretCodec
from tests.support import ROOT, Server, auth, bearer, error_details

KEYS = {"old": secrets.token_bytes(32), "new": secrets.token_bytes(32)}
SUBJECT = "heat-pumps/hp-123"
TEMPLATE = (
    "https://connect.example.com/reauthenticate?attempt={attempt}"
    "&success={success_url}&cancel={cancel_url}&lang={language}"
)
SUCCESS_URL = "https://app.partner.example/reauth/done"
CANCEL_URL = "https://app.partner.example/reauth/cancel"
REAUTH_BODY = {"successUrl": SUCCESS_URL, "cancelUrl": CANCEL_URL}


def _key_spec() -> str:
    return ",".join(f"{kid}={base64.urlsafe_b64encode(key).decode()}" for kid, key in KEYS.items())


@pytest.fixture(scope="module")
def partner_server(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server with known secret keys (the tests mint expired secrets) and
    127.0.0.1 as a trusted proxy (the tests send X-Forwarded-For)."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('partner')}/cueline.db"
    else:
        from tests.support import new_database

        url = new_database(request.getfixturevalue("postgres_admin_url"))
    running = Server(
        url,
        env={
            "CUELINE_ACTION_SECRET_KEYS": _key_spec(),
            "CUELINE_ACTION_SECRET_SIGNING_KID": "new",
            "CUELINE_TRUSTED_PROXIES": "127.0.0.1/32",
            "CUELINE_PUBLIC_BASE_URL": "https://cueline.example.com",
        },
    ).start()
    yield running
    assert running.stop() == 0, running.log()


@dataclass
class Org:
    key: str  # the internal caller's account API key
    id: str
    member: str
    client_id: str
    client_secret: str
    token: str  # a partner access token (client credentials)


def new_org(server: Server, key: str | None = None) -> Org:
    key = key or server.register()
    with grpc.insecure_channel(server.grpc_target) as channel:
        directory = directory_pb2_grpc.PartnerDirectoryServiceStub(channel)
        org = directory.CreateOrganization(
            directory_pb2.CreateOrganizationRequest(name="Example Energy"), metadata=bearer(key)
        ).organization
        member = directory.CreateMember(
            directory_pb2.CreateMemberRequest(organization_id=org.id), metadata=bearer(key)
        ).member
        client = directory.CreateClient(
            directory_pb2.CreateClientRequest(organization_id=org.id, name="backend"), metadata=bearer(key)
        )
    token = client_token(server, client.client.client_id, client.client_secret)
    return Org(key, org.id, member.id, client.client.client_id, client.client_secret, token)


def client_token(server: Server, client_id: str, client_secret: str) -> str:
    response = httpx.post(
        f"{server.http_url}/oauth2/token/",
        auth=(client_id, client_secret),
        json={"grant_type": "client_credentials"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 36000 and body["scope"] == "read write"
    assert "refresh_token" not in body
    token: str = body["access_token"]
    return token


def create_action(server: Server, org: Org, **fields: Any) -> dict[str, Any]:
    body = {"subject": SUBJECT, "code": "reauthenticate", "redirect_url_template": TEMPLATE, **fields}
    response = httpx.post(
        f"{server.http_url}/v1/organizations/{org.id}/actions", json=body, headers=auth(org.key)
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def read_actions(
    server: Server, org: Org, member: str | None = None, subject: str = SUBJECT
) -> dict[str, Any]:
    response = httpx.get(
        f"{server.http_url}/v1/organizations/{org.id}/actions",
        params={"subject": subject, "member_id": member or org.member},
        headers=auth(org.key),
    )
    assert response.status_code == 200, response.text
    listed: dict[str, Any] = response.json()
    return listed


def link(server: Server, org: Org, action_id: str, member: str | None = None) -> str:
    """The action's resolution link, on this test server's address."""
    for item in read_actions(server, org, member)["actions"]:
        if item["id"] == action_id:
            url: str = item["resolution_link"]["url"]
            assert url.startswith("https://cueline.example.com/api/partners/v2.0/cues/")
            return url.replace("https://cueline.example.com", server.http_url)
    raise AssertionError(f"{action_id} is not listed")


def state_url(resolve_url: str) -> str:
    base, _, secret = resolve_url.partition("/resolve?secret=")
    return f"{base}/state?secret={secret}"


def post(url: str, body: Any = None, token: str | None = None, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kwargs.pop("headers", {}))
    if body is None:
        return httpx.post(url, headers=headers, **kwargs)
    return httpx.post(url, json=body, headers=headers, **kwargs)


def events(server: Server, org: Org, action_id: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{server.http_url}/v1/organizations/{org.id}/actions/{action_id}/events", headers=auth(org.key)
    )
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["events"]
    return found


def test_reauthenticate_happy_path_and_audit(partner_server: Server) -> None:
    org = new_org(partner_server)
    action = create_action(partner_server, org, title="Reconnect your heat pump")
    assert action["state"] == "pending" and action["required_parameters"] == ["successUrl", "cancelUrl"]
    listed = read_actions(partner_server, org)
    assert listed["action_needed"] is True and listed["has_unread_information"] is False
    item = listed["actions"][0]
    assert item["title"] == "Reconnect your heat pump" and item["message"] is None and item["data"] is None
    assert item["state"] == "pending" and item["resolution_link"]["required_parameters"] == [
        "successUrl",
        "cancelUrl",
    ]
    expires = dt.datetime.fromisoformat(item["resolution_link"]["expires_at"].replace("Z", "+00:00"))
    assert dt.timedelta(minutes=59) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)

    url = link(partner_server, org, action["id"])
    started = post(
        url,
        {**REAUTH_BODY, "language": "de", "clientInfo": {"app": "partner-ios/3.2"}, "location": {"lat": 48}},
        org.token,
        headers={"User-Agent": "partner-app/1.0", "X-Forwarded-For": "203.0.113.7, 10.0.0.1"},
    )
    assert started.status_code == 200, started.text
    redirect = urlsplit(started.json()["redirect_url"])
    query = parse_qs(redirect.query)
    assert redirect.netloc == "connect.example.com"
    assert query["success"] == [SUCCESS_URL] and query["cancel"] == [CANCEL_URL] and query["lang"] == ["de"]
    assert "success=https%3A%2F%2Fapp.partner.example%2Freauth%2Fdone" in redirect.query
    attempt = query["attempt"][0]
    assert read_actions(partner_server, org)["actions"][0]["state"] == "in_progress"

    done = post(state_url(url), {"state": "success", "client_info": {"app": "partner-ios/3.2"}})
    assert done.status_code == 200 and done.json() == {"action_id": action["id"]}
    again = post(state_url(url), {"state": "success"})
    assert again.status_code == 404 and again.json() == {"detail": "Not Found"}
    assert read_actions(partner_server, org) == {
        "actions": [],
        "action_needed": False,
        "has_unread_information": False,
    }
    assert post(url, REAUTH_BODY, org.token).status_code == 404  # completed actions do not exist for partners

    start, outcome = events(partner_server, org, action["id"])
    assert start["type"] == "start" and start["attempt_id"] == attempt and start["member_id"] == org.member
    assert start["parameters"] == {"successUrl": SUCCESS_URL, "cancelUrl": CANCEL_URL, "language": "de"}
    assert start["client_info"] == {"app": "partner-ios/3.2"} and start["location"] == {"lat": 48}
    assert start["remote_address"] == "203.0.113.7" and start["user_agent"] == "partner-app/1.0"
    assert outcome["type"] == "outcome" and outcome["state"] == "success" and outcome["attempt_id"] == attempt
    got = httpx.get(
        f"{partner_server.http_url}/v1/organizations/{org.id}/actions/{action['id']}", headers=auth(org.key)
    ).json()
    assert got["state"] == "completed" and got["complete_time"] is not None


def test_fail_then_retry_and_supersede(partner_server: Server) -> None:
    org = new_org(partner_server)
    action = create_action(partner_server, org)
    url = link(partner_server, org, action["id"])
    assert post(url, REAUTH_BODY, org.token).status_code == 200
    failed = post(
        state_url(url), {"state": "fail", "payload": {"reason": "user_cancelled", "n": 12345678901}}
    )
    assert failed.status_code == 200
    assert read_actions(partner_server, org)["actions"][0]["state"] == "pending"
    assert post(state_url(url), {"state": "success"}).status_code == 404  # nothing in progress

    assert post(url, REAUTH_BODY, org.token).status_code == 200  # retry with the same secret
    newer = link(partner_server, org, action["id"])
    assert newer != url
    assert post(newer, REAUTH_BODY, org.token).status_code == 200  # supersedes the open attempt
    stale = post(state_url(url), {"state": "success"})
    assert stale.status_code == 403 and stale.json() == {"detail": "Invalid or expired secret"}
    assert post(state_url(newer), {"state": "success"}).status_code == 200

    trail = events(partner_server, org, action["id"])
    assert [(e["type"], e["state"]) for e in trail] == [
        ("start", None),
        ("outcome", "fail"),
        ("start", None),
        ("start", None),
        ("outcome", "success"),
    ]
    assert trail[1]["payload"] == {"reason": "user_cancelled", "n": 12345678901}
    assert trail[3]["superseded_attempt_id"] == trail[2]["attempt_id"]
    assert trail[4]["attempt_id"] == trail[3]["attempt_id"]


def test_information_read(partner_server: Server) -> None:
    org = new_org(partner_server)
    info = create_action(
        partner_server,
        org,
        code="information",
        redirect_url_template=None,
        data={"big": 12345678901234567890},
    )
    listed = read_actions(partner_server, org)
    assert listed["action_needed"] is False and listed["has_unread_information"] is True
    item = listed["actions"][0]
    assert (
        item["data"] == {"big": 12345678901234567890} and item["resolution_link"]["required_parameters"] == []
    )
    url = link(partner_server, org, info["id"])
    assert "/information/resolve?secret=" in url
    wrong = post(url.replace("/information/resolve", "/resolve"), REAUTH_BODY, org.token)
    assert wrong.status_code == 409
    assert wrong.json() == {"detail": "This action cannot be resolved with this endpoint"}
    assert (
        post(state_url(url.replace("/information/resolve", "/resolve")), {"state": "success"}).status_code
        == 404
    )
    read = post(url, None, org.token)  # an empty body counts as {}
    assert read.status_code == 200 and read.json() == {"action_id": info["id"]}
    second = create_action(partner_server, org, code="information", redirect_url_template=None)
    read_null = post(
        link(partner_server, org, second["id"]), None, org.token, content=b"null"
    )  # so does null
    assert read_null.status_code == 200 and read_null.json() == {"action_id": second["id"]}
    assert post(url, {"client_info": {"app": "web"}}, org.token).status_code == 404
    assert read_actions(partner_server, org)["has_unread_information"] is False
    assert [e["type"] for e in events(partner_server, org, info["id"])] == ["read"]

    other = create_action(
        partner_server, org, code="other_code", redirect_url_template=None, required_parameters=["deviceId"]
    )
    other_url = link(partner_server, org, other["id"])
    wrong = post(other_url.replace("/resolve", "/information/resolve"), {}, org.token)
    assert wrong.status_code == 409
    missing = post(other_url, {"clientInfo": None}, org.token)
    assert missing.status_code == 422
    assert missing.json() == {
        "detail": [{"type": "missing", "loc": ["body", "deviceId"], "msg": "Field required"}]
    }
    started = post(other_url, {"deviceId": "d-1", "extra": 2}, org.token)
    assert started.status_code == 200 and started.json() == {"action_id": other["id"]}
    assert events(partner_server, org, other["id"])[0]["parameters"] == {"deviceId": "d-1", "extra": 2}


def test_secret_failures(partner_server: Server) -> None:
    org = new_org(partner_server)
    action = create_action(partner_server, org)
    url = link(partner_server, org, action["id"])
    base = url.split("?")[0]
    codec = SecretCodec(KEYS, "old")
    now = dt.datetime.now(dt.UTC)
    action_id, member = uuid.UUID(action["id"]), uuid.UUID(org.member)
    forged = SecretCodec({"old": secrets.token_bytes(32)}, "old").mint(action_id, member, now)[0]
    other_action = create_action(partner_server, org)
    foreign_org = new_org(partner_server, org.key)
    refused = {
        "expired": codec.mint(action_id, member, now - dt.timedelta(seconds=3700))[0],
        "from the future": codec.mint(action_id, member, now + dt.timedelta(seconds=120))[0],
        "forged": forged,
        "unknown kid": "zz." + forged.split(".", 1)[1],
        "another action": codec.mint(uuid.UUID(other_action["id"]), member, now)[0],
        "another organization's member": codec.mint(action_id, uuid.UUID(foreign_org.member), now)[0],
        "unknown member": codec.mint(action_id, uuid.uuid4(), now)[0],
        "empty": "",
        "garbage": "a.b.c",
    }
    for why, secret in refused.items():
        response = post(f"{base}?secret={secret}", REAUTH_BODY, org.token)
        assert response.status_code == 403, why
        assert response.json() == {"detail": "Invalid or expired secret"}, why
    # The old key still verifies (rotation), and a secret 59 minutes old still works.
    assert (
        post(
            f"{base}?secret={codec.mint(action_id, member, now - dt.timedelta(minutes=59))[0]}",
            REAUTH_BODY,
            org.token,
        ).status_code
        == 200
    )

    missing = post(base, REAUTH_BODY, org.token)
    assert missing.status_code == 422
    assert missing.json() == {
        "detail": [{"type": "missing", "loc": ["query", "secret"], "msg": "Field required"}]
    }
    with grpc.insecure_channel(partner_server.grpc_target) as channel:
        directory_pb2_grpc.PartnerDirectoryServiceStub(channel).DisableMember(
            directory_pb2.DisableMemberRequest(member_id=org.member), metadata=bearer(org.key)
        )
    assert post(url, REAUTH_BODY, org.token).status_code == 403  # a disabled member's secrets fail


def test_bearer_checks_and_bad_input(partner_server: Server) -> None:
    org = new_org(partner_server)
    other = new_org(partner_server)
    action = create_action(partner_server, org)
    url = link(partner_server, org, action["id"])
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {org.token}"}):
        response = httpx.post(url, json=REAUTH_BODY, headers=headers)
        assert response.status_code == 401 and response.json() == {"detail": "Unauthorized"}
    assert (
        httpx.post(url, json=REAUTH_BODY, headers={"Authorization": f"bEaReR {org.token}"}).status_code != 401
    )
    foreign = post(link(partner_server, org, action["id"]), REAUTH_BODY, other.token)
    assert foreign.status_code == 404 and foreign.json() == {"detail": "Not Found"}
    # Check order: 401 before 422, 422 before 404.
    assert post(url.split("?")[0], REAUTH_BODY).status_code == 401
    assert (
        post(
            f"{partner_server.http_url}/api/partners/v2.0/cues/{uuid.uuid4()}/resolve?secret=x",
            REAUTH_BODY,
            org.token,
        ).status_code
        == 404
    )
    assert (
        post(
            f"{partner_server.http_url}/api/partners/v2.0/cues/not-a-uuid/resolve?secret=x",
            REAUTH_BODY,
            org.token,
        ).status_code
        == 404
    )
    assert (
        post(
            f"{partner_server.http_url}/api/partners/v2.0/cues/not-a-uuid/resolve", REAUTH_BODY, org.token
        ).status_code
        == 422
    )

    bad_json = httpx.post(url, content=b"{oops", headers={"Authorization": f"Bearer {org.token}"})
    assert bad_json.status_code == 400 and bad_json.json() == {"detail": "Cannot parse request body"}
    not_object = post(url, [1, 2], org.token)
    assert not_object.status_code == 422
    assert not_object.json()["detail"] == [
        {"type": "dict_type", "loc": ["body"], "msg": "Input should be a valid dictionary"}
    ]
    too_large = post(url, {"successUrl": "https://a.example/" + "x" * 70_000}, org.token)
    assert too_large.status_code == 413 and too_large.json() == {"detail": "Request body too large"}
    assert httpx.get(url).json() == {"detail": "Method Not Allowed"}
    snake = post(
        url, {"success_url": SUCCESS_URL, "cancelUrl": "ftp://x.example/", "clientInfo": "no"}, org.token
    )
    assert snake.status_code == 422
    assert snake.json()["detail"] == [
        {"type": "dict_type", "loc": ["body", "clientInfo"], "msg": "Input should be a valid dictionary"}
    ]
    bad_urls = post(url, {"successUrl": 5, "cancelUrl": "ftp://x.example/"}, org.token)
    assert [(d["type"], d["loc"]) for d in bad_urls.json()["detail"]] == [
        ("string_type", ["body", "successUrl"]),
        ("value_error", ["body", "cancelUrl"]),
    ]
    bad_state = post(state_url(url), {"state": "done", "payload": []})
    assert [(d["type"], d["loc"], d["msg"]) for d in bad_state.json()["detail"]] == [
        ("literal_error", ["body", "state"], "Input should be 'success' or 'fail'"),
        ("dict_type", ["body", "payload"], "Input should be a valid dictionary"),
    ]
    assert post(state_url(url), None).json()["detail"] == [
        {"type": "missing", "loc": ["body"], "msg": "Field required"}
    ]
    # JSON null is not an object (only /information/resolve reads it as {});
    # {} is an object without the required fields.
    for target, token in ((url, org.token), (state_url(url), None)):
        null = post(target, None, token, content=b"null")
        assert null.status_code == 422 and null.json()["detail"] == [
            {"type": "dict_type", "loc": ["body"], "msg": "Input should be a valid dictionary"}
        ]
    assert post(state_url(url), {}).json()["detail"] == [
        {"type": "missing", "loc": ["body", "state"], "msg": "Field required"}
    ]
    # A query parameter's problem is located in the query.
    for target, token in ((url, org.token), (state_url(url), None)):
        nul = post(target.split("?")[0] + "?secret=%00", {"state": "success"}, token)
        assert nul.status_code == 422 and [d["loc"] for d in nul.json()["detail"]] == [["query", "secret"]]
    # /state ignores any Authorization header, even an invalid one.
    assert post(url, REAUTH_BODY, org.token).status_code == 200
    assert post(state_url(url), {"state": "success"}, "not-a-token").status_code == 200


def test_racing_state_reports_have_one_winner(partner_server: Server) -> None:
    org = new_org(partner_server)
    action = create_action(partner_server, org)
    url = link(partner_server, org, action["id"])
    assert post(url, REAUTH_BODY, org.token).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(
                lambda i: post(state_url(url), {"state": "success" if i % 2 else "fail"}).status_code,
                range(16),
            )
        )
    assert codes.count(200) == 1 and all(code in (404, 409) for code in codes if code != 200), codes
    outcomes = [e for e in events(partner_server, org, action["id"]) if e["type"] == "outcome"]
    assert len(outcomes) == 1


def test_racing_resolves_leave_one_open_attempt(partner_server: Server) -> None:
    org = new_org(partner_server)
    action = create_action(partner_server, org)
    urls = [link(partner_server, org, action["id"]) for _ in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda u: post(u, REAUTH_BODY, org.token).status_code, urls))
    assert codes == [200] * 8
    starts = [e for e in events(partner_server, org, action["id"]) if e["type"] == "start"]
    assert len(starts) == 8 and sum(e["superseded_attempt_id"] is None for e in starts) == 1
    # Exactly one attempt is open: only the secret that started it can report.
    winners = [u for u in urls if post(state_url(u), {"state": "success"}).status_code == 200]
    assert len(winners) == 1


def test_password_and_refresh_grants(partner_server: Server) -> None:
    org = new_org(partner_server)
    username = f"alice-{uuid.uuid4().hex[:8]}"
    with grpc.insecure_channel(partner_server.grpc_target) as channel:
        directory = directory_pb2_grpc.PartnerDirectoryServiceStub(channel)
        directory.CreateUser(
            directory_pb2.CreateUserRequest(
                organization_id=org.id, username=username, password="correct horse"
            ),
            metadata=bearer(org.key),
        )
        with pytest.raises(grpc.RpcError) as duplicate:
            directory.CreateUser(
                directory_pb2.CreateUserRequest(
                    organization_id=org.id, username=username, password="another one"
                ),
                metadata=bearer(org.key),
            )
        assert (
            duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS
            or duplicate.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        )
    token_url = f"{partner_server.http_url}/api/partners/v2.0/auth/token"
    issued = httpx.post(
        token_url, data={"grant_type": "password", "username": username, "password": "correct horse"}
    )
    assert issued.status_code == 200, issued.text
    body = issued.json()
    assert body["expires_in"] == 36000 and body["token_type"] == "Bearer" and body["refresh_token"]
    action = create_action(partner_server, org)
    assert post(link(partner_server, org, action["id"]), REAUTH_BODY, body["access_token"]).status_code == 200

    rotated = httpx.post(
        token_url, json={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
    )
    assert rotated.status_code == 200 and rotated.json()["refresh_token"] != body["refresh_token"]
    reused = httpx.post(
        token_url, json={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
    )
    assert reused.status_code == 401 and reused.json() == {"detail": "Invalid credentials"}
    wrong = httpx.post(token_url, json={"grant_type": "password", "username": username, "password": "wrong"})
    assert wrong.status_code == 401 and wrong.json() == {"detail": "Invalid credentials"}
    for body_in, loc, kind in (
        ({"username": username, "password": "x"}, ["body", "grant_type"], "missing"),
        ({"grant_type": "client_credentials"}, ["body", "grant_type"], "literal_error"),
        ({"grant_type": None}, ["body", "grant_type"], "literal_error"),
        ({"grant_type": 7}, ["body", "grant_type"], "literal_error"),
        (
            {"grant_type": "password", "username": username, "password": None},
            ["body", "password"],
            "string_type",
        ),
        ({"grant_type": "password", "username": username}, ["body", "password"], "missing"),
        ({"grant_type": "refresh_token"}, ["body", "refresh_token"], "missing"),
    ):
        refused = httpx.post(token_url, json=body_in)
        assert refused.status_code == 422, body_in
        assert [(d["loc"], d["type"]) for d in refused.json()["detail"]] == [(loc, kind)], body_in

    with grpc.insecure_channel(partner_server.grpc_target) as channel:
        disabled = directory_pb2_grpc.PartnerDirectoryServiceStub(channel).DisableUser(
            directory_pb2.DisableUserRequest(username=username), metadata=bearer(org.key)
        )
    assert disabled.revoked_tokens >= 2 and disabled.user.disabled
    assert (
        post(link(partner_server, org, action["id"]), REAUTH_BODY, rotated.json()["access_token"]).status_code
        == 401
    )
    again = httpx.post(
        token_url, json={"grant_type": "password", "username": username, "password": "correct horse"}
    )
    assert again.status_code == 401
    refresh = httpx.post(
        token_url, json={"grant_type": "refresh_token", "refresh_token": rotated.json()["refresh_token"]}
    )
    assert refresh.status_code == 401 and refresh.json() == {"detail": "Invalid credentials"}


def test_client_credentials_errors_and_revocation(partner_server: Server) -> None:
    org = new_org(partner_server)
    token_url = f"{partner_server.http_url}/oauth2/token/"
    form = client_token_form = httpx.post(
        token_url, auth=(org.client_id, org.client_secret), data={"grant_type": "client_credentials"}
    )
    assert form.status_code == 200 and client_token_form.json()["access_token"]
    for credentials in ((org.client_id, "wrong"), ("cl_unknown", org.client_secret)):
        refused = httpx.post(token_url, auth=credentials, json={"grant_type": "client_credentials"})
        assert refused.status_code == 401 and refused.json() == {"error": "invalid_client"}
        assert refused.headers["www-authenticate"] == 'Basic realm="cueline"'
    assert httpx.post(token_url, json={"grant_type": "client_credentials"}).status_code == 401
    # Credentials that are not base64 of UTF-8 text are bad credentials too.
    for raw in (b"Basic \xc3\xa9", b"Basic abc\xff", b"Basic !!!", b"Basic /w=="):
        refused = httpx.post(
            token_url, headers={b"Authorization": raw}, json={"grant_type": "client_credentials"}
        )
        assert refused.status_code == 401 and refused.json() == {"error": "invalid_client"}, raw
    missing = httpx.post(token_url, auth=(org.client_id, org.client_secret), json={})
    assert missing.status_code == 400 and missing.json() == {"error": "invalid_request"}
    other = httpx.post(token_url, auth=(org.client_id, org.client_secret), data={"grant_type": "password"})
    assert other.status_code == 400 and other.json() == {"error": "unsupported_grant_type"}

    action = create_action(partner_server, org)
    url = link(partner_server, org, action["id"])
    with grpc.insecure_channel(partner_server.grpc_target) as channel:
        tokens = auth_pb2_grpc.PartnerAuthServiceStub(channel)
        revoked = tokens.RevokeTokens(auth_pb2.RevokeTokensRequest(token=org.token), metadata=bearer(org.key))
        assert revoked.revoked == 1
        assert post(url, REAUTH_BODY, org.token).status_code == 401
        fresh = client_token(partner_server, org.client_id, org.client_secret)
        assert post(url, REAUTH_BODY, fresh).status_code == 200
        stranger = partner_server.register()
        not_theirs = tokens.RevokeTokens(auth_pb2.RevokeTokensRequest(token=fresh), metadata=bearer(stranger))
        assert not_theirs.revoked == 0
        disabled = directory_pb2_grpc.PartnerDirectoryServiceStub(channel).DisableClient(
            directory_pb2.DisableClientRequest(client_id=org.client_id), metadata=bearer(org.key)
        )
        assert disabled.revoked_tokens >= 1
    assert post(url, REAUTH_BODY, fresh).status_code == 401
    refused = httpx.post(
        token_url, auth=(org.client_id, org.client_secret), json={"grant_type": "client_credentials"}
    )
    assert refused.status_code == 401


def _error_info(error: grpc.RpcError) -> tuple[str, list[error_details_pb2.BadRequest.FieldViolation]]:
    info, bad = error_details(error)
    assert info.domain == "cueline"
    return info.reason, list(bad.field_violations) if bad is not None else []


def test_internal_api_over_grpc(partner_server: Server) -> None:
    org = new_org(partner_server)
    with grpc.insecure_channel(partner_server.grpc_target) as channel:
        actions = actions_pb2_grpc.ActionServiceStub(channel)
        request_id = str(uuid.uuid4())
        request = actions_pb2.CreateActionRequest(
            action=actions_pb2.Action(
                organization_id=org.id, subject="meters/m-1", code="information", title="Hi"
            ),
            request_id=request_id,
        )
        first = actions.CreateAction(request, metadata=bearer(org.key)).action
        again = actions.CreateAction(request, metadata=bearer(org.key)).action
        assert first.id == again.id and first.state == actions_pb2.ACTION_STATE_PENDING

        listed = actions.ListActions(
            actions_pb2.ListActionsRequest(
                organization_id=org.id, subject="meters/m-1", member_id=org.member
            ),
            metadata=bearer(org.key),
        )
        assert [a.id for a in listed.actions] == [first.id] and listed.has_unread_information

        partner = actions_pb2_grpc.PartnerActionServiceStub(channel)
        read = actions_pb2.ResolveInformationActionRequest(cue_id=first.id, secret="k.bad.secret")
        with pytest.raises(grpc.RpcError) as denied:
            partner.ResolveInformationAction(read, metadata=bearer(org.token))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert _error_info(denied.value)[0] == "INVALID_SECRET"
        secret = parse_qs(urlsplit(listed.actions[0].resolution_link.url).query)["secret"][0]
        read.secret = secret
        done = partner.ResolveInformationAction(
            read, metadata=(*bearer(org.token), ("user-agent", "internal-svc/2"))
        )
        assert done.action_id == first.id
        trail = actions.ListActionEvents(
            actions_pb2.ListActionEventsRequest(organization_id=org.id, action_id=first.id),
            metadata=bearer(org.key),
        )
        assert trail.events[0].type == actions_pb2.ACTION_EVENT_TYPE_READ
        assert trail.events[0].remote_address == "127.0.0.1" and "grpc-python" in trail.events[0].user_agent

        with pytest.raises(grpc.RpcError) as missing:
            partner.ReportActionState(actions_pb2.ReportActionStateRequest(cue_id=first.id), metadata=())
        reason, violations = _error_info(missing.value)
        assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason == "VALIDATION_FAILED"
        assert [(v.field, v.reason) for v in violations] == [("query.secret", "missing"), ("body", "missing")]

        with pytest.raises(grpc.RpcError) as partner_token:
            actions.GetAction(
                actions_pb2.GetActionRequest(organization_id=org.id, action_id=first.id),
                metadata=bearer(org.token),
            )
        assert partner_token.value.code() == grpc.StatusCode.UNAUTHENTICATED

        stranger = partner_server.register()
        with pytest.raises(grpc.RpcError) as foreign:
            actions.GetAction(
                actions_pb2.GetActionRequest(organization_id=org.id, action_id=first.id),
                metadata=bearer(stranger),
            )
        assert foreign.value.code() == grpc.StatusCode.NOT_FOUND

        for bad, field in (
            (
                actions_pb2.Action(organization_id=org.id, subject="s", code="reauthenticate"),
                "action.redirect_url_template",
            ),
            (actions_pb2.Action(organization_id=org.id, subject="s", code="Bad-Code"), "action.code"),
            (
                actions_pb2.Action(
                    organization_id=org.id,
                    subject="s",
                    code="reauthenticate",
                    redirect_url_template="https://x.example/{nope}",
                ),
                "action.redirect_url_template",
            ),
            (
                actions_pb2.Action(
                    organization_id=org.id,
                    subject="s",
                    code="reauthenticate",
                    redirect_url_template="{success_url}",
                ),
                "action.redirect_url_template",
            ),
            (
                actions_pb2.Action(
                    organization_id=org.id, subject="s", code="information", redirect_url_template=TEMPLATE
                ),
                "action.redirect_url_template",
            ),
            (
                actions_pb2.Action(
                    organization_id=org.id, subject="s", code="information", required_parameters=["a"]
                ),
                "action.required_parameters",
            ),
            (
                actions_pb2.Action(
                    organization_id=org.id, subject="s", code="x", required_parameters=["location"]
                ),
                "action.required_parameters.0",
            ),
            (actions_pb2.Action(organization_id=org.id, subject="s", code="x", data="[1]"), "action.data"),
            (actions_pb2.Action(organization_id=org.id, subject="", code="x"), "action.subject"),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                actions.CreateAction(actions_pb2.CreateActionRequest(action=bad), metadata=bearer(org.key))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert field in [v.field for v in _error_info(refused.value)[1]], field

        with pytest.raises(grpc.RpcError) as outsider:
            actions.ListActions(
                actions_pb2.ListActionsRequest(
                    organization_id=org.id, subject="s", member_id=str(uuid.uuid4())
                ),
                metadata=bearer(org.key),
            )
        assert outsider.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_events_are_paged(partner_server: Server) -> None:
    org = new_org(partner_server)
    action = create_action(partner_server, org)
    url = link(partner_server, org, action["id"])
    for _ in range(5):
        assert post(url, REAUTH_BODY, org.token).status_code == 200
    seen: list[str] = []
    token = ""
    while True:
        page = httpx.get(
            f"{partner_server.http_url}/v1/organizations/{org.id}/actions/{action['id']}/events",
            params={"page_size": 2, "page_token": token},
            headers=auth(org.key),
        ).json()
        seen += [e["id"] for e in page["events"]]
        token = page["next_page_token"]
        if not token:
            break
    assert len(seen) == len(set(seen)) == 5


def test_admin_commands(partner_server: Server) -> None:
    key = partner_server.register()
    env = {"CUELINE_API_KEY": key, "CUELINE_TARGET": partner_server.grpc_target, "PATH": ""}

    def admin(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cueline_server", "admin", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
        )

    org = admin("org", "create", "--name", "Example Energy")
    assert org.returncode == 0, org.stderr
    org_id = str(uuid.UUID(org.stdout.strip()))
    member = admin("member", "create", "--org", org_id, "--external-ref", "user-7")
    member_id = str(uuid.UUID(member.stdout.strip()))
    client_id, client_secret = admin("client", "create", "--org", org_id, "--name", "backend").stdout.split()
    token = client_token(partner_server, client_id, client_secret)
    user = admin(
        "user",
        "create",
        "--org",
        org_id,
        "--username",
        f"u-{uuid.uuid4().hex[:8]}",
        stdin="a long password\n",
    )
    assert user.returncode == 0, user.stderr
    # On stdin: a token can begin with "-", which argparse would take for an option.
    revoked = admin("token", "revoke", stdin=token + "\n")
    assert revoked.stdout.strip() == "1 tokens revoked", revoked.stderr
    dashed = admin("token", "revoke", "--", "-" + uuid.uuid4().hex)
    assert dashed.stdout.strip() == "0 tokens revoked", dashed.stderr
    assert "disabled" in admin("member", "disable", member_id).stdout
    assert "disabled" in admin("client", "disable", client_id).stdout
    unknown = admin("member", "create", "--org", str(uuid.uuid4()))
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    env["CUELINE_API_KEY"] = ""
    assert admin("org", "create", "--name", "x").returncode == 2


def test_hostile_input_gets_4xx_never_5xx(partner_server: Server) -> None:
    org = new_org(partner_server)
    action = create_action(partner_server, org)
    url = link(partner_server, org, action["id"])
    assert post(url, REAUTH_BODY, org.token).status_code == 200
    state_base = state_url(url).split("?")[0]
    # A secret that is not ASCII fails verification like any other bad secret.
    for secret in ("new.%C3%A9.x", "%C3%A9", "new.abc.%F0%9F%98%80"):
        assert post(f"{state_base}?secret={secret}", {"state": "success"}).status_code == 403, secret
    unparseable = post(url, {"successUrl": "http://[", "cancelUrl": "https://x.example/"}, org.token)
    assert unparseable.status_code == 422
    assert unparseable.json()["detail"][0]["type"] == "value_error"
    for raw in (
        b'{"state": "success", "payload": {"n": 1e400}}',
        b'{"state": "success", "payload": {"s": "\\ud800"}}',
        b'{"state": "success", "payload": {"n": 1' + b"0" * 400 + b"}}",
        b"[" * 30_000 + b"]" * 30_000,
    ):
        response = httpx.post(state_url(url), content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, raw[:40]
        assert response.json() == {"detail": "Cannot parse request body"}, raw[:40]
    # A NUL cannot be stored: refused where it is, and a path holding one names no action.
    nul = post(url, {**REAUTH_BODY, "successUrl": SUCCESS_URL + "\u0000"}, org.token)
    assert nul.status_code == 422 and nul.json()["detail"][0]["loc"] == ["body", "successUrl"]
    nested = post(state_url(url), {"state": "success", "payload": {"s": ["\u0000"]}})
    assert nested.status_code == 422 and nested.json()["detail"][0]["loc"] == ["body", "payload", "s", "0"]
    no_action = f"{state_base.rsplit('/', 2)[0]}/a%00/state?secret=x"
    assert post(no_action, {"state": "success"}).status_code == 404
    # Nothing was half-written: the attempt is still open and reportable.
    assert post(state_url(url), {"state": "success"}).status_code == 200
    with grpc.insecure_channel(partner_server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as bad_data:
            actions_pb2_grpc.ActionServiceStub(channel).CreateAction(
                actions_pb2.CreateActionRequest(
                    action=actions_pb2.Action(organization_id=org.id, subject="s", code="x", data="{")
                ),
                metadata=bearer(org.key),
            )
        assert bad_data.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in _error_info(bad_data.value)[1]] == ["action.data"]


def test_secrets_and_tokens_on_every_endpoint(partner_server: Server) -> None:
    org = new_org(partner_server)
    sibling = new_org(partner_server, org.key)  # another organization of the same account
    reauth = create_action(partner_server, org)
    info = create_action(partner_server, org, code="information", redirect_url_template=None)
    url = link(partner_server, org, reauth["id"])
    assert post(url, REAUTH_BODY, org.token).status_code == 200
    codec = SecretCodec(KEYS, "new")
    now = dt.datetime.now(dt.UTC)
    member = uuid.UUID(org.member)
    state_base = state_url(url).split("?")[0]
    for secret in (
        codec.mint(uuid.UUID(reauth["id"]), member, now - dt.timedelta(hours=2))[0],
        codec.mint(uuid.UUID(reauth["id"]), uuid.UUID(sibling.member), now)[0],
    ):
        assert post(f"{state_base}?secret={secret}", {"state": "success"}).status_code == 403
    info_url = link(partner_server, org, info["id"])
    assert post(info_url, {}, sibling.token).status_code == 404  # another organization's Bearer
    expired = codec.mint(uuid.UUID(info["id"]), member, now - dt.timedelta(hours=2))[0]
    assert post(f"{info_url.split('?')[0]}?secret={expired}", {}, org.token).status_code == 403
    assert post(info_url, {}, org.token).status_code == 200

    stranger = partner_server.register()
    with grpc.insecure_channel(partner_server.grpc_target) as channel:
        actions = actions_pb2_grpc.ActionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as foreign_member:
            actions.ListActions(
                actions_pb2.ListActionsRequest(
                    organization_id=org.id, subject=SUBJECT, member_id=sibling.member
                ),
                metadata=bearer(org.key),
            )
        assert foreign_member.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        calls = (
            lambda: actions.ListActions(
                actions_pb2.ListActionsRequest(organization_id=org.id, subject=SUBJECT, member_id=org.member),
                metadata=bearer(stranger),
            ),
            lambda: actions.ListActionEvents(
                actions_pb2.ListActionEventsRequest(organization_id=org.id, action_id=reauth["id"]),
                metadata=bearer(stranger),
            ),
            lambda: actions.CreateAction(
                actions_pb2.CreateActionRequest(
                    action=actions_pb2.Action(organization_id=org.id, subject="s", code="x")
                ),
                metadata=bearer(stranger),
            ),
        )
        for call in calls:
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_partner_flow_over_native_grpc(partner_server: Server) -> None:
    org = new_org(partner_server)
    username = f"grpc-{uuid.uuid4().hex[:8]}"
    action = create_action(partner_server, org)
    secret = parse_qs(urlsplit(link(partner_server, org, action["id"])).query)["secret"][0]
    with grpc.insecure_channel(partner_server.grpc_target) as channel:
        directory_pb2_grpc.PartnerDirectoryServiceStub(channel).CreateUser(
            directory_pb2.CreateUserRequest(
                organization_id=org.id, username=username, password="long enough"
            ),
            metadata=bearer(org.key),
        )
        token_request = auth_pb2.IssueTokenRequest()
        token_request.body.update({"grant_type": "password", "username": username, "password": "long enough"})
        issued = auth_pb2_grpc.PartnerAuthServiceStub(channel).IssueToken(token_request)
        assert issued.token_type == "Bearer" and issued.expires_in == 36000 and issued.refresh_token
        partner = actions_pb2_grpc.PartnerActionServiceStub(channel)
        resolve = actions_pb2.ResolveActionRequest(cue_id=action["id"], secret=secret)
        resolve.body.update({"successUrl": SUCCESS_URL, "cancelUrl": CANCEL_URL, "language": "fr"})
        started = partner.ResolveAction(resolve, metadata=bearer(issued.access_token))
        assert "lang=fr" in str(started.result["redirect_url"])
        report = actions_pb2.ReportActionStateRequest(cue_id=action["id"], secret=secret)
        report.body.update({"state": "fail", "payload": {"attempts": 3}})
        assert partner.ReportActionState(report).action_id == action["id"]
        with pytest.raises(grpc.RpcError) as nothing_open:
            partner.ReportActionState(report)
        assert nothing_open.value.code() == grpc.StatusCode.NOT_FOUND
        assert _error_info(nothing_open.value)[0] == "NO_ATTEMPT_IN_PROGRESS"
    trail = events(partner_server, org, action["id"])
    assert trail[1]["payload"] == {"attempts": 3} and trail[1]["state"] == "fail"
