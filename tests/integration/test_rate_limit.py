"""Rate limiting (contract §2.10) on a live server with a small limit."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest
from google.protobuf.struct_pb2 import Struct

from cueline.partner.v1 import auth_pb2, auth_pb2_grpc
from cueline.v1 import accounts_pb2, accounts_pb2_grpc
from tests.support import Server, auth, bearer

LIMIT = 5
HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


@pytest.fixture
def limited(database_url: str) -> Iterator[Server]:
    server = Server(database_url, env={"CUELINE_DEFAULT_RATE_LIMIT_PER_MINUTE": str(LIMIT)}).start()
    yield server
    server.stop()


def remaining(response: httpx.Response) -> int:
    return int(response.headers["x-ratelimit-remaining"])


def test_an_account_gets_its_limit_then_429_with_an_integer_retry_after(limited: Server) -> None:
    key = limited.register()
    with httpx.Client(base_url=limited.http_url, headers=auth(key)) as client:
        allowed = [client.get("/v1/cues") for _ in range(LIMIT)]
        assert [r.status_code for r in allowed] == [200] * LIMIT
        assert [remaining(r) for r in allowed] == [4, 3, 2, 1, 0]
        assert {r.headers["x-ratelimit-limit"] for r in allowed} == {str(LIMIT)}
        # Reset: epoch seconds at which the oldest counted request leaves the 60 s window.
        resets = {int(r.headers["x-ratelimit-reset"]) for r in allowed}
        assert len(resets) <= 2 and max(resets) - min(resets) <= 1

        refused = client.post("/v1/cues", json={"name": "x"})
        assert refused.status_code == 429
        retry_after = refused.headers["retry-after"]
        assert retry_after.isdigit() and 1 <= int(retry_after) <= 60
        assert refused.json() == {
            "error": {
                "code": "rate_limit_exceeded",
                "message": f"Too many requests. Retry after {retry_after} seconds.",
                "status": 429,
            }
        }
        assert refused.headers["content-type"] == "application/json" and refused.headers["x-request-id"]
        assert (refused.headers["x-ratelimit-limit"], remaining(refused)) == (str(LIMIT), 0)
        assert int(refused.headers["x-ratelimit-reset"]) == min(resets)
        assert client.get("/v1/cues").status_code == 429
        assert client.get("/v1/no-such-route").status_code == 429

        for probe in ("/health", "/status", "/healthz", "/openapi.json"):
            response = client.get(probe)
            assert response.status_code == 200, probe
            assert not any(h in response.headers for h in HEADERS), probe

    # gRPC is not limited, and shows that the refusals were not counted.
    with grpc.insecure_channel(limited.grpc_target) as channel:
        usage = accounts_pb2_grpc.AccountServiceStub(channel).GetUsage(
            accounts_pb2.GetUsageRequest(), metadata=bearer(key)
        )
    assert (usage.rate_limit.limit, usage.rate_limit.current_usage) == (LIMIT, LIMIT)


def test_accounts_are_limited_apart_and_requests_without_a_valid_key_per_ip(limited: Server) -> None:
    first, second = limited.register(), limited.register()  # 2 of the IP's 5
    with httpx.Client(base_url=limited.http_url) as client:
        for _ in range(LIMIT):
            client.get("/v1/cues", headers=auth(first))
        assert client.get("/v1/cues", headers=auth(first)).status_code == 429
        other = client.get("/v1/usage", headers=auth(second))
        assert other.status_code == 200 and remaining(other) == LIMIT - 1
        assert other.json()["rate_limit"] == {"limit": 5, "requests_per_minute": 5, "current_usage": 1}

        bad = auth("cue_sk_" + "0" * 32)
        answers = [client.get("/v1/cues", headers=bad), client.get("/v1/cues")]
        assert [(r.status_code, r.json()["error"]["code"], remaining(r)) for r in answers] == [
            (401, "invalid_api_key", 2),
            (401, "invalid_api_key", 1),
        ]
        assert remaining(client.post("/v1/auth/register", json={"email": "not-an-email"})) == 0
        refused = client.post("/v1/auth/register", json={"email": "late@example.com"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        # The account limits are untouched by the IP's.
        assert client.get("/v1/auth/me", headers=auth(second)).status_code == 200
        # The partner surface has no rate limit, except its credential endpoints, which have
        # a budget per IP of their own and refuse in their surface's style.
        state = client.post(f"/api/partners/v2.0/cues/{uuid.uuid4()}/state?secret=x", json={"state": "fail"})
        assert state.status_code == 404 and not any(h in state.headers for h in HEADERS)
        token = "/api/partners/v2.0/auth/token"
        answers = [client.post(token, json={"grant_type": "password"}) for _ in range(LIMIT)]
        assert [a.status_code for a in answers] == [422] * LIMIT
        refused = client.post(token, json={"grant_type": "password"})
        retry_after = refused.headers["retry-after"]
        assert refused.status_code == 429 and retry_after.isdigit()
        assert refused.json() == {"detail": f"Too many requests. Retry after {retry_after} seconds."}
        # Both credential endpoints share the budget; /oauth2/token/ refuses the RFC 6749 way.
        oauth = client.post("/oauth2/token/", json={"grant_type": "client_credentials"})
        assert oauth.status_code == 429 and oauth.json() == {"error": "slow_down"}


def test_grpc_calls_without_credentials_spend_the_same_per_ip_budgets(limited: Server) -> None:
    """Register and the partner token grants need no credentials over gRPC
    either: they spend their REST routes' budgets for the client's IP."""
    with grpc.insecure_channel(limited.grpc_target) as channel:
        accounts = accounts_pb2_grpc.AccountServiceStub(channel)
        tokens = auth_pb2_grpc.PartnerAuthServiceStub(channel)
        for index in range(LIMIT):
            accounts.Register(accounts_pb2.RegisterRequest(email=f"grpc{index}@example.com"))
        with pytest.raises(grpc.RpcError) as refused:  # a forged X-Forwarded-For changes nothing
            accounts.Register(
                accounts_pb2.RegisterRequest(email="late@example.com"),
                metadata=(("x-forwarded-for", "203.0.113.9"),),
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Retry after" in (refused.value.details() or "")
        with httpx.Client(base_url=limited.http_url) as client:
            rest = client.post("/v1/auth/register", json={"email": "rest@example.com"})
            assert rest.status_code == 429 and rest.json()["error"]["code"] == "rate_limit_exceeded"

            # The credential grants: wrong guesses until the budget is spent, over gRPC, then REST.
            guess = Struct()
            guess.update({"grant_type": "password", "username": "nobody", "password": "guess"})
            answers = []
            for _ in range(LIMIT + 1):
                try:
                    tokens.IssueToken(auth_pb2.IssueTokenRequest(body=guess))
                    answers.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    answers.append(error.code())
            assert (
                grpc.StatusCode.RESOURCE_EXHAUSTED not in answers[:LIMIT]
                and grpc.StatusCode.OK not in answers
            )
            assert answers[LIMIT] == grpc.StatusCode.RESOURCE_EXHAUSTED
            oauth = client.post("/oauth2/token/", json={"grant_type": "client_credentials"})
            assert oauth.status_code == 429 and oauth.json() == {"error": "slow_down"}


def test_behind_a_trusted_proxy_grpc_budgets_are_per_forwarded_client(database_url: str) -> None:
    """gRPC metadata's X-Forwarded-For names the client when the peer is a
    trusted proxy, as the HTTP header does; from any other peer it is ignored."""
    proxied = Server(
        database_url,
        env={"CUELINE_DEFAULT_RATE_LIMIT_PER_MINUTE": str(LIMIT), "CUELINE_TRUSTED_PROXIES": "127.0.0.1/32"},
    ).start()
    try:
        with grpc.insecure_channel(proxied.grpc_target) as channel:
            accounts = accounts_pb2_grpc.AccountServiceStub(channel)

            def register(client: str) -> grpc.StatusCode:
                try:
                    accounts.Register(
                        accounts_pb2.RegisterRequest(email=f"{uuid.uuid4().hex}@example.com"),
                        metadata=(("x-forwarded-for", f"{client}, 10.0.0.1"),),
                    )
                except grpc.RpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            assert [register("203.0.113.7") for _ in range(LIMIT + 1)] == [grpc.StatusCode.OK] * LIMIT + [
                grpc.StatusCode.RESOURCE_EXHAUSTED
            ]
            assert register("203.0.113.8") == grpc.StatusCode.OK
    finally:
        proxied.stop()


def test_the_switch_turns_limiting_and_its_headers_off(database_url: str) -> None:
    server = Server(
        database_url,
        env={"CUELINE_RATE_LIMIT_ENABLED": "false", "CUELINE_DEFAULT_RATE_LIMIT_PER_MINUTE": "1"},
    ).start()
    try:
        key = server.register()
        with httpx.Client(base_url=server.http_url, headers=auth(key)) as client:
            responses = [client.get("/v1/cues") for _ in range(3)] + [client.get("/v1/auth/me")]
            assert [r.status_code for r in responses] == [200] * 4
            assert not any(h in r.headers for r in responses for h in HEADERS)
            assert responses[-1].json()["rate_limit_per_minute"] == 1  # stored, reported, not enforced
            assert client.get("/v1/usage").json()["rate_limit"]["current_usage"] == 0
    finally:
        server.stop()
