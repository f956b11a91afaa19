"""JSON <-> protobuf for the REST surfaces, driven by the descriptors.

protobuf's own JSON mapping gets several of the documented rules wrong, so
this codec applies them instead:

- every field is emitted, unset ones as null (repeated as [], maps as {});
- 64-bit integers are JSON numbers, never strings;
- enums are their lower-case wire names (see descriptors.EnumInfo);
- timestamps are RFC 3339 UTC with a Z and at most 6 fractional digits;
- fields marked json_text carry JSON verbatim (integers keep every digit);
- INPUT_ONLY fields are never emitted, `inline` message fields are flattened.

Reading collects every problem as a Violation whose field is the REST
location (`body.retry.max_attempts`), and records which paths were present,
from which the transcoder builds an update_mask.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable
from functools import cache, lru_cache, partial
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cueline_server.api.descriptors import TIMESTAMP, FieldInfo, enum_info, message_info
from cueline_server.errors import Violation

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_INT_TYPES = {
    FieldDescriptor.CPPTYPE_INT32: (INT32_MIN, INT32_MAX),
    FieldDescriptor.CPPTYPE_INT64: (INT64_MIN, INT64_MAX),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_CPPTYPE_DOUBLE = FieldDescriptor.CPPTYPE_DOUBLE
_CPPTYPE_FLOAT = FieldDescriptor.CPPTYPE_FLOAT
_CPPTYPE_BOOL = FieldDescriptor.CPPTYPE_BOOL
_CPPTYPE_ENUM = FieldDescriptor.CPPTYPE_ENUM
_CPPTYPE_STRING = FieldDescriptor.CPPTYPE_STRING
_CPPTYPE_MESSAGE = FieldDescriptor.CPPTYPE_MESSAGE


STRUCT = "google.protobuf.Struct"
SAFE_INTEGER = 2**53


def _whole_numbers(value: Any) -> Any:
    """JSON read from a Struct, whose numbers are all doubles, with whole numbers as integers."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= SAFE_INTEGER:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def struct_to_json(message: Message) -> Any:
    """A google.protobuf.Struct as plain JSON."""
    return _whole_numbers(json_format.MessageToDict(message))


