from __future__ import annotations

import weakref
from typing import Any

from cueline.v1 import executions_pb2, outcomes_pb2
from cueline_server.api.pipeline import Call
from cueline_server.servicers.convert import from_enum, put_time
from cueline_server.servicers.resources import execution_message
from cueline_server.services.claims import ClaimablePage, ClaimService
from cueline_server.services.executions import ExecutionService
from cueline_server.store.repositories import AnyRow

REMEMBERED_ITEMS, REMEMBERED_PAYLOAD = 4096, 1024


class ExecutionServicer:
    def __init__(self, executions: ExecutionService, claims: ClaimService) -> None:
        self._executions = executions
        self._claims = claims
        # The response built for each claimable page still held by a caller:
        # concurrent calls that share a page share its response (never changed
        # once built), so it is built, and rendered for REST, once.
        self._lists: weakref.WeakKeyDictionary[
            ClaimablePage, executions_pb2.ListClaimableExecutionsResponse
        ] = weakref.WeakKeyDictionary()
        # The item built for each recent claimable row (small payloads only), by
        # the row's values: successive pages of a busy list share most rows.
        self._items: dict[AnyRow, executions_pb2.ClaimableExecution] = {}

    async def ListExecutions(
        self, request: executions_pb2.ListExecutionsRequest, call: Call
    ) -> executions_pb2.ListExecutionsResponse:
        def given(name: str) -> Any:
            return getattr(request, name) if request.HasField(name) else None  # type: ignore[arg-type]

        page = await self._executions.page(
            call.account,
            status=from_enum(executions_pb2.ExecutionStatus, request.status),
            status_in=given("status_in"),
            limit=given("limit"),
            offset=given("offset"),
            cue_id=given("cue_id"),
            worker_id=given("worker_id"),
            outcome_state=from_enum(outcomes_pb2.OutcomeState, request.outcome_state),
            triggered_by=from_enum(executions_pb2.TriggeredBy, request.triggered_by),
            has_evidence=given("has_evidence"),
            result_type=given("result_type"),
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

    async def ListClaimableExecutions(
        self, request: executions_pb2.ListClaimableExecutionsRequest, call: Call
    ) -> executions_pb2.ListClaimableExecutionsResponse:
        page = await self._claims.claimable(
            call.account,
            request.task if request.HasField("task") else None,
            request.limit if request.HasField("limit") else None,
            agent=request.agent if request.HasField("agent") else None,
        )
        response = self._lists.get(page)
        if response is None:
            response = executions_pb2.ListClaimableExecutionsResponse()
            response.executions.extend(self._claimable_item(row) for row in page.rows)
            self._lists[page] = response
        return response

    def _claimable_item(self, row: AnyRow) -> executions_pb2.ClaimableExecution:
        item = self._items.get(row)
        if item is None:
            item = executions_pb2.ClaimableExecution(
                execution_id=str(row.id), cue_id=row.cue_id, cue_name=row.cue_name, payload=row.payload,
                attempt=row.attempts,
            )  # fmt: skip
            if row.task is not None:
                item.task = row.task
            put_time(item.scheduled_for, row.scheduled_for)
            if len(row.payload) <= REMEMBERED_PAYLOAD:
                if len(self._items) >= REMEMBERED_ITEMS:
                    self._items.clear()
                self._items[row] = item
        return item

    async def ClaimNextExecution(
        self, request: executions_pb2.ClaimNextExecutionRequest, call: Call
    ) -> executions_pb2.ClaimNextExecutionResponse:
        row = await self._claims.claim_next(
            call.account, request.worker_id, request.task if request.HasField("task") else None
        )
        response = executions_pb2.ClaimNextExecutionResponse()
        self._claim(row, response.claim)
        return response

    async def ClaimExecution(
        self, request: executions_pb2.ClaimExecutionRequest, call: Call
    ) -> executions_pb2.ClaimExecutionResponse:
        row = await self._claims.claim(call.account, request.worker_id, request.execution_id)
        response = executions_pb2.ClaimExecutionResponse()
        self._claim(row, response.claim)
        return response

    async def ClaimExecutions(
        self, request: executions_pb2.ClaimExecutionsRequest, call: Call
    ) -> executions_pb2.ClaimExecutionsResponse:
        rows = await self._claims.claim_batch(
            call.account,
            request.worker_id,
            request.task if request.HasField("task") else None,
            request.max_executions,
            request.wait_seconds,
        )
        response = executions_pb2.ClaimExecutionsResponse()
        for row in rows:
            self._claim(row, response.claims.add())
        return response

    def _claim(self, row: AnyRow, claim: executions_pb2.Claim) -> None:
        claim.claimed = True
        claim.execution_id = str(row.id)
        claim.lease_seconds = int(self._claims.lease.total_seconds())
        put_time(claim.lease_expires_at, row.lease_expires_at)
        claim.cue_id = row.cue_id
        if row.task is not None:
            claim.task = row.task
        claim.payload = row.payload
        claim.attempts = row.attempts
        claim.fencing_token = row.attempts

    async def HeartbeatExecution(
        self, request: executions_pb2.HeartbeatExecutionRequest, call: Call
    ) -> executions_pb2.HeartbeatExecutionResponse:
        until = await self._claims.heartbeat(
            call.account,
            request.execution_id,
            request.worker_id if request.HasField("worker_id") else None,
            request.fencing_token if request.HasField("fencing_token") else None,
        )
        response = executions_pb2.HeartbeatExecutionResponse(
            execution_id=request.execution_id, acknowledged=True
        )
        put_time(response.lease_extended_until, until)
        return response

    async def ReplayExecution(
        self, request: executions_pb2.ReplayExecutionRequest, call: Call
    ) -> executions_pb2.ReplayExecutionResponse:
        row = await self._claims.replay(call.account, request.execution_id)
        response = executions_pb2.ReplayExecutionResponse(
            id=str(row.id),
            cue_id=row.cue_id,
            status=executions_pb2.EXECUTION_STATUS_PENDING,
            triggered_by=executions_pb2.TRIGGERED_BY_REPLAY,
            replayed_from=request.execution_id.lower(),
        )
        put_time(response.scheduled_for, row.scheduled_for)
        return response
