"""The JSON rules of the contract (§2.7), checked on the codec alone."""

from __future__ import annotations

import datetime as dt
import json

import orjson
import pytest

from cueline.v1 import cues_pb2, executions_pb2, outcomes_pb2
from cueline_server.api import jsoncodec
from cueline_server.api.jsoncodec import (
    Reader,
    compact_json,
    format_timestamp,
    message_json_bytes,
    parse_datetime,
    render,
    to_json_bytes,
)


def test_render_emits_every_field_with_nulls_numbers_and_wire_enums() -> None:
    execution = executions_pb2.Execution(
        id="e",
        cue_id="c",
        status=executions_pb2.EXECUTION_STATUS_RETRY_READY,
        payload='{"n":12345678901234567890}',
    )
    out = render(execution)
    assert out["status"] == "retry_ready"
    assert out["triggered_by"] is None  # the zero enum value is null
    assert out["outcome"] is None and out["outcome_success"] is None and out["http_status"] is None
    assert out["attempts"] == 0  # defaults are emitted, as numbers
    assert out["payload"] == {"n": 12345678901234567890}
    cue = render(cues_pb2.Cue(run_count=2**40))
    assert cue["run_count"] == 2**40 and isinstance(cue["run_count"], int)
    assert cue["callback"] is None and "transport" not in (cue["callback"] or {})


def test_responses_embed_json_text_as_stored_and_match_the_parsed_rendering() -> None:
    """The REST responses embed JSON text fields without parsing them: the bytes
    are those of the parsed rendering, integers of any size and non-ASCII
    text included, and an empty text is still null."""
    stored = '{"n":12345678901234567890,"name":"Zoë","list":[1.5,null,{"a":true}]}'
    listed = executions_pb2.ListClaimableExecutionsResponse()
    listed.executions.add(execution_id="e", payload=stored)
    listed.executions.add(execution_id="f", payload="")
    wire = message_json_bytes(listed)
    assert wire == compact_json(render(listed)).encode()
    assert stored.encode() in wire
    assert json.loads(wire)["executions"][1]["payload"] is None


def test_claimable_items_rendered_before_are_reused_only_while_unchanged() -> None:
    """Claimable items are remembered by their wire bytes: a repeated item
    renders from memory, a changed one anew (an unset and an empty task
    included), a large one is not remembered, and everything after the memory
    is cleared still renders right. Other lists' items are not remembered."""
    jsoncodec._REMEMBERED.clear()
    listed = executions_pb2.ListClaimableExecutionsResponse()
    first = listed.executions.add(execution_id="e", cue_name="a", payload='{"n":1}', attempt=1)
    first.scheduled_for.FromDatetime(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    listed.executions.add(execution_id="big", payload=compact_json({"x": "y" * (jsoncodec._ITEM_BYTES + 1)}))
    plain = compact_json(render(listed)).encode()
    assert message_json_bytes(listed) == plain
    assert len(jsoncodec._REMEMBERED) == 1  # the small item only
    jsoncodec._REMEMBERED[next(iter(jsoncodec._REMEMBERED))] = orjson.Fragment(b'{"from":"memory"}')
    assert json.loads(message_json_bytes(listed))["executions"][0] == {"from": "memory"}
    jsoncodec._REMEMBERED.clear()
    first.attempt = 2
    first.payload = '{"n":2}'
    changed = json.loads(message_json_bytes(listed))["executions"][0]
    assert (changed["attempt"], changed["payload"]) == (2, {"n": 2})
    first.task = ""
    assert json.loads(message_json_bytes(listed))["executions"][0]["task"] == ""
    first.ClearField("task")
    assert json.loads(message_json_bytes(listed))["executions"][0]["task"] is None
    for n in range(jsoncodec._REMEMBERED_ITEMS + 1):
        one = executions_pb2.ListClaimableExecutionsResponse()
        one.executions.add(execution_id=f"x{n}")
        assert json.loads(message_json_bytes(one))["executions"][0]["execution_id"] == f"x{n}"
    assert len(jsoncodec._REMEMBERED) <= jsoncodec._REMEMBERED_ITEMS
    assert message_json_bytes(listed) == compact_json(render(listed)).encode()
    jsoncodec._REMEMBERED.clear()
    executions = executions_pb2.ListExecutionsResponse()
    executions.executions.add(id="e")
    assert json.loads(message_json_bytes(executions))["executions"][0]["id"] == "e"
    assert not jsoncodec._REMEMBERED


def test_an_integer_beyond_64_bits_outside_json_text_is_encoded_whole() -> None:
    """An error that echoes the caller's input can hold any integer."""
    echoed = {"detail": [{"loc": ["body", "max_attempts"], "input": 10**30}]}
    assert json.loads(to_json_bytes(echoed)) == echoed


def test_input_only_fields_are_never_rendered() -> None:
    cue = cues_pb2.Cue(callback=cues_pb2.Callback(url="https://x", transport="worker"))
    assert render(cue)["callback"] == {"url": "https://x", "method": None, "headers": {}}


def test_timestamps_are_utc_with_at_most_six_digits() -> None:
    moment = dt.datetime(2026, 3, 13, 9, 1, 23, 412000, tzinfo=dt.UTC)
    assert format_timestamp(moment) == "2026-03-13T09:01:23.412Z"
    assert format_timestamp(moment.replace(microsecond=0)) == "2026-03-13T09:01:23Z"
    assert parse_datetime("2026-03-13T10:01:23+01:00") == moment.replace(microsecond=0)
    assert parse_datetime("2026-03-13T09:01:23") == moment.replace(microsecond=0)  # no offset: UTC
    for past_the_calendar in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        with pytest.raises(ValueError, match="years 1 to 9999"):
            parse_datetime(past_the_calendar)


def test_reader_collects_violations_with_rest_locations() -> None:
    reader = Reader()
    request = cues_pb2.CreateCueRequest()
    reader.read_object(
        request.cue,
        {
            "name": 5,
            "retry": {"max_attempts": "3", "backoff_minutes": [1, True]},
            "transport": "nope",
            "x": 1,
        },
        "body",
    )
    assert [(v.field, v.message) for v in reader.violations] == [
        ("body.name", "Input should be a valid string"),
        ("body.retry.max_attempts", "Input should be a valid integer"),
        ("body.retry.backoff_minutes.1", "Input should be a valid integer"),
        ("body.transport", "Input should be 'webhook' or 'worker'"),
    ]


def test_reader_records_present_paths_for_update_masks() -> None:
    reader = Reader(reject_unknown=True)
    cue = cues_pb2.Cue()
    reader.read_object(
        cue, {"description": None, "retry": {"max_attempts": 2}, "payload": {"a": 1}, "zz": 0}, "body"
    )
    assert reader.present == ["description", "retry.max_attempts", "payload"]
    assert [v.field for v in reader.violations] == ["body.zz"]
    assert cue.payload == '{"a":1}'


@pytest.mark.parametrize("value", [True, 1.5, "x", None, [1]])
def test_booleans_are_strict(value: object) -> None:
    reader = Reader()
    request = outcomes_pb2.RecordOutcomeRequest()
    reader.read_object(request, {"success": value}, "body")
    if value is None:
        assert not request.HasField("success") and not reader.violations
    elif value is True:
        assert request.success is True and not reader.violations
    else:
        assert reader.violations[0].message == "Input should be a valid boolean"