def compact_json(value: Any) -> str:
    """The compact UTF-8 form sizes are measured on."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of range")
    return value


_STRICT = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)

# How deep JSON input may nest (objects and arrays): deeper input is refused as
# unreadable, before anything walks it.
MAX_JSON_DEPTH = 64


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def loads(data: bytes | str) -> Any:
    """Strict JSON: NaN, Infinity and numbers beyond a double are refused, and so are
    lone UTF-16 surrogates (they cannot be stored) and nesting deeper than
    MAX_JSON_DEPTH; integers keep every digit. Every failure is a ValueError."""
    # What json.loads does, with one decoder for every call instead of a new one each.
    text = data.decode(json.detect_encoding(data), "surrogatepass") if isinstance(data, bytes) else data
    if text.startswith("\ufeff"):
        raise ValueError("Unexpected UTF-8 BOM")
    try:
        value = _STRICT.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    escapes = (b"\\ud", b"\\uD") if isinstance(data, bytes) else ("\\ud", "\\uD")
    if escapes[0] in data or escapes[1] in data:  # type: ignore[operator]
        compact_json(value).encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate
    return value


# --- timestamps -----------------------------------------------------------------------------------


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NAIVE_EPOCH = _EPOCH.replace(tzinfo=None)


def format_timestamp(value: dt.datetime) -> str:
    return _rfc3339(value.astimezone(dt.UTC).replace(tzinfo=None))


def render_timestamp(ts: Timestamp) -> str:
    """format_timestamp(timestamp_to_datetime(ts)) without the time zone arithmetic."""
    return _timestamp_text(ts.seconds, ts.nanos)


@lru_cache(maxsize=4096)
def _timestamp_text(seconds: int, nanos: int) -> str:
    # Remembered: lists show the same executions' times request after request,
    # and a look-up costs a tenth of formatting one.
    return _rfc3339(_NAIVE_EPOCH + dt.timedelta(seconds=seconds, microseconds=nanos // 1000))


def _rfc3339(utc: dt.datetime) -> str:
    text = utc.isoformat()  # fractional digits only when microsecond != 0
    return (text.rstrip("0") if utc.microsecond else text) + "Z"


def timestamp_to_datetime(ts: Timestamp) -> dt.datetime:
    return _EPOCH + dt.timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def set_timestamp(ts: Timestamp, value: dt.datetime) -> None:
    since = value - _EPOCH
    ts.seconds = since.days * 86400 + since.seconds
    ts.nanos = since.microseconds * 1000


def parse_datetime(text: str) -> dt.datetime:
    """ISO 8601; no offset means UTC. ValueError also for a time whose offset
    takes it out of the years 1-9999 (0001-01-01T00:00:00+01:00)."""
    value = dt.datetime.fromisoformat(text.strip())
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is outside the years 1 to 9999 in UTC") from None


# --- rendering ------------------------------------------------------------------------------------


def render(message: Message, *, fragments: bool = False) -> dict[str, Any]:
    """A message as the REST surfaces show it (the rules in the module docstring).
    With `fragments`, JSON text fields are orjson Fragments, for orjson to
    embed as stored instead of parsing and encoding them again; the request
    validation let only strict JSON into them."""
    plan = _render_plan(message.DESCRIPTOR, fragments)
    if plan is None:
        plain: dict[str, Any] = struct_to_json(message)
        return plain
    out: dict[str, Any] = {}
    for name, mode, convert in plan:
        value = getattr(message, name)
        if mode == _SINGULAR:
            out[name] = value if convert is None else convert(value)
        elif mode == _OPTIONAL:
            if message.HasField(name):
                out[name] = value if convert is None else convert(value)
            else:
                out[name] = None
        elif mode == _REPEATED:
            out[name] = list(value) if convert is None else [convert(v) for v in value]
        elif mode == _MAP:
            out[name] = dict(value) if convert is None else {k: convert(v) for k, v in value.items()}
        else:  # _INLINE
            out.update(render(value, fragments=fragments))
    return out


def to_json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON of plain values."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits (an error echoing its input): kept whole
        return compact_json(value).encode()


def message_json_bytes(message: Message) -> bytes:
    """A message as compact UTF-8 JSON, its JSON text fields embedded as stored.
    What orjson cannot encode is rendered again and encoded by the standard
    library, which cannot embed Fragments."""
    try:
        return orjson.dumps(render(message, fragments=True))
    except TypeError:
        return compact_json(render(message)).encode()


# How render emits a field: as it is, null when unset, a list, an object, or
# merged into its parent; each with a converter for its values (None: as they are).
_SINGULAR, _OPTIONAL, _REPEATED, _MAP, _INLINE = range(5)
Converter = Callable[[Any], Any] | None


@cache
def _render_plan(descriptor: Descriptor, fragments: bool) -> tuple[tuple[str, int, Converter], ...] | None:
    """What render does with each field of a message type, worked out once per
    type from the descriptors (None: a Struct, rendered as plain JSON)."""
    if descriptor.full_name == STRUCT:
        return None
    plan: list[tuple[str, int, Converter]] = []
    for f in message_info(descriptor).fields:
        if f.input_only or f.rules.http_status:
            continue
        if f.rules.inline:
            plan.append((f.name, _INLINE, None))
        elif f.is_map:
            value = f.message.fields_by_name["value"]  # type: ignore[union-attr]
            plan.append((f.name, _MAP, _converter(value, False, fragments)))
        elif f.repeated:
            convert = _converter(f.descriptor, f.rules.json_text, fragments)
            if fragments and f.message is not None and f.message.full_name in REMEMBERED_TYPES:
                convert = partial(_remembered_item, f.message.full_name)
            plan.append((f.name, _REPEATED, convert))
        elif f.has_presence or f.message is not None:
            plan.append((f.name, _OPTIONAL, _converter(f.descriptor, f.rules.json_text, fragments)))
        else:
            plan.append((f.name, _SINGULAR, _converter(f.descriptor, f.rules.json_text, fragments)))
    return tuple(plan)


def _converter(descriptor: FieldDescriptor, json_text: bool, fragments: bool) -> Converter:
    cpp = descriptor.cpp_type
    if cpp == _CPPTYPE_MESSAGE:
        if descriptor.message_type.full_name == TIMESTAMP:  # type: ignore[union-attr]
            return render_timestamp
        return partial(render, fragments=fragments)
    if cpp == _CPPTYPE_ENUM:
        return enum_info(descriptor.enum_type).to_wire.get
    if json_text:
        return _json_fragment if fragments else _json_text
    return None


# Rendered list items of these types, by type and wire bytes: a list that workers
# poll again and again (the claimable page) renders only its new items. An item's
# wire bytes determine its rendering, so an item that changed is a new entry. Other
# lists are mostly read once, and a miss costs more than rendering alone. Bounded:
# items of at most _ITEM_BYTES on the wire, and cleared when full.
REMEMBERED_TYPES = frozenset({"cueline.v1.ClaimableExecution"})
_REMEMBERED: dict[tuple[str, bytes], orjson.Fragment] = {}
_REMEMBERED_ITEMS, _ITEM_BYTES = 4096, 1024


def _remembered_item(type_name: str, message: Message) -> Any:
    wire = message.SerializeToString()
    if len(wire) > _ITEM_BYTES:
        return render(message, fragments=True)
    key = (type_name, wire)
    fragment = _REMEMBERED.get(key)
    if fragment is None:
        if len(_REMEMBERED) >= _REMEMBERED_ITEMS:
            _REMEMBERED.clear()
        fragment = _REMEMBERED[key] = orjson.Fragment(orjson.dumps(render(message, fragments=True)))
    return fragment


def _json_text(value: str) -> Any:
    return loads(value) if value else None


def _json_fragment(value: str) -> Any:
    return orjson.Fragment(value) if value else None


# --- reading --------------------------------------------------------------------------------------


class Reader:
    """Fills a message from decoded JSON, collecting violations and present paths."""

    def __init__(self, *, reject_unknown: bool = False) -> None:
        self.violations: list[Violation] = []
        self.present: list[str] = []
        self.reject_unknown = reject_unknown

    def fail(self, location: str, text: str) -> None:
        self.violations.append(Violation(location, text))

    def read_object(self, message: Message, value: Any, location: str, path: str = "") -> None:
        if not isinstance(value, dict):
            self.fail(location, "Input should be a valid dictionary or object")
            return
        info = message_info(message.DESCRIPTOR)
        for key, item in value.items():
            f = info.by_name.get(key)
            child_location = f"{location}.{key}"
            if f is None or f.output_only:
                if self.reject_unknown:
                    self.fail(child_location, "Extra inputs are not permitted")
                continue
            child_path = f"{path}.{f.name}" if path else f.name
            if item is None:
                self.present.append(child_path)
                continue
            self.read_field(message, f, item, child_location, child_path)

    def read_field(self, message: Message, f: FieldInfo, value: Any, location: str, path: str) -> None:
        if f.is_map:
            if not isinstance(value, dict):
                self.fail(location, "Input should be a valid dictionary")
                return
            self.present.append(path)
            target = getattr(message, f.name)
            value_field = f.message.fields_by_name["value"]  # type: ignore[union-attr]
            for k, v in value.items():
                converted = self._scalar(f, value_field, v, f"{location}.{k}")
                if converted is not _INVALID:
                    target[k] = converted
            return
        if f.repeated:
            if not isinstance(value, list):
                self.fail(location, "Input should be a valid list")
                return
            self.present.append(path)
            target = getattr(message, f.name)
            for index, item in enumerate(value):
                if f.is_plain_message:
                    self.read_object(target.add(), item, f"{location}.{index}")
                    continue
                converted = self._scalar(f, f.descriptor, item, f"{location}.{index}")
                if converted is not _INVALID:
                    target.append(converted)
            return
        if f.is_plain_message:
            if not isinstance(value, dict):
                self.fail(location, "Input should be a valid dictionary or object")
                return
            sub = getattr(message, f.name)
            sub.SetInParent()
            before = len(self.present)
            self.read_object(sub, value, location, path)
            if len(self.present) == before:
                self.present.append(path)
            return
        self.present.append(path)
        if f.is_timestamp:
            parsed = self._datetime(value, location)
            if parsed is not None:
                set_timestamp(getattr(message, f.name), parsed)
            return
        converted = self._scalar(f, f.descriptor, value, location)
        if converted is not _INVALID:
            setattr(message, f.name, converted)

    def _datetime(self, value: Any, location: str) -> dt.datetime | None:
        if isinstance(value, str):
            try:
                return parse_datetime(value)
            except ValueError:
                pass
        self.fail(location, "Input should be a valid datetime")
        return None

    def _scalar(self, f: FieldInfo, descriptor: Any, value: Any, location: str) -> Any:
        if f.rules.json_text:
            return compact_json(value)
        cpp = descriptor.cpp_type
        if cpp == _CPPTYPE_STRING:
            if isinstance(value, str):
                return value
            self.fail(location, "Input should be a valid string")
        elif cpp == _CPPTYPE_BOOL:
            if isinstance(value, bool):
                return value
            self.fail(location, "Input should be a valid boolean")
        elif cpp in _INT_TYPES:
            return self._integer(value, _INT_TYPES[cpp], location)
        elif cpp in (_CPPTYPE_DOUBLE, _CPPTYPE_FLOAT):
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            self.fail(location, "Input should be a valid number")
        elif cpp == _CPPTYPE_ENUM:
            return self._enum(f, descriptor, value, location)
        else:
            self.fail(location, "Unsupported value")
        return _INVALID

    def _integer(self, value: Any, bounds: tuple[int, int], location: str) -> Any:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(location, "Input should be a valid integer")
            return _INVALID
        low, high = bounds
        if value < low:
            self.fail(location, f"Input should be greater than or equal to {low}")
            return _INVALID
        if value > high:
            self.fail(location, f"Input should be less than or equal to {high}")
            return _INVALID
        return value

    def _enum(self, f: FieldInfo, descriptor: Any, value: Any, location: str) -> Any:
        info = enum_info(descriptor.enum_type)
        if isinstance(value, str) and value in info.from_wire:
            return info.from_wire[value]
        if f.rules.lenient:
            return _INVALID
        choices = [f"'{name}'" for name in info.to_wire.values()]
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
        self.fail(location, f"Input should be {listed}")
        return _INVALID

    def read_text(self, message: Message, f: FieldInfo, text: str, location: str, path: str) -> None:
        """A query parameter, path variable or header: text converted to the field's type."""
        value: Any = text
        cpp = f.descriptor.cpp_type
        if f.rules.json_text:
            try:
                value = loads(text)
            except ValueError:
                self.fail(location, "Input should be valid JSON")
                return
        elif cpp == _CPPTYPE_BOOL:
            lowered = text.lower()
            value = {"true": True, "1": True, "false": False, "0": False}.get(lowered, text)
        elif cpp in _INT_TYPES:
            try:
                value = int(text)
            except ValueError:
                value = text
        elif cpp in (_CPPTYPE_DOUBLE, _CPPTYPE_FLOAT):
            try:
                value = float(text)
            except ValueError:
                value = text
        if f.repeated:
            value = [value]
        self.read_field(message, f, value, location, path)


_INVALID = object()
