"""Hostile input on every route of both transports: whatever a client sends, its
mistake is answered as one (4xx over REST, a status other than INTERNAL or
UNKNOWN over gRPC), never as a server error.

The values include what once got a 500: NUL characters, timestamps beyond what
protobuf allows or whose offset takes them past the years 1-9999, JSON nested
hundreds of levels deep, enum numbers the proto does not define, callback URLs
with a broken IPv6 bracket or port, and zone names the zone database refuses as
directories."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cueline_server.api.descriptors import methods
from tests.support import Server, auth, bearer


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


HOSTILE: list[Any] = [
    None, True, -1, 2**31, 2**63, 1e308, "", "x" * 70_000, "nul\u0000", "é☃𝄞", " \t\n",
    "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "2024-02-30T00:00:00Z", "9999-12-31T23:59:59-01:00",
    "0001-01-01T00:00:00+01:00", "America", "https://[zz]/", {"deep": _nested(900)},
    "https://x.example:99999/", [], [None, 1, "a"], {}, {"a": {"b": "\u0000"}},
]  # fmt: skip


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, headers=auth(server.register()), timeout=60) as client:
        yield client


def _schema(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        found: dict[str, Any] = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        return found
    return schema


def _bodies(spec: dict[str, Any], operation: dict[str, Any]) -> Iterator[Any]:
    """Each hostile value as the body, as each property, and as each property of those."""
    yield from HOSTILE
    body = operation.get("requestBody")
    if body is None:
        return
    schema = _schema(spec, body["content"]["application/json"]["schema"])
    for name, field_schema in schema.get("properties", {}).items():
        for value in HOSTILE:
            yield {name: value}
            for inner in _schema(spec, field_schema).get("properties", {}):
                yield {name: {inner: value}}


def _resolve(template: str, parameters: list[dict[str, Any]], known: dict[str, str]) -> str:
    """The path with its variables filled: known ids, else a fresh UUID."""
    path = template
    for parameter in parameters:
        if parameter["in"] == "path":
            path = path.replace(
                "{" + parameter["name"] + "}", known.get(parameter["name"], str(uuid.uuid4()))
            )
    return path


def test_no_rest_route_answers_a_server_error(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    names = (f"hostile-{n}" for n in itertools.count())
    worker_cue = {"transport": "worker", "schedule": {"type": "recurring", "cron": "* * * * *"}}

    def new_cue() -> str:
        response = client.post("/v1/cues", json={"name": next(names), **worker_cue})
        assert response.status_code == 201, response.text
        cue_id: str = response.json()["id"]
        return cue_id

    cue_id = new_cue()
    execution_id = client.post(f"/v1/cues/{cue_id}/fire", json={}).json()["id"]
    known = {"cue_id": cue_id, "execution_id": execution_id, "worker_id": "w"}
    failures = []

    def send(verb: str, path: str, **request: Any) -> None:
        response = client.request(verb.upper(), path, **request)
        if response.status_code >= 500:
            failures.append((verb, path, repr(request)[:80], response.status_code))
        if verb == "delete" and path.startswith("/v1/cues/") and response.status_code == 204:
            known["cue_id"] = new_cue()

    for template, operations in spec["paths"].items():
        for verb, operation in operations.items():
            parameters = operation.get("parameters", [])
            for body in _bodies(spec, operation):
                send(verb, _resolve(template, parameters, known), json=body)
            for parameter in parameters:
                if parameter["in"] == "query":
                    for value in (
                        "", "nul\u0000", "-1", "99999999999999999999", "America", "a" * 3000,
                        "9999-12-31T23:59:59-01:00",
                    ):  # fmt: skip
                        send(verb, _resolve(template, parameters, known), params={parameter["name"]: value})
    assert not failures, failures


# One hostile value at a time per field type, the rest of the request left as it is.
_BY_TYPE: dict[int, list[Any]] = {
    FieldDescriptor.TYPE_STRING: [
        "",
        "a" * 300,
        "x" * 70_000,
        "nul\u0000",
        "America",
        "https://[zz]/",
        '{"a":' + "[" * 400 + "]" * 400 + "}",
        '{"a": ["\\u0000"]}',
    ],
    FieldDescriptor.TYPE_BOOL: [True],
    FieldDescriptor.TYPE_ENUM: [99],
    FieldDescriptor.TYPE_INT32: [-1, 2**31 - 1, -(2**31)],
    FieldDescriptor.TYPE_INT64: [-1, 2**63 - 1, -(2**63)],
    FieldDescriptor.TYPE_DOUBLE: [float("nan"), 1e308],
}
_TIMES = [(253_402_300_800, 0), (-62_135_596_801, 0), (0, 1_000_000_000), (253_402_300_799, 999_999_999)]


def _paths(descriptor: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every scalar and Timestamp field, through singular messages, with its descriptor."""
    for f in descriptor.fields:
        path = (*prefix, f.name)
        if f.message_type is None or f.message_type.full_name == Timestamp.DESCRIPTOR.full_name:
            yield path, f
        elif (
            not f.is_repeated
            and not f.message_type.full_name.startswith("google.protobuf.")
            and len(path) < 3
        ):
            yield from _paths(f.message_type, path)


def _with(request: Message, path: tuple[str, ...], f: Any, value: Any) -> Message:
    changed = type(request)()
    changed.CopyFrom(request)
    target = changed
    for name in path[:-1]:
        target = getattr(target, name)
    if f.message_type is not None:
        getattr(target, path[-1]).CopyFrom(Timestamp(seconds=value[0], nanos=value[1]))
    elif f.is_repeated:
        getattr(target, path[-1]).append(value)
    else:
        setattr(target, path[-1], value)
    return changed


def test_no_grpc_method_answers_internal(server: Server, client: httpx.Client) -> None:
    """Each field of each method's request in turn gets a hostile value, with real
    ids in the id fields so that the call gets past the lookups."""
    worker_cue = {"transport": "worker", "schedule": {"type": "recurring", "cron": "* * * * *"}}
    # One cue the calls may change or delete, another that only fires their executions.
    cue_id, source = (client.post("/v1/cues", json={"name": n, **worker_cue}).json()["id"] for n in "ab")
    ids = {"cue_id": cue_id, "worker_id": "w"}
    metadata = bearer(client.headers["Authorization"].removeprefix("Bearer "))
    failures = []
    calls = 0
    with grpc.insecure_channel(server.grpc_target) as channel:
        for method in methods():
            if method.name == "RegenerateApiKey":  # its one field, set, revokes this test's key
                continue
            call = channel.unary_unary(
                method.full_name,
                request_serializer=method.request_class.SerializeToString,
                response_deserializer=method.response_class.FromString,
            )
            base = method.request_class()
            for name, value in ids.items():
                if name in base.DESCRIPTOR.fields_by_name:
                    setattr(base, name, value)
            for path, f in _paths(base.DESCRIPTOR):
                if "execution_id" in base.DESCRIPTOR.fields_by_name:  # a fresh one: outcomes are write-once
                    fired = client.post(f"/v1/cues/{source}/fire", json={}).json()["id"]
                    base.execution_id = fired  # type: ignore[attr-defined]
                values = _TIMES if f.message_type is not None else _BY_TYPE.get(f.type, [0])
                for value in values:
                    calls += 1
                    try:
                        call(_with(base, path, f, value), metadata=metadata, timeout=30)
                    except grpc.RpcError as error:
                        if error.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                            failures.append((method.full_name, ".".join(path), repr(value)[:40]))
    assert calls > 500 and not failures, (calls, failures)
