"""The gRPC side: every cueline.v1 method served through the pipeline, plus
grpc.health.v1 and server reflection.

Handlers are registered generically from the service descriptors, so an RPC
added to proto/ without a servicer method fails at start-up, not at call time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from cueline_server.api.descriptors import MethodInfo, methods, services
from cueline_server.api.pipeline import Pipeline
from cueline_server.api.ratelimit import GrpcRateLimit
from cueline_server.api.transcoder import Networks, forwarded_client
from cueline_server.errors import ApiError

ERROR_DOMAIN = "cueline"

_CODE_BY_ERROR = {
    "outcome_already_recorded": code_pb2.ALREADY_EXISTS,
    "duplicate_cue_name": code_pb2.ALREADY_EXISTS,
    "duplicate_email": code_pb2.ALREADY_EXISTS,
    "claim_failed": code_pb2.ABORTED,
    "cue_limit_exceeded": code_pb2.RESOURCE_EXHAUSTED,
    "CONCURRENT_MODIFICATION": code_pb2.ABORTED,
}
_CODE_BY_STATUS = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND,
    409: code_pb2.FAILED_PRECONDITION,
    413: code_pb2.RESOURCE_EXHAUSTED,
    422: code_pb2.INVALID_ARGUMENT,
    429: code_pb2.RESOURCE_EXHAUSTED,
    501: code_pb2.UNIMPLEMENTED,
    503: code_pb2.UNAVAILABLE,
}


def grpc_code(error: ApiError) -> int:
    code: int = _CODE_BY_ERROR.get(error.code) or _CODE_BY_STATUS.get(error.http_status, code_pb2.INTERNAL)
    return code


def status_proto(error: ApiError) -> status_pb2.Status:
    """AIP-193: the canonical code, ErrorInfo(reason=<documented code>) with
    the HTTP status in its metadata, and BadRequest for field errors."""
    status = status_pb2.Status(code=grpc_code(error), message=error.message)
    info = error_details_pb2.ErrorInfo(
        reason=error.code, domain=ERROR_DOMAIN, metadata={"http_status": str(error.http_status)}
    )
    packed = any_pb2.Any()
    packed.Pack(info)
    status.details.append(packed)
    if error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.message, reason=v.kind
                )
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        status.details.append(packed)
    return status


def _unary(
    pipeline: Pipeline, method: MethodInfo, rate_limit: GrpcRateLimit | None, trusted_proxies: Networks
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]:
    async def handle(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        metadata = {k.lower(): v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        rid = Pipeline.new_request_id(metadata.get("x-request-id"))
        # The request id travels in trailing metadata, which goes out with the
        # status; initial metadata would cost a separate send on every call.
        trailer = (("x-request-id", rid),)
        try:
            peer = forwarded_client(
                peer_address(context.peer()), metadata.get("x-forwarded-for"), trusted_proxies
            )
            if rate_limit is not None:
                rate_limit.check(method.full_name, peer)
            response = await pipeline.invoke(method, request, metadata, rid, peer=peer)
        except ApiError as error:
            status = rpc_status.to_status(status_proto(error))
            await context.abort(status.code, status.details, status.trailing_metadata + trailer)
            raise  # abort raises; this line is never reached
        context.set_trailing_metadata(trailer)
        return response

    return handle


def peer_address(peer: str) -> str:
    """The address in a gRPC peer string (ipv4:127.0.0.1:5000, ipv6:[::1]:5000, unix:...)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def service_names() -> list[str]:
    return [s.full_name for s in services()]


# How long calls in flight on a connection told to go away may still run: the
# longest long poll (60 s) and some.
MAX_CONNECTION_AGE_GRACE_SECONDS = 70


def new_server(
    max_message_bytes: int, reuse_port: bool = False, max_connection_age_seconds: float = 0.0
) -> grpc.aio.Server:
    """The bare grpc.aio server with cueline's options (also what the
    benchmark's echo ceiling serves on, so both run with the same settings).
    Without reuse_port, a port another process serves is refused at start.
    With a maximum connection age, clients reconnect that often (gRPC adds
    jitter), which is what moves a long-lived channel between processes."""
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    if max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", max(1, round(max_connection_age_seconds * 1000))),
            ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_SECONDS * 1000),
        ]
    return grpc.aio.server(options=options)


def build_server(
    pipeline: Pipeline,
    health_servicer: health.aio.HealthServicer,
    max_message_bytes: int,
    rate_limit: GrpcRateLimit | None = None,
    trusted_proxies: Networks = (),
    reuse_port: bool = False,
    max_connection_age_seconds: float = 0.0,
) -> grpc.aio.Server:
    server = new_server(max_message_bytes, reuse_port, max_connection_age_seconds)
    by_service: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
    for method in methods():
        by_service.setdefault(method.service, {})[method.name] = grpc.unary_unary_rpc_method_handler(
            _unary(pipeline, method, rate_limit, trusted_proxies),
            request_deserializer=method.request_class.FromString,
            response_serializer=method.response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(name, handlers) for name, handlers in by_service.items()]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *service_names(),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return server
