"""TaskManagementService: decode, call TaskService, encode."""

from __future__ import annotations

import grpc

from fedcompute.keys.policy import from_message
from fedcompute.server.encoding import decode_spec, encode_iteration, encode_model_version, encode_task
from fedcompute.server.tasks import TaskService
from fedcompute.v1 import task_management_pb2 as pb
from fedcompute.v1 import task_management_pb2_grpc


class TaskManagementServicer(task_management_pb2_grpc.TaskManagementServiceServicer):
    def __init__(self, tasks: TaskService) -> None:
        self._tasks = tasks

    def CreateTask(self, request: pb.CreateTaskRequest, context: grpc.ServicerContext) -> pb.CreateTaskResponse:
        policy = from_message(request.access_policy.policy) if request.HasField("access_policy") else None
        signed = request.access_policy.SerializeToString()
        return pb.CreateTaskResponse(task=encode_task(self._tasks.create(decode_spec(request.spec), policy, signed)))

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.GetTaskResponse:
        return pb.GetTaskResponse(task=encode_task(self._tasks.get(request.task_id)))

    def ListTasks(self, request: pb.ListTasksRequest, context: grpc.ServicerContext) -> pb.ListTasksResponse:
        tasks, token = self._tasks.page(request.population_name, request.page_size, request.page_token)
        return pb.ListTasksResponse(tasks=[encode_task(t) for t in tasks], next_page_token=token)

    def CancelTask(self, request: pb.CancelTaskRequest, context: grpc.ServicerContext) -> pb.CancelTaskResponse:
        return pb.CancelTaskResponse(task=encode_task(self._tasks.cancel(request.task_id, request.reason)))

    def ListIterations(
        self, request: pb.ListIterationsRequest, context: grpc.ServicerContext
    ) -> pb.ListIterationsResponse:
        return pb.ListIterationsResponse(
            iterations=[encode_iteration(i) for i in self._tasks.iterations(request.task_id)]
        )

    def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelVersionsResponse:
        versions = self._tasks.model_versions(request.task_id)
        return pb.ListModelVersionsResponse(versions=[encode_model_version(v) for v in versions])
