"""The REST transcoder: an ASGI application whose routes are the
google.api.http bindings of the generated descriptors.

A request is matched against the path templates (literal segments win over
variables, one trailing slash is ignored), read into the RPC's request
message (path variables, then the body per the binding's `body`, the other
fields from query parameters and annotated headers), run through the same
pipeline as gRPC, and rendered by the JSON codec. For a PATCH whose request
has an `update_mask`, the mask is the set of body paths that were present.
Errors are rendered in the envelope of the surface the path belongs to:
`/api/partners/` as {"detail": ...}, `/oauth2/` as RFC 6749 section 5.2
bodies, everything else as the CueAPI envelope.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct

from cueline_server.api.descriptors import HttpBinding, MethodInfo, message_info, methods
from cueline_server.api.jsoncodec import Reader, loads, message_json_bytes, to_json_bytes
from cueline_server.api.pipeline import Pipeline
from cueline_server.errors import ApiError, Violation, internal_error, unreadable_body, validation_error

log = logging.getLogger("cueline.rest")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_LOCATIONS = ("body", "query", "path", "header")


@dataclass(frozen=True)
class Route:
    method: MethodInfo
    binding: HttpBinding
    segments: tuple[str | None, ...]  # None marks a variable
    variables: tuple[str, ...]
    header_fields: tuple[tuple[str, str], ...]  # (header name lower-case, field)
    status_field: str | None  # a response field that carries the HTTP status
    max_request_bytes: int  # 0: the server-wide limit
    # An empty body is refused (422, `body`: Field required) rather than read as {}.
    body_required: bool

    @property
    def specificity(self) -> tuple[int, ...]:
        return tuple(0 if s is None else 1 for s in self.segments)

    def rest_location(self, field_path: str) -> str:
        """Where a request-message path was given in this REST request. A path
        that is already a location (`body`, `query.limit`) stays as it is."""
        if field_path in _LOCATIONS or (field_path.split(".", 1)[0] in _LOCATIONS and "." in field_path):
            return field_path
        head = field_path.split(".", 1)[0]
        if head in self.variables:
            return f"path.{field_path}"
        for header, name in self.header_fields:
            if name == head:
                return f"header.{header}"
        body = self.binding.body
        if body == "*":
            return f"body.{field_path}"
        if body and (field_path == body or field_path.startswith(body + ".")):
            return "body" + field_path[len(body) :]
        return f"query.{field_path}"


def _compile(method: MethodInfo, binding: HttpBinding) -> Route:
    segments: list[str | None] = []
    for part in binding.template.strip("/").split("/"):
        match = re.fullmatch(r"\{([a-z_][a-z0-9_.]*)(=\*)?\}", part)
        if match:
            segments.append(None)
        elif "{" in part or "*" in part or ":" in part:
            raise ValueError(f"unsupported path template {binding.template!r} on {method.full_name}")
        else:
            segments.append(part)
    info = message_info(method.request_class.DESCRIPTOR)
    headers = tuple((f.rules.http_header.lower(), f.name) for f in info.fields if f.rules.http_header)
    response = message_info(method.response_class.DESCRIPTOR)
    status_field = next((f.name for f in response.fields if f.rules.http_status), None)
    # A body is required when it holds a required field, and for an update.
    body_required = bool(binding.body) and (
        binding.verb == "PATCH"
        or any(
            f.required
            and (f.name == binding.body or (binding.body == "*" and f.name not in binding.path_fields))
            for f in info.fields
        )
    )
    return Route(
        method,
        binding,
        tuple(segments),
        binding.path_fields,
        headers,
        status_field,
        method.rules.max_request_bytes,
        body_required,
    )


class Router:
    def __init__(self, all_methods: tuple[MethodInfo, ...]) -> None:
        routes = [_compile(m, b) for m in all_methods for b in m.bindings]
        routes.sort(key=lambda r: r.specificity, reverse=True)
        self._by_length: dict[int, list[Route]] = {}
        for route in routes:
            self._by_length.setdefault(len(route.segments), []).append(route)
        self.routes = routes

    def match(self, verb: str, parts: list[str]) -> tuple[Route, dict[str, str]]:
        """The route of the most specific path that matches, or 405 when it
        has no route for the verb: a literal path (GET /v1/executions/claim)
        is never served by a variable one (/v1/executions/{execution_id})."""
        matched: tuple[int, ...] | None = None  # the most specific path matched
        for route in self._by_length.get(len(parts), ()):
            values: dict[str, str] = {}
            for segment, part in zip(route.segments, parts, strict=True):
                if segment is None:
                    values[route.variables[len(values)]] = unquote(part)
                elif segment != part:
                    break
            else:
                if matched is None:
                    matched = route.specificity
                elif route.specificity != matched:
                    break  # less specific than a path that matched: routes are sorted so
                if route.binding.verb == verb:
                    return route, values
        if matched is not None:
            raise ApiError("http_error", "Method Not Allowed", 405)
        raise ApiError("http_error", "Not Found", 404)


def envelope(error: ApiError, route: Route | None) -> dict[str, Any]:
    """The CueAPI error body; field errors name their REST location."""
    body: dict[str, Any] = {"code": error.code, "message": error.message, "status": error.http_status}
    if error.violations:
        details = [
            {"field": route.rest_location(v.field) if route else v.field, "message": v.message}
            for v in error.violations
        ]
        body["details"] = details
        body["message"] = f"{details[0]['field']}: {details[0]['message']}"
    return {"error": body}


# What the partner surface says for errors that did not come from a partner
# servicer (their messages are the CueAPI wording).
_PARTNER_DETAIL = {
    400: "Cannot parse request body",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request body too large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
# 429: `slow_down`, the token endpoint's "too fast" code in the OAuth error registry (RFC 8628).
_OAUTH_ERROR = {401: "invalid_client", 429: "slow_down", 500: "server_error", 503: "temporarily_unavailable"}


def partner_body(error: ApiError, route: Route | None) -> dict[str, Any]:
    """{"detail": "..."} or, for validation, pydantic-style {"detail": [{type, loc, msg}]},
    each `loc` where the field was given (["query", "secret"], ["body", "state"])."""
    if error.violations:
        return {
            "detail": [
                {
                    "type": v.kind or "value_error",
                    "loc": (route.rest_location(v.field) if route else v.field).split("."),
                    "msg": v.message,
                }
                for v in error.violations
            ]
        }
    generic = error.code.islower()  # CueAPI-style codes; partner reasons are upper case
    return {"detail": _PARTNER_DETAIL.get(error.http_status, error.message) if generic else error.message}


def oauth_error(error: ApiError) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
    """RFC 6749 section 5.2: the status, the body and any extra headers."""
    if error.http_status == 401:
        return 401, {"error": "invalid_client"}, [(b"www-authenticate", b'Basic realm="cueline"')]
    if error.http_status in _OAUTH_ERROR:
        return error.http_status, {"error": _OAUTH_ERROR[error.http_status]}, []
    unsupported = any(v.kind == "literal_error" for v in error.violations)
    status = 400 if error.http_status in (400, 422) else error.http_status
    return status, {"error": "unsupported_grant_type" if unsupported else "invalid_request"}, []


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def client_address(scope: Scope, trusted_proxies: Networks) -> str:
    """The HTTP client's address (see `forwarded_client`)."""
    client = scope.get("client")
    if not trusted_proxies or not client:
        return str(client[0]) if client else ""
    forwarded = next((v for k, v in scope["headers"] if k.lower() == b"x-forwarded-for"), None)
    return forwarded_client(
        str(client[0]), forwarded.decode("latin-1") if forwarded else None, trusted_proxies
    )


