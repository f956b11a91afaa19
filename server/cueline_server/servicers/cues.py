from __future__ import annotations

from cueline.v1 import cues_pb2, executions_pb2
from cueline_server.api.pipeline import Call
from cueline_server.errors import ApiError
from cueline_server.servicers.convert import draft, from_enum, get_time, put_time
from cueline_server.servicers.resources import cue_message, execution_message
from cueline_server.services.accounts import now
from cueline_server.services.cues import CueService
from cueline_server.services.schedules import preview


class CueServicer:
    def __init__(self, cues: CueService) -> None:
        self._cues = cues

    async def CreateCue(self, request: cues_pb2.CreateCueRequest, call: Call) -> cues_pb2.CreateCueResponse:
        try:
            view = await self._cues.create(call.account, draft(request.cue))
        except ApiError as error:
            raise error.within("cue") from None
        response = cues_pb2.CreateCueResponse()
        cue_message(view, response.cue)
        return response

    async def ListCues(self, request: cues_pb2.ListCuesRequest, call: Call) -> cues_pb2.ListCuesResponse:
        page = await self._cues.page(
            call.account,
            from_enum(cues_pb2.CueStatus, request.status),
            request.limit if request.HasField("limit") else None,
            request.offset if request.HasField("offset") else None,
        )
        response = cues_pb2.ListCuesResponse(total=page.total, limit=page.limit, offset=page.offset)
        for view in page.cues:
            cue_message(view, response.cues.add())
        return response

    async def GetCue(self, request: cues_pb2.GetCueRequest, call: Call) -> cues_pb2.GetCueResponse:
        detail = await self._cues.detail(
            call.account,
            request.cue_id,
            request.execution_limit if request.HasField("execution_limit") else None,
            request.execution_offset if request.HasField("execution_offset") else None,
        )
        response = cues_pb2.GetCueResponse(
            execution_total=detail.total, execution_limit=detail.limit, execution_offset=detail.offset
        )
        cue_message(detail.cue, response.cue)
        for row in detail.executions:
            execution_message(row, response.executions.add())
        return response

    async def UpdateCue(self, request: cues_pb2.UpdateCueRequest, call: Call) -> cues_pb2.UpdateCueResponse:
        try:
            view = await self._cues.update(
                call.account, request.cue_id, draft(request.cue, request.update_mask.paths)
            )
        except ApiError as error:
            raise error.within("cue") from None
        response = cues_pb2.UpdateCueResponse()
        cue_message(view, response.cue)
        return response

    async def DeleteCue(self, request: cues_pb2.DeleteCueRequest, call: Call) -> cues_pb2.DeleteCueResponse:
        await self._cues.delete(call.account, request.cue_id)
        return cues_pb2.DeleteCueResponse()

    async def PreviewSchedule(
        self, request: cues_pb2.PreviewScheduleRequest, call: Call
    ) -> cues_pb2.PreviewScheduleResponse:
        schedule = request.schedule
        try:
            times = preview(
                from_enum(cues_pb2.ScheduleType, schedule.type),
                schedule.cron if schedule.HasField("cron") else None,
                get_time(schedule, "at"),
                schedule.timezone if schedule.HasField("timezone") else "UTC",
                get_time(request, "after") or now(),
                request.count if request.HasField("count") else 10,
            )
        except ApiError as error:
            raise error.within("schedule") from None
        response = cues_pb2.PreviewScheduleResponse()
        for item in times:
            entry = response.fire_times.add(
                local_time=item.local.isoformat(),
                utc_offset_seconds=int(item.local.utcoffset().total_seconds()),  # type: ignore[union-attr]
                dst_transition=item.dst_transition,
            )
            put_time(entry.at, item.at)
        return response

    async def FireCue(self, request: cues_pb2.FireCueRequest, call: Call) -> cues_pb2.FireCueResponse:
        fired = await self._cues.fire(
            call.account,
            request.cue_id,
            send_at=get_time(request, "send_at"),
            payload_override=request.payload_override if request.HasField("payload_override") else None,
            replace=request.merge_strategy == cues_pb2.MERGE_STRATEGY_REPLACE,
            idempotency_key=request.idempotency_key if request.HasField("idempotency_key") else None,
        )
        response = cues_pb2.FireCueResponse(
            id=fired.execution_id,
            cue_id=fired.cue_id,
            status=executions_pb2.EXECUTION_STATUS_PENDING,
            triggered_by=executions_pb2.TRIGGERED_BY_MANUAL_FIRE,
        )
        put_time(response.scheduled_for, fired.scheduled_for)
        return response
