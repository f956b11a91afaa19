"""`python -m bench.echo`: the gRPC framework ceiling.

OutcomeService.RecordOutcome answered at once, with no authentication, no
pipeline and no database, registered the way cueline registers its methods on
the same grpc.aio server (same options, one process, the event loop it picks
by default) that `cueline serve` builds. The harness
drives it with the very load generator it uses for G1, so the ratio of the two
is what cueline's own work costs. Prints `echo serving grpc=HOST:PORT`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from cueline.v1 import outcomes_pb2
from cueline_server.api.grpc_server import new_server
from cueline_server.config import Settings
from cueline_server.eventloop import loop_factory

READY = "echo serving grpc="


async def record(
    request: outcomes_pb2.RecordOutcomeRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> outcomes_pb2.RecordOutcomeResponse:
    return outcomes_pb2.RecordOutcomeResponse(execution_id=request.execution_id, outcome_recorded=True)


async def serve() -> None:
    defaults = Settings()
    server = new_server(
        defaults.max_request_bytes, max_connection_age_seconds=defaults.grpc_max_connection_age_seconds
    )
    handler = grpc.unary_unary_rpc_method_handler(
        record,
        request_deserializer=outcomes_pb2.RecordOutcomeRequest.FromString,
        response_serializer=outcomes_pb2.RecordOutcomeResponse.SerializeToString,
    )
    service = outcomes_pb2.DESCRIPTOR.services_by_name["OutcomeService"].full_name
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {"RecordOutcome": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{READY}127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=loop_factory(Settings.from_env().event_loop)) as runner:
        runner.run(serve())
