from __future__ import annotations

from cueline.v1 import probes_pb2
from cueline_server.api.pipeline import Call
from cueline_server.servicers.convert import put_time
from cueline_server.services.probes import ProbeService


class ProbeServicer:
    def __init__(self, probes: ProbeService) -> None:
        self._probes = probes

    async def GetHealth(
        self, request: probes_pb2.GetHealthRequest, call: Call
    ) -> probes_pb2.GetHealthResponse:
        health = await self._probes.health()
        response = probes_pb2.GetHealthResponse(
            status=health.status,
            version=health.version,
            services=probes_pb2.HealthServices(database=health.database, scheduler=health.scheduler),
            queue=probes_pb2.HealthQueue(**health.queue),
        )
        put_time(response.timestamp, health.timestamp)
        return response

    async def GetStatus(
        self, request: probes_pb2.GetStatusRequest, call: Call
    ) -> probes_pb2.GetStatusResponse:
        status, reason, http_status = await self._probes.status()
        response = probes_pb2.GetStatusResponse(status=status, http_status=http_status)
        if reason is not None:
            response.reason = reason
        return response
