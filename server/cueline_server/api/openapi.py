"""/openapi.json, generated from the same descriptors as the routes."""

from __future__ import annotations

import json
import re
from typing import Any

from google.protobuf.descriptor import Descriptor

from cueline.annotations.v1 import annotations_pb2 as cueline_options
from cueline_server import __version__
from cueline_server.api.descriptors import (
    FieldInfo,
    HttpBinding,
    MethodInfo,
    enum_info,
    message_info,
    methods,
)
from cueline_server.api.jsoncodec import STRUCT

_SCALARS = {
    1: "integer",
    2: "integer",
    3: "integer",
    4: "integer",
    5: "number",
    6: "number",
    7: "boolean",
    9: "string",
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "status"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "status": {"type": "integer"},
                "details": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
            },
        }
    },
}


_PARTNER_ERROR = {
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "oneOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "type": {"type": "string"},
                            "loc": {"type": "array", "items": {"type": "string"}},
                            "msg": {"type": "string"},
                        },
                    },
                },
            ]
        }
    },
}

_OAUTH_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "string",
            "enum": ["invalid_request", "invalid_client", "unsupported_grant_type", "server_error"],
        }
    },
}


def _error_schema(template: str) -> str:
    if template.startswith("/api/partners/"):
        return "PartnerError"
    if template.startswith("/oauth2/"):
        return "OAuthError"
    return "Error"


def _ref(descriptor: Descriptor) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{descriptor.full_name}"}


class _Builder:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {
            "Error": _ERROR,
            "PartnerError": _PARTNER_ERROR,
            "OAuthError": _OAUTH_ERROR,
        }

    def field_schema(self, f: FieldInfo) -> dict[str, Any]:
        rules = f.rules
        schema: dict[str, Any]
        if f.rules.json_text:
            schema = {"description": "any JSON value"}
        elif f.is_timestamp:
            schema = {"type": "string", "format": "date-time"}
        elif f.enum is not None:
            schema = {"type": "string", "enum": list(enum_info(f.enum).to_wire.values())}
        elif f.is_map:
            value = f.message.fields_by_name["value"]  # type: ignore[union-attr]
            schema = {
                "type": "object",
                "additionalProperties": {"type": _SCALARS.get(value.cpp_type, "string")},
            }
        elif f.message is not None:
            schema = self.message(f.message)
        else:
            schema = {"type": _SCALARS.get(f.descriptor.cpp_type, "string")}
            if rules.HasField("min_length"):
                schema["minLength"] = rules.min_length
            if rules.HasField("max_length"):
                schema["maxLength"] = rules.max_length
            if rules.HasField("minimum"):
                schema["minimum"] = rules.minimum
            if rules.HasField("maximum"):
                schema["maximum"] = rules.maximum
        if f.repeated:
            schema = {"type": "array", "items": schema}
            if rules.HasField("max_items"):
                schema["maxItems"] = rules.max_items
        if f.output_only:
            schema = {**schema, "readOnly": True}
        return schema

    def properties(self, descriptor: Descriptor) -> tuple[dict[str, Any], list[str]]:
        props: dict[str, Any] = {}
        required: list[str] = []
        for f in message_info(descriptor).fields:
            if f.rules.inline:
                inner, inner_required = self.properties(f.message)  # type: ignore[arg-type]
                props.update(inner)
                required += inner_required
                continue
            props[f.name] = self.field_schema(f)
            if f.required:
                required.append(f.name)
        return props, required

    def message(self, descriptor: Descriptor) -> dict[str, Any]:
        if descriptor.full_name == STRUCT:
            return {"type": "object", "description": "any JSON object, checked by exact field name"}
        if descriptor.full_name not in self.schemas:
            self.schemas[descriptor.full_name] = {}
            props, required = self.properties(descriptor)
            schema: dict[str, Any] = {"type": "object", "properties": props}
            if required:
                schema["required"] = required
            self.schemas[descriptor.full_name] = schema
        return _ref(descriptor)

    def operation(self, method: MethodInfo, binding: HttpBinding) -> dict[str, Any]:
        body, response_body, variables = binding.body, binding.response_body, binding.path_fields
        error = {"$ref": f"#/components/schemas/{_error_schema(binding.template)}"}
        info = message_info(method.request_class.DESCRIPTOR)
        params: list[dict[str, Any]] = [
            {"name": v, "in": "path", "required": True, "schema": {"type": "string"}} for v in variables
        ]
        for f in info.fields:
            if f.rules.http_header:
                params.append({"name": f.rules.http_header, "in": "header", "schema": self.field_schema(f)})
            elif body != "*" and f.name != body and f.name not in variables and not f.is_plain_message:
                params.append({"name": f.name, "in": "query", "schema": self.field_schema(f)})
        op: dict[str, Any] = {
            "operationId": method.name,
            "tags": [method.service.rsplit(".", 1)[-1]],
            "summary": _leading_comment(method),
            "parameters": params,
            "responses": {"default": {"description": "error", "content": _json(error)}},
        }
        if method.rules.auth == cueline_options.AUTH_PARTNER_TOKEN:
            op["security"] = [{"partnerToken": []}]
        elif not method.public:
            op["security"] = [{"apiKey": []}]
        if body:
            target = method.request_class.DESCRIPTOR if body == "*" else info.by_name[body].message
            op["requestBody"] = {"content": _json(self.message(target))}  # type: ignore[arg-type]
        status = str(method.success_status)
        if status == "204":
            op["responses"][status] = {"description": "no content"}
        else:
            out: Any = method.response_class.DESCRIPTOR
            if response_body:
                out = message_info(out).by_name[response_body].message
            op["responses"][status] = {"description": "success", "content": _json(self.message(out))}
        return op


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _leading_comment(method: MethodInfo) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", method.name)


def document() -> bytes:
    builder = _Builder()
    paths: dict[str, dict[str, Any]] = {}
    for method in methods():
        for binding in method.bindings:
            template = re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", binding.template)
            paths.setdefault(template, {})[binding.verb.lower()] = builder.operation(method, binding)
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "cueline", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": builder.schemas,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "an account API key"},
                "partnerToken": {"type": "http", "scheme": "bearer", "description": "a partner access token"},
            },
        },
    }
    return json.dumps(doc, separators=(",", ":")).encode()
