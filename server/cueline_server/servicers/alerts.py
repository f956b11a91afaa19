from __future__ import annotations

from cueline.v1 import alerts_pb2
from cueline_server.api.pipeline import Call
from cueline_server.servicers.convert import get_time, put_time
from cueline_server.services.alerts import AlertService
from cueline_server.store.repositories import AnyRow


def alert_message(row: AnyRow, target: alerts_pb2.Alert | None = None) -> alerts_pb2.Alert:
    alert = target if target is not None else alerts_pb2.Alert()
    alert.id = str(row.id)
    if row.cue_id is not None:
        alert.cue_id = row.cue_id
    if row.execution_id is not None:
        alert.execution_id = str(row.execution_id)
    alert.alert_type = row.alert_type
    alert.severity = row.severity
    alert.message = row.message
    alert.metadata = row.metadata
    alert.acknowledged = row.acknowledged
    put_time(alert.created_at, row.created_at)
    return alert


class AlertServicer:
    def __init__(self, alerts: AlertService) -> None:
        self._alerts = alerts

    async def ListAlerts(
        self, request: alerts_pb2.ListAlertsRequest, call: Call
    ) -> alerts_pb2.ListAlertsResponse:
        page = await self._alerts.page(
            call.account,
            alert_type=request.alert_type if request.HasField("alert_type") else None,
            cue_id=request.cue_id if request.HasField("cue_id") else None,
            acknowledged=request.acknowledged if request.HasField("acknowledged") else None,
            since=get_time(request, "since"),
            limit=request.limit if request.HasField("limit") else None,
            offset=request.offset if request.HasField("offset") else None,
        )
        response = alerts_pb2.ListAlertsResponse(total=page.total, limit=page.limit, offset=page.offset)
        for row in page.alerts:
            alert_message(row, response.alerts.add())
        return response

    async def AcknowledgeAlert(
        self, request: alerts_pb2.AcknowledgeAlertRequest, call: Call
    ) -> alerts_pb2.AcknowledgeAlertResponse:
        row = await self._alerts.acknowledge(call.account, request.alert_id)
        response = alerts_pb2.AcknowledgeAlertResponse()
        alert_message(row, response.alert)
        return response
