"""TaskManagementService: check the caller's role, decode, call TaskService (or OperatorAuthService), encode."""

from __future__ import annotations

import grpc

from fedcompute.core.errors import InvalidArgument
from fedcompute.keys.policy import from_message
from fedcompute.rpc.auth import bearer_token
from fedcompute.server.encoding import decode_spec, encode_iteration, encode_model_version, encode_task
from fedcompute.server.operator_auth import OperatorAuthService, Role
from fedcompute.server.tasks import TaskService
from fedcompute.store.operator_tokens import OperatorTokenRecord
from fedcompute.v1 import task_management_pb2 as pb
from fedcompute.v1 import task_management_pb2_grpc


def encode_operator_token(record: OperatorTokenRecord) -> pb.OperatorToken:
    role = pb.OperatorRole.ValueType(Role.parse(record.role).value)
    message = pb.OperatorToken(token_id=record.token_id, name=record.name, role=role)
    message.created_time.FromDatetime(record.created_at)
    if record.revoked_at is not None:
        message.revoked_time.FromDatetime(record.revoked_at)
    return message


def decode_role(role: pb.OperatorRole.ValueType) -> Role:
    if role not in (r.value for r in Role):
        raise InvalidArgument("role", "must be OPERATOR_ROLE_VIEWER, OPERATOR_ROLE_OPERATOR or OPERATOR_ROLE_ADMIN")
    return Role(int(role))


class TaskManagementServicer(task_management_pb2_grpc.TaskManagementServiceServicer):
    def __init__(self, tasks: TaskService, auth: OperatorAuthService) -> None:
        self._tasks = tasks
        self._auth = auth

    def _allow(self, context: grpc.ServicerContext, role: Role) -> OperatorTokenRecord:
        return self._auth.authorize(bearer_token(context), role)

    def CreateTask(self, request: pb.CreateTaskRequest, context: grpc.ServicerContext) -> pb.CreateTaskResponse:
        self._allow(context, Role.OPERATOR)
        policy = from_message(request.access_policy.policy) if request.HasField("access_policy") else None
        signed = request.access_policy.SerializeToString()
        return pb.CreateTaskResponse(task=encode_task(self._tasks.create(decode_spec(request.spec), policy, signed)))

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.GetTaskResponse:
        self._allow(context, Role.VIEWER)
        return pb.GetTaskResponse(task=encode_task(self._tasks.get(request.task_id)))

    def ListTasks(self, request: pb.ListTasksRequest, context: grpc.ServicerContext) -> pb.ListTasksResponse:
        self._allow(context, Role.VIEWER)
        status = ""
        if request.status != pb.TASK_STATUS_UNSPECIFIED:
            if request.status not in pb.TaskStatus.values():
                raise InvalidArgument("status", f"unknown task status {request.status}")
            status = pb.TaskStatus.Name(request.status).removeprefix("TASK_STATUS_")
        tasks, token = self._tasks.page(request.population_name, request.page_size, request.page_token, status)
        return pb.ListTasksResponse(tasks=[encode_task(t) for t in tasks], next_page_token=token)

    def CancelTask(self, request: pb.CancelTaskRequest, context: grpc.ServicerContext) -> pb.CancelTaskResponse:
        self._allow(context, Role.OPERATOR)
        return pb.CancelTaskResponse(task=encode_task(self._tasks.cancel(request.task_id, request.reason)))

    def ListIterations(
        self, request: pb.ListIterationsRequest, context: grpc.ServicerContext
    ) -> pb.ListIterationsResponse:
        self._allow(context, Role.VIEWER)
        return pb.ListIterationsResponse(
            iterations=[encode_iteration(i) for i in self._tasks.iterations(request.task_id)]
        )

    def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelVersionsResponse:
        self._allow(context, Role.VIEWER)
        versions = self._tasks.model_versions(request.task_id)
        return pb.ListModelVersionsResponse(versions=[encode_model_version(v) for v in versions])

    def CreateOperatorToken(
        self, request: pb.CreateOperatorTokenRequest, context: grpc.ServicerContext
    ) -> pb.CreateOperatorTokenResponse:
        caller = self._allow(context, Role.ADMIN)
        record, token = self._auth.create(request.name, decode_role(request.role), by=f"token {caller.name!r}")
        return pb.CreateOperatorTokenResponse(operator_token=encode_operator_token(record), token=token)

    def RevokeOperatorToken(
        self, request: pb.RevokeOperatorTokenRequest, context: grpc.ServicerContext
    ) -> pb.RevokeOperatorTokenResponse:
        caller = self._allow(context, Role.ADMIN)
        revoked = self._auth.revoke(request.name_or_id, by=f"token {caller.name!r}")
        return pb.RevokeOperatorTokenResponse(operator_tokens=[encode_operator_token(r) for r in revoked])

    def ListOperatorTokens(
        self, request: pb.ListOperatorTokensRequest, context: grpc.ServicerContext
    ) -> pb.ListOperatorTokensResponse:
        self._allow(context, Role.ADMIN)
        return pb.ListOperatorTokensResponse(operator_tokens=[encode_operator_token(r) for r in self._auth.tokens()])
