"""Route matching: literal segments beat variables; additional bindings reach the same RPC."""

from __future__ import annotations

import dataclasses

import pytest

from cueline_server.api.descriptors import HttpBinding, MethodInfo, methods
from cueline_server.api.transcoder import Router
from cueline_server.errors import ApiError


def by_name(name: str) -> MethodInfo:
    return next(m for m in methods() if m.name == name)


def test_literal_segments_take_precedence_over_variables() -> None:
    get = by_name("GetExecution")
    listing = dataclasses.replace(
        by_name("ListExecutions"), bindings=(HttpBinding("GET", "/v1/executions/claimable", "", ""),)
    )
    router = Router((get, listing))
    route, values = router.match("GET", ["v1", "executions", "claimable"])
    assert route.method.name == "ListExecutions" and values == {}
    route, values = router.match("GET", ["v1", "executions", "abc"])
    assert route.method.name == "GetExecution" and values == {"execution_id": "abc"}


def test_additional_bindings_route_to_one_method_and_decode_variables() -> None:
    method = dataclasses.replace(
        by_name("DeleteWorker"),
        bindings=(
            HttpBinding("DELETE", "/v1/workers/{worker_id}", "", ""),
            HttpBinding("POST", "/v1/workers/{worker_id}:forget", "", ""),
        ),
    )
    with pytest.raises(ValueError, match="unsupported path template"):
        Router((method,))
    method = dataclasses.replace(
        method,
        bindings=(
            HttpBinding("DELETE", "/v1/workers/{worker_id}", "", ""),
            HttpBinding("POST", "/v1/workers/{worker_id}/forget", "", ""),
        ),
    )
    router = Router((method,))
    requests = (("DELETE", ["v1", "workers", "a%2Fb"]), ("POST", ["v1", "workers", "a%2Fb", "forget"]))
    for verb, parts in requests:
        route, values = router.match(verb, parts)
        assert route.method.name == "DeleteWorker" and values == {"worker_id": "a/b"}


def test_unknown_paths_and_wrong_methods() -> None:
    router = Router(methods())
    with pytest.raises(ApiError) as missing:
        router.match("GET", ["v1", "nope"])
    assert (missing.value.http_status, missing.value.code) == (404, "http_error")
    with pytest.raises(ApiError) as wrong:
        router.match("PUT", ["v1", "cues"])
    assert (wrong.value.http_status, wrong.value.code) == (405, "http_error")


def test_a_literal_path_with_another_verb_is_405_not_a_variable_route() -> None:
    """GET /v1/executions/claim is not GET /v1/executions/{execution_id}."""
    router = Router(methods())
    for verb, parts in (("GET", ["v1", "executions", "claim"]), ("PATCH", ["v1", "executions", "claimable"])):
        with pytest.raises(ApiError) as wrong:
            router.match(verb, parts)
        assert (wrong.value.http_status, wrong.value.code) == (405, "http_error")
    route, values = router.match("GET", ["v1", "executions", "an-id"])
    assert route.method.name == "GetExecution" and values == {"execution_id": "an-id"}
    assert router.match("POST", ["v1", "executions", "claim"])[0].method.name == "ClaimNextExecution"
