from __future__ import annotations

from cueline.v1 import executions_pb2
from cueline_server.api.pipeline import Call
from cueline_server.servicers.convert import from_enum, put_time
from cueline_server.servicers.resources import execution_message
from cueline_server.services.executions import ExecutionService


class ExecutionServicer:
    def __init__(self, executions: ExecutionService) -> None:
        self._executions = executions

    async def ListExecutions(
        self, request: executions_pb2.ListExecutionsRequest, call: Call
    ) -> executions_pb2.ListExecutionsResponse:
        page = await self._executions.page(
            call.account,
            cue_id=request.cue_id if request.HasField("cue_id") else None,
            status=from_enum(executions_pb2.ExecutionStatus, request.status),
            limit=request.limit if request.HasField("limit") else None,
            offset=request.offset if request.HasField("offset") else None,
        )
        response = executions_pb2.ListExecutionsResponse(
            total=page.total, limit=page.limit, offset=page.offset, has_more=page.has_more
        )
        for row in page.executions:
            execution_message(row, response.executions.add())
        put_time(response.oldest_claimed_at, page.oldest_claimed_at)
        return response

    async def GetExecution(
        self, request: executions_pb2.GetExecutionRequest, call: Call
    ) -> executions_pb2.GetExecutionResponse:
        row = await self._executions.get(call.account, request.execution_id)
        response = executions_pb2.GetExecutionResponse()
        execution_message(row, response.execution)
        return response
