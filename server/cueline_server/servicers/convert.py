"""Conversions shared by the servicers: enums by wire name, timestamps, the
generic flattening of a resource message into a draft of given values."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from google.protobuf.message import Message

from cueline_server.api.descriptors import FieldInfo, enum_info, message_info
from cueline_server.api.jsoncodec import set_timestamp, timestamp_to_datetime


def to_enum(enum: Any, wire: str | None) -> Any:
    """The enum value with this wire name (the generated enum types are distinct per enum)."""
    if wire is None:
        return 0
    return enum_info(enum.DESCRIPTOR).from_wire[wire]


def from_enum(enum: Any, value: int) -> str | None:
    return enum_info(enum.DESCRIPTOR).to_wire.get(value)


def put_time(target: Any, value: dt.datetime | None) -> None:
    """Set a Timestamp field (given as the field's message) when value is not None."""
    if value is not None:
        set_timestamp(target, value)


def get_time(message: Message, name: str) -> dt.datetime | None:
    return timestamp_to_datetime(getattr(message, name)) if message.HasField(name) else None


def _leaf_value(message: Message, f: FieldInfo) -> Any:
    value = getattr(message, f.name)
    if f.is_map:
        return dict(value)
    if f.repeated:
        return list(value)
    if f.is_timestamp:
        return timestamp_to_datetime(value) if message.HasField(f.name) else None
    if f.enum is not None:
        return enum_info(f.enum).to_wire.get(value)
    if f.has_presence and not message.HasField(f.name):
        return None
    return value


def _set(message: Message, f: FieldInfo) -> bool:
    if f.repeated or f.is_map:
        return len(getattr(message, f.name)) > 0
    if f.has_presence or f.message is not None:
        return message.HasField(f.name)
    return bool(getattr(message, f.name))


def draft(resource: Message, mask: Iterable[str] | None = None) -> dict[str, Any]:
    """The given values of a resource message, by dotted path.

    Without a mask (create): every set leaf. With a mask (update): each leaf
    the mask names, set or not (unset means null), and the set leaves under a
    masked message path."""
    paths = None if mask is None else set(mask)
    out: dict[str, Any] = {}

    def walk(message: Message, prefix: str, covered: bool) -> None:
        for f in message_info(message.DESCRIPTOR).fields:
            if f.output_only:
                continue
            path = prefix + f.name
            if f.is_plain_message and not f.repeated:
                walk(getattr(message, f.name), path + ".", covered or (paths is not None and path in paths))
                continue
            if paths is None or covered:
                if _set(message, f):
                    out[path] = _leaf_value(message, f)
            elif path in paths:
                out[path] = _leaf_value(message, f)

    walk(resource, "", False)
    return out