def forwarded_client(peer: str, forwarded_for: str | None, trusted_proxies: Networks) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy,
    the left-most X-Forwarded-For entry (an HTTP header, or gRPC metadata)."""
    if not trusted_proxies or not peer or forwarded_for is None:
        return peer
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if any(address in network for network in trusted_proxies):
        return forwarded_for.split(",")[0].strip() or peer
    return peer


def error_response(
    path: str, error: ApiError, route: Route | None = None
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The status, body and extra headers of an error, in the style of the path's surface."""
    if path.startswith("/oauth2/"):
        status, body, headers = oauth_error(error)
        return status, to_json_bytes(body), headers
    if path.startswith("/api/partners/"):
        return error.http_status, to_json_bytes(partner_body(error, route)), []
    return error.http_status, to_json_bytes(envelope(error, route)), []


class Transcoder:
    """The ASGI application. `ready` is read by /healthz."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        max_request_bytes: int,
        openapi: bytes,
        ready: Callable[[], bool],
        trusted_proxies: Networks = (),
    ) -> None:
        self._pipeline = pipeline
        self._trusted_proxies = trusted_proxies
        self._router = Router(methods())
        self._max = max_request_bytes
        self._openapi = openapi
        self._ready = ready
        # The last response rendered, and its body: a servicer may hand one
        # response to concurrent calls (a shared claimable page), whose
        # continuations then run one after another. Servicers never change a
        # response once returned (cueline_server.servicers).
        self._rendered: tuple[Message | None, bytes] = (None, b"")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        rid = str(uuid.uuid4())
        verb = scope["method"]
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        path = raw_path.split("?", 1)[0]
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        if verb == "GET" and path == "/healthz":
            ready = self._ready()
            await _respond(
                send,
                200 if ready else 503,
                to_json_bytes({"status": "SERVING" if ready else "NOT_SERVING"}),
                rid,
            )
            return
        if verb == "GET" and path == "/openapi.json":
            await _respond(send, 200, self._openapi, rid)
            return
        route: Route | None = None
        try:
            route, variables = self._router.match(verb, path.strip("/").split("/"))
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            body = await self._read_body(headers, receive, route.max_request_bytes or self._max)
            request, rejection = self._build_request(
                route, variables, body, scope.get("query_string", b""), headers
            )
            response = await self._pipeline.invoke(
                route.method,
                request,
                headers,
                rid,
                peer=client_address(scope, self._trusted_proxies),
                rejection=rejection,
            )
            status = route.method.success_status
            if route.status_field is not None:
                status = getattr(response, route.status_field) or status
            if status == 204:
                await _respond(send, 204, b"", rid)
                return
            if route.binding.response_body:
                response = getattr(response, route.binding.response_body)
            await _respond(send, status, self._render(response), rid)
        except ApiError as error:
            await self._error(send, path, error, route, rid)
        except Exception:
            log.exception("unhandled error in REST request %s %s", verb, path)
            await self._error(send, path, internal_error(), route, rid)

    def _render(self, response: Message) -> bytes:
        last, body = self._rendered
        if response is not last:
            body = message_json_bytes(response)
            self._rendered = (response, body)
        return body

    async def _error(self, send: Send, path: str, error: ApiError, route: Route | None, rid: str) -> None:
        status, body, headers = error_response(path, error, route)
        await _respond(send, status, body, rid, headers)

    async def _read_body(self, headers: Mapping[str, str], receive: Receive, limit: int) -> bytes:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _build_request(
        self, route: Route, variables: dict[str, str], body: bytes, query: bytes, headers: Mapping[str, str]
    ) -> tuple[Message, ApiError | None]:
        """The request message, and the problems found reading it (raised by the
        pipeline after authentication). Malformed JSON fails at once."""
        method = route.method
        request = method.request_class()
        info = message_info(request.DESCRIPTOR)
        reader = Reader(reject_unknown=method.rules.reject_unknown_fields)
        body_field = route.binding.body
        if not body.strip():
            if route.body_required:
                reader.violations.append(Violation("body", "Field required", "missing"))
        elif not body_field:  # a body the method ignores must still be a JSON object
            if not isinstance(self._decode_body(method, body, headers), dict):
                reader.violations.append(Violation("body", "Input should be a valid dictionary", "dict_type"))
        else:
            data = self._decode_body(method, body, headers)
            target = request if body_field == "*" else getattr(request, body_field)
            if isinstance(target, Struct):
                # Partner bodies: any JSON object, validated by the servicer by exact name.
                if isinstance(data, dict):
                    target.SetInParent()  # {} is a body, with nothing in it
                    try:
                        target.update(data)
                    except (ValueError, TypeError, OverflowError):  # e.g. an integer beyond a double
                        raise unreadable_body() from None
                elif data is not None or not method.rules.null_body_is_empty:
                    reader.violations.append(
                        Violation("body", "Input should be a valid dictionary", "dict_type")
                    )
            elif not isinstance(data, dict):
                reader.violations.append(Violation("body", "Input should be a valid dictionary", "dict_type"))
            elif body_field == "*":
                for name in route.variables:
                    data.pop(name, None)
                reader.read_object(request, data, "body")
            else:
                target.SetInParent()
                reader.read_object(target, data, "body")
            if "update_mask" in info.by_name and route.binding.verb == "PATCH":
                request.update_mask.paths.extend(reader.present)  # type: ignore[attr-defined]
        if not body_field or route.method.descriptor.input_type.fields_by_name.get(body_field) is not None:
            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                field = info.by_name.get(name)
                if (
                    field is None
                    or field.output_only
                    or name in route.variables
                    or field.is_plain_message
                    or (body_field and name == body_field)
                    or body_field == "*"
                ):
                    continue
                reader.read_text(request, field, value, f"query.{name}", name)
        for header, name in route.header_fields:
            if header in headers:
                reader.read_text(request, info.by_name[name], headers[header], f"header.{header}", name)
        for name, value in variables.items():
            target, leaf = request, name
            while "." in leaf:
                head, leaf = leaf.split(".", 1)
                target = getattr(target, head)
            reader.read_text(
                target, message_info(target.DESCRIPTOR).by_name[leaf], value, f"path.{name}", leaf
            )
        if reader.violations:
            return request, validation_error(reader.violations)
        return request, None

    @staticmethod
    def _decode_body(method: MethodInfo, body: bytes, headers: Mapping[str, str]) -> Any:
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        form = content_type == "application/x-www-form-urlencoded"
        # curl and many clients label any -d body as a form: a JSON object is still JSON.
        if method.rules.accept_form and form and not body.lstrip().startswith(b"{"):
            return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        try:
            return loads(body)
        except ValueError:
            raise unreadable_body() from None


def _too_large(limit: int) -> ApiError:
    return ApiError("request_too_large", f"Request body must be at most {limit} bytes", 413)


async def _respond(
    send: Send, status: int, body: bytes, rid: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"x-request-id", rid.encode()), *(extra or ())]
    if status != 204:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
