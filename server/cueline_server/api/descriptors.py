"""What the generated descriptors say about each RPC and message.

Everything the transports need (request and response classes, auth, the HTTP
bindings, field rules and behaviours) is read once at start-up from the
options in proto/ and cached here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache, cached_property
from types import ModuleType

from google.api import annotations_pb2 as http_annotations
from google.api import field_behavior_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message

from cueline.annotations.v1 import annotations_pb2 as cueline_options
from cueline.partner.v1 import actions_pb2, auth_pb2, directory_pb2
from cueline.v1 import (
    accounts_pb2,
    alerts_pb2,
    cues_pb2,
    executions_pb2,
    outcomes_pb2,
    probes_pb2,
    workers_pb2,
)

API_MODULES: tuple[ModuleType, ...] = (
    accounts_pb2,
    alerts_pb2,
    cues_pb2,
    executions_pb2,
    outcomes_pb2,
    probes_pb2,
    workers_pb2,
    actions_pb2,
    auth_pb2,
    directory_pb2,
)

REQUIRED = field_behavior_pb2.REQUIRED
OUTPUT_ONLY = field_behavior_pb2.OUTPUT_ONLY
INPUT_ONLY = field_behavior_pb2.INPUT_ONLY
IMMUTABLE = field_behavior_pb2.IMMUTABLE

TIMESTAMP = "google.protobuf.Timestamp"
FIELD_MASK = "google.protobuf.FieldMask"


@dataclass(frozen=True)
class HttpBinding:
    verb: str
    template: str
    body: str
    response_body: str

    @property
    def path_fields(self) -> tuple[str, ...]:
        return tuple(name.split("=", 1)[0] for name in re.findall(r"\{([^}]+)\}", self.template))


@dataclass(frozen=True)
class MethodInfo:
    service: str
    name: str
    full_name: str  # /package.Service/Method
    descriptor: MethodDescriptor
    request_class: type[Message]
    response_class: type[Message]
    rules: cueline_options.MethodRules
    surface: int
    bindings: tuple[HttpBinding, ...]

    @property
    def public(self) -> bool:
        return self.rules.auth == cueline_options.AUTH_NONE

    @property
    def success_status(self) -> int:
        return self.rules.http_success_status or 200

    @cached_property
    def path_fields(self) -> frozenset[str]:
        """The request fields its REST paths bind: identifiers of resources."""
        return frozenset(name for binding in self.bindings for name in binding.path_fields)


def _bindings(rule: object) -> list[HttpBinding]:
    found: list[HttpBinding] = []
    verb = rule.WhichOneof("pattern")  # type: ignore[attr-defined]
    if verb is not None and verb != "custom":
        found.append(
            HttpBinding(verb.upper(), getattr(rule, verb), rule.body, rule.response_body)  # type: ignore[attr-defined]
        )
    for extra in rule.additional_bindings:  # type: ignore[attr-defined]
        found.extend(_bindings(extra))
    return found


def _method_info(service: ServiceDescriptor, method: MethodDescriptor) -> MethodInfo:
    options = method.GetOptions()
    rules = options.Extensions[cueline_options.method]
    bindings = (
        _bindings(options.Extensions[http_annotations.http])
        if options.HasExtension(http_annotations.http)
        else []
    )
    return MethodInfo(
        service=service.full_name,
        name=method.name,
        full_name=f"/{service.full_name}/{method.name}",
        descriptor=method,
        request_class=message_factory.GetMessageClass(method.input_type),
        response_class=message_factory.GetMessageClass(method.output_type),
        rules=rules,
        surface=service.GetOptions().Extensions[cueline_options.surface],
        bindings=tuple(bindings),
    )


@cache
def services() -> tuple[ServiceDescriptor, ...]:
    return tuple(s for module in API_MODULES for s in module.DESCRIPTOR.services_by_name.values())


@cache
def methods() -> tuple[MethodInfo, ...]:
    return tuple(_method_info(s, m) for s in services() for m in s.methods)


# --- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnumInfo:
    """Enum values on the wire are the value names without the enum's prefix,
    in lower case: CUE_STATUS_ACTIVE is "active". The zero value is null."""

    descriptor: EnumDescriptor
    to_wire: dict[int, str]
    from_wire: dict[str, int]


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


@cache
def enum_info(descriptor: EnumDescriptor) -> EnumInfo:
    prefix = _upper_snake(descriptor.name) + "_"
    to_wire: dict[int, str] = {}
    for value in descriptor.values:
        if value.number == 0:
            continue
        if not value.name.startswith(prefix):
            raise ValueError(f"{descriptor.full_name}.{value.name} lacks the prefix {prefix}")
        to_wire[value.number] = value.name[len(prefix) :].lower()
    return EnumInfo(descriptor, to_wire, {v: k for k, v in to_wire.items()})


@dataclass(frozen=True)
class FieldInfo:
    descriptor: FieldDescriptor
    name: str
    json_name: str
    rules: cueline_options.FieldRules
    behaviors: frozenset[int]
    repeated: bool
    is_map: bool
    has_presence: bool
    message: Descriptor | None
    enum: EnumDescriptor | None

    @property
    def required(self) -> bool:
        return REQUIRED in self.behaviors

    @property
    def output_only(self) -> bool:
        return OUTPUT_ONLY in self.behaviors

    @property
    def input_only(self) -> bool:
        return INPUT_ONLY in self.behaviors

    @property
    def immutable(self) -> bool:
        return IMMUTABLE in self.behaviors

    @property
    def is_timestamp(self) -> bool:
        return self.message is not None and self.message.full_name == TIMESTAMP

    @property
    def is_field_mask(self) -> bool:
        return self.message is not None and self.message.full_name == FIELD_MASK

    @property
    def is_plain_message(self) -> bool:
        return (
            self.message is not None and not self.is_map and not self.is_timestamp and not self.is_field_mask
        )


@dataclass(frozen=True)
class MessageInfo:
    descriptor: Descriptor
    fields: tuple[FieldInfo, ...]
    by_name: dict[str, FieldInfo] = field(hash=False)


def _field_info(fd: FieldDescriptor) -> FieldInfo:
    options = fd.GetOptions()
    behaviors = frozenset(options.Extensions[field_behavior_pb2.field_behavior])
    is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
    repeated = fd.is_repeated and not is_map
    return FieldInfo(
        descriptor=fd,
        name=fd.name,
        json_name=fd.json_name,
        rules=options.Extensions[cueline_options.field],
        behaviors=behaviors,
        repeated=repeated,
        is_map=bool(is_map),
        has_presence=fd.has_presence,
        message=fd.message_type,
        enum=fd.enum_type,
    )


@cache
def message_info(descriptor: Descriptor) -> MessageInfo:
    fields = tuple(_field_info(fd) for fd in descriptor.fields)
    by_name: dict[str, FieldInfo] = {}
    for f in fields:
        by_name[f.name] = f
        by_name.setdefault(f.json_name, f)
    return MessageInfo(descriptor, fields, by_name)
