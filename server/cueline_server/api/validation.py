"""The shared input check: REQUIRED field behaviours and the FieldRules of
proto/cueline/annotations, applied to every request on both transports
before its handler runs.

Paths are dotted request-message paths (`cue.retry.max_attempts`); the REST
transcoder turns them into body/query/path locations.

For an update (a request with an update_mask), fields inside the resource
are checked when the mask names them, and REQUIRED applies only to the
request's own top-level fields: an update need not repeat the resource.

No string anywhere in a request may hold a NUL character (U+0000): neither a
field, nor a map's keys and values, nor the contents of a free-form JSON body
(google.protobuf.Struct). PostgreSQL's text cannot store one, and SQLite
would keep what PostgreSQL refuses, so both databases refuse it here alike.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import ListValue, Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from cueline_server.api.descriptors import FieldInfo, message_info
from cueline_server.api.jsoncodec import loads
from cueline_server.errors import Violation

_NUMBER_CPPTYPES = {
    FieldDescriptor.CPPTYPE_INT32,
    FieldDescriptor.CPPTYPE_INT64,
    FieldDescriptor.CPPTYPE_UINT32,
    FieldDescriptor.CPPTYPE_UINT64,
    FieldDescriptor.CPPTYPE_DOUBLE,
    FieldDescriptor.CPPTYPE_FLOAT,
}


def validate(request: Message, ids: frozenset[str] = frozenset()) -> list[Violation]:
    """`ids` are the paths of fields that name a resource (a REST method's path
    variables): one holding a NUL names nothing, which the handler answers as
    not found, the way it answers any other malformed id."""
    violations: list[Violation] = []
    info = message_info(request.DESCRIPTOR)
    mask: set[str] | None = None
    if "update_mask" in info.by_name and request.HasField("update_mask"):
        mask = set(request.update_mask.paths)  # type: ignore[attr-defined]
        resource = next(f for f in info.fields if f.is_plain_message)
        violations += _check_mask(resource, mask)
    _check(request, "", violations, mask, ids, top=True)
    return violations


def _check_mask(resource: FieldInfo, mask: set[str]) -> list[Violation]:
    """Every path must name a field of the resource that an update may change."""
    found: list[Violation] = []
    for path in sorted(mask):
        descriptor = resource.message
        f: FieldInfo | None = None
        for part in path.split("."):
            f = message_info(descriptor).by_name.get(part) if descriptor is not None else None
            if f is None:
                break
            descriptor = f.message if f.is_plain_message else None
        where = f"{resource.name}.{path}"
        if f is None:
            found.append(Violation(where, "Extra inputs are not permitted"))
        elif f.immutable or f.output_only:
            found.append(Violation(where, "Field cannot be changed"))
    return found


def _present(message: Message, f: FieldInfo) -> bool:
    if f.repeated or f.is_map:
        return len(getattr(message, f.name)) > 0
    if f.has_presence or f.message is not None:
        return message.HasField(f.name)
    return bool(getattr(message, f.name))


def _in_mask(mask: set[str], path: str) -> bool:
    return any(p == path or p.startswith(path + ".") for p in mask)


def _check(
    message: Message,
    prefix: str,
    out: list[Violation],
    mask: set[str] | None,
    ids: frozenset[str],
    *,
    top: bool,
) -> None:
    for f in message_info(message.DESCRIPTOR).fields:
        if f.output_only or f.is_field_mask:
            continue
        path = f"{prefix}{f.name}"
        # Inside an update, the mask says what was given (prefix "cue." is the resource).
        relative = path.split(".", 1)[1] if "." in path else path
        masked = mask is not None and not top and _in_mask(mask, relative)
        present = _present(message, f) or masked
        if not present:
            if f.required and (mask is None or top):
                out.append(Violation(path, "Field required"))
            continue
        if f.message is Struct.DESCRIPTOR:
            _check_nul(getattr(message, f.name), path, out)
            continue
        if f.is_plain_message and not f.repeated:
            _check(getattr(message, f.name), path + ".", out, mask, ids, top=False)
            continue
        if f.is_plain_message and not f.is_map:
            items = getattr(message, f.name)
            if not _too_many(f, items, path, out):
                for index, item in enumerate(items):
                    _check(item, f"{path}.{index}.", out, mask, ids, top=False)
            continue
        _check_rules(f, getattr(message, f.name), path, out, nul_allowed=path in ids)


def _too_many(f: FieldInfo, value: Any, path: str, out: list[Violation]) -> bool:
    if f.rules.HasField("max_items") and len(value) > f.rules.max_items:
        out.append(Violation(path, f"List should have at most {f.rules.max_items} items"))
        return True
    return False


def _check_rules(f: FieldInfo, value: Any, path: str, out: list[Violation], *, nul_allowed: bool) -> None:
    rules = f.rules
    if f.is_map:
        if not _too_many(f, value, path, out):
            _check_nul(value, path, out)
        return
    if f.repeated and _too_many(f, value, path, out):
        return
    items = list(enumerate(value)) if f.repeated else [(None, value)]
    for index, item in items:
        where = path if index is None else f"{path}.{index}"
        if isinstance(item, str) and rules.json_text:
            try:
                parsed = loads(item)
            except ValueError:
                out.append(Violation(where, "Input should be valid JSON"))
            else:
                # JSON text can hold a NUL only as this escape.
                if "\\u0000" in item and not rules.nul_checked_by_service:
                    _check_nul(parsed, where, out)
        elif isinstance(item, str):
            if "\x00" in item and not nul_allowed:
                out.append(Violation(where, _NUL))
            elif rules.HasField("min_length") and len(item) < rules.min_length:
                noun = "character" if rules.min_length == 1 else "characters"
                out.append(Violation(where, f"String should have at least {rules.min_length} {noun}"))
            elif rules.HasField("max_length") and len(item) > rules.max_length:
                out.append(Violation(where, f"String should have at most {rules.max_length} characters"))
            elif rules.not_blank and not item.strip():
                out.append(Violation(where, "Value must not be blank"))
        elif isinstance(item, Timestamp):
            if not (_MIN_SECONDS <= item.seconds <= _MAX_SECONDS and 0 <= item.nanos < 1_000_000_000):
                out.append(Violation(where, _TIME_RANGE))
        elif f.enum is not None and item not in f.enum.values_by_number and not rules.lenient:
            # A gRPC caller can send any number; REST's names are checked as they are read.
            out.append(Violation(where, f"Unknown value {item} of {f.enum.full_name}"))
        elif f.descriptor.cpp_type in _NUMBER_CPPTYPES and not f.enum:
            if rules.HasField("minimum") and item < rules.minimum:
                out.append(Violation(where, f"Input should be greater than or equal to {rules.minimum}"))
            elif rules.HasField("maximum") and item > rules.maximum:
                out.append(Violation(where, f"Input should be less than or equal to {rules.maximum}"))


_NUL = "String should not contain NUL characters"

# What a Timestamp may hold (google/protobuf/timestamp.proto): 0001-01-01T00:00:00Z to
# 9999-12-31T23:59:59.999999999Z, nanos 0-999,999,999. REST's RFC 3339 strings cannot
# leave that range; a gRPC caller's seconds and nanos can.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_TIME_RANGE = "Timestamp should be from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z"


def _check_nul(value: Any, path: str, out: list[Violation]) -> None:
    where = _nul_in(value)
    if where is not None:
        out.append(Violation(".".join([path, *where]), _NUL))


def _nul_in(value: Any) -> list[str] | None:
    """Where a NUL is in a string, a map or a Struct: the keys and indexes that
    lead to it ([] for the value itself, or for a key that holds one), or None."""
    if isinstance(value, str):
        return [] if "\x00" in value else None
    if isinstance(value, Value):
        kind = value.WhichOneof("kind")
        if kind not in ("string_value", "struct_value", "list_value"):
            return None
        return _nul_in(getattr(value, kind))
    if isinstance(value, ListValue):
        items: Any = enumerate(value.values)
    elif isinstance(value, list):
        items = enumerate(value)
    elif isinstance(value, Struct):
        items = value.fields.items()
    elif isinstance(value, Message):
        return None
    else:
        items = value.items()
    for key, item in items:
        if isinstance(key, str) and "\x00" in key:
            return []
        below = _nul_in(item)
        if below is not None:
            return [str(key), *below]
    return None
