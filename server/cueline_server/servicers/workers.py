from __future__ import annotations

from cueline.v1 import workers_pb2
from cueline_server.api.pipeline import Call
from cueline_server.servicers.convert import put_time, to_enum
from cueline_server.services.workers import WorkerService


class WorkerServicer:
    def __init__(self, workers: WorkerService) -> None:
        self._workers = workers

    async def RecordWorkerHeartbeat(
        self, request: workers_pb2.RecordWorkerHeartbeatRequest, call: Call
    ) -> workers_pb2.RecordWorkerHeartbeatResponse:
        moment = await self._workers.heartbeat(call.account, request.worker_id, list(request.handlers))
        response = workers_pb2.RecordWorkerHeartbeatResponse(acknowledged=True)
        put_time(response.server_time, moment)
        return response

    async def ListWorkers(
        self, request: workers_pb2.ListWorkersRequest, call: Call
    ) -> workers_pb2.ListWorkersResponse:
        response = workers_pb2.ListWorkersResponse()
        for view in await self._workers.all(call.account):
            worker = response.workers.add(
                worker_id=view.worker_id,
                seconds_since_heartbeat=view.seconds_since_heartbeat,
                heartbeat_status=to_enum(workers_pb2.HeartbeatStatus, view.heartbeat_status),
                handlers=view.handlers,
            )
            put_time(worker.last_heartbeat, view.last_heartbeat)
            put_time(worker.registered_since, view.registered_since)
        return response

    async def DeleteWorker(
        self, request: workers_pb2.DeleteWorkerRequest, call: Call
    ) -> workers_pb2.DeleteWorkerResponse:
        await self._workers.delete(call.account, request.worker_id)
        return workers_pb2.DeleteWorkerResponse()
