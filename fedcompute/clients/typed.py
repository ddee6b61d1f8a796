"""Typed client wrappers: one method per RPC, a required deadline, retries only for idempotent calls."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError

from fedcompute.rpc import wire
from fedcompute.rpc.auth import bearer_metadata
from fedcompute.rpc.channels import idempotent
from fedcompute.v1 import (
    aggregation_pb2,
    aggregation_pb2_grpc,
    key_pb2,
    key_pb2_grpc,
    resource_pb2,
    resource_pb2_grpc,
    task_assignment_pb2,
    task_assignment_pb2_grpc,
    task_management_pb2,
    task_management_pb2_grpc,
    upload_pb2,
    upload_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)


class TaskManagementClient:
    """For operators; every call carries the operator token (``token``: FEDCOMPUTE_OPERATOR_TOKEN) when given."""

    def __init__(self, channel: grpc.Channel, timeout_s: float, token: str = "") -> None:
        self._stub = task_management_pb2_grpc.TaskManagementServiceStub(channel)
        self._timeout = timeout_s
        self._md = bearer_metadata(token) if token else ()

    def create_task(self, request: task_management_pb2.CreateTaskRequest) -> task_management_pb2.CreateTaskResponse:
        return self._stub.CreateTask(request, timeout=self._timeout, metadata=self._md)

    @idempotent()
    def get_task(self, request: task_management_pb2.GetTaskRequest) -> task_management_pb2.GetTaskResponse:
        return self._stub.GetTask(request, timeout=self._timeout, metadata=self._md)

    @idempotent()
    def list_tasks(self, request: task_management_pb2.ListTasksRequest) -> task_management_pb2.ListTasksResponse:
        return self._stub.ListTasks(request, timeout=self._timeout, metadata=self._md)

    @idempotent()
    def cancel_task(self, request: task_management_pb2.CancelTaskRequest) -> task_management_pb2.CancelTaskResponse:
        return self._stub.CancelTask(request, timeout=self._timeout, metadata=self._md)

    @idempotent()
    def list_iterations(
        self, request: task_management_pb2.ListIterationsRequest
    ) -> task_management_pb2.ListIterationsResponse:
        return self._stub.ListIterations(request, timeout=self._timeout, metadata=self._md)

    @idempotent()
    def list_model_versions(
        self, request: task_management_pb2.ListModelVersionsRequest
    ) -> task_management_pb2.ListModelVersionsResponse:
        return self._stub.ListModelVersions(request, timeout=self._timeout, metadata=self._md)

    def create_operator_token(
        self, request: task_management_pb2.CreateOperatorTokenRequest
    ) -> task_management_pb2.CreateOperatorTokenResponse:
        return self._stub.CreateOperatorToken(request, timeout=self._timeout, metadata=self._md)

    @idempotent()
    def revoke_operator_token(
        self, request: task_management_pb2.RevokeOperatorTokenRequest
    ) -> task_management_pb2.RevokeOperatorTokenResponse:
        return self._stub.RevokeOperatorToken(request, timeout=self._timeout, metadata=self._md)

    @idempotent()
    def list_operator_tokens(
        self, request: task_management_pb2.ListOperatorTokensRequest
    ) -> task_management_pb2.ListOperatorTokensResponse:
        return self._stub.ListOperatorTokens(request, timeout=self._timeout, metadata=self._md)


class TaskAssignmentClient:
    def __init__(self, channel: grpc.Channel, timeout_s: float) -> None:
        self._stub = task_assignment_pb2_grpc.TaskAssignmentServiceStub(channel)
        self._timeout = timeout_s

    def create_task_assignment(
        self, request: task_assignment_pb2.CreateTaskAssignmentRequest
    ) -> task_assignment_pb2.CreateTaskAssignmentResponse:
        return self._stub.CreateTaskAssignment(request, timeout=self._timeout)

    @idempotent()
    def report_result(
        self, request: task_assignment_pb2.ReportResultRequest
    ) -> task_assignment_pb2.ReportResultResponse:
        return self._stub.ReportResult(request, timeout=self._timeout)


_UPLOAD = upload_pb2.DESCRIPTOR.services_by_name["UploadService"]
_WRITE_PATH = f"/{_UPLOAD.full_name}/{_UPLOAD.methods_by_name['Write'].name}"


def encode_write(
    offset: int,
    data: bytes | memoryview,
    finish: bool,
    resource_name: str = "",
    upload_token: str = "",
    metadata: upload_pb2.UploadMetadata | None = None,
) -> bytes:
    """A ``WriteRequest``, encoded here (``rpc.wire``): ``data`` may be a view of the envelope, copied once into
    the message, where building the message copied a slice of it and serializing copied it again. Byte for byte
    ``SerializeToString``'s output (tests) for what devices send: ``metadata`` is never all defaults (it declares a
    size and a 64-character hash), so leaving an empty one out as ``wire.message`` does changes nothing."""
    declared = metadata.SerializeToString() if metadata is not None else b""
    return wire.message((1, resource_name), (2, offset), (3, int(finish)), (4, data), (5, upload_token), (6, declared))


class UploadClient:
    def __init__(self, channel: grpc.Channel, timeout_s: float) -> None:
        self._stub = upload_pb2_grpc.UploadServiceStub(channel)
        self._encoded = channel.stream_unary(
            _WRITE_PATH, request_serializer=bytes, response_deserializer=upload_pb2.WriteResponse.FromString
        )
        self._timeout = timeout_s

    def write(self, requests: Iterable[upload_pb2.WriteRequest]) -> upload_pb2.WriteResponse:
        return self._stub.Write(iter(requests), timeout=self._timeout)

    def write_encoded(self, requests: Iterable[bytes]) -> upload_pb2.WriteResponse:
        """``write`` with requests the caller encoded (``encode_write``), sent as they are."""
        response: upload_pb2.WriteResponse = self._encoded(iter(requests), timeout=self._timeout)
        return response

    @idempotent()
    def query_write_status(self, request: upload_pb2.QueryWriteStatusRequest) -> upload_pb2.QueryWriteStatusResponse:
        return self._stub.QueryWriteStatus(request, timeout=self._timeout)


class ResourceClient:
    def __init__(self, channel: grpc.Channel, timeout_s: float) -> None:
        self._stub = resource_pb2_grpc.ResourceServiceStub(channel)
        self._timeout = timeout_s

    def read(self, request: resource_pb2.ReadRequest) -> Iterator[resource_pb2.ReadResponse]:
        return iter(self._stub.Read(request, timeout=self._timeout))


class StreamedContribution(NamedTuple):
    """A ``StreamContributionsResponse`` as the worker reads it (``wire.length_delimited``, not protobuf's parser,
    which copies the envelope twice): the envelope is a view of the message received."""

    assignment_id: str
    envelope: memoryview


_STREAMED = aggregation_pb2.StreamContributionsResponse.DESCRIPTOR.fields_by_name
_ASSIGNMENT_ID, _ENVELOPE = _STREAMED["assignment_id"].number, _STREAMED["envelope"].number
_AGGREGATION = aggregation_pb2.DESCRIPTOR.services_by_name["AggregationService"]
_STREAM_PATH = f"/{_AGGREGATION.full_name}/{_AGGREGATION.methods_by_name['StreamContributions'].name}"


def streamed_contribution(raw: bytes) -> StreamedContribution:
    """One ``StreamContributionsResponse`` from its bytes; ``ValueError`` for what protobuf's parser refuses too
    (gRPC then ends the call INTERNAL, as it does when that parser fails)."""
    try:
        fields = wire.length_delimited(raw, frozenset({_ASSIGNMENT_ID, _ENVELOPE}))
    except wire.TooManyFields:  # not what our server sends: protobuf reads it whole
        try:
            parsed = aggregation_pb2.StreamContributionsResponse.FromString(raw)
        except DecodeError as exc:
            raise ValueError(str(exc)) from None
        return StreamedContribution(parsed.assignment_id, memoryview(parsed.envelope))
    empty = memoryview(b"")
    return StreamedContribution(bytes(fields.get(_ASSIGNMENT_ID, empty)).decode(), fields.get(_ENVELOPE, empty))


class AggregationClient:
    """For aggregator workers; every call carries the internal bearer token."""

    def __init__(self, channel: grpc.Channel, timeout_s: float, token: str) -> None:
        self._stub = aggregation_pb2_grpc.AggregationServiceStub(channel)
        self._contributions = channel.unary_stream(
            _STREAM_PATH,
            request_serializer=aggregation_pb2.StreamContributionsRequest.SerializeToString,
            response_deserializer=streamed_contribution,
        )
        self._timeout = timeout_s
        self._md = bearer_metadata(token)

    @idempotent()
    def claim_job(self, request: aggregation_pb2.ClaimJobRequest) -> aggregation_pb2.ClaimJobResponse:
        return self._stub.ClaimJob(request, timeout=self._timeout, metadata=self._md)

    @idempotent()
    def extend_lease(self, request: aggregation_pb2.ExtendLeaseRequest) -> aggregation_pb2.ExtendLeaseResponse:
        return self._stub.ExtendLease(request, timeout=self._timeout, metadata=self._md)

    def stream_contributions(
        self, request: aggregation_pb2.StreamContributionsRequest
    ) -> Iterator[StreamedContribution]:
        return iter(self._contributions(request, timeout=self._timeout, metadata=self._md))

    @idempotent()
    def complete_job(self, request: aggregation_pb2.CompleteJobRequest) -> aggregation_pb2.CompleteJobResponse:
        return self._stub.CompleteJob(request, timeout=self._timeout, metadata=self._md)

    @idempotent()
    def fail_job(self, request: aggregation_pb2.FailJobRequest) -> aggregation_pb2.FailJobResponse:
        return self._stub.FailJob(request, timeout=self._timeout, metadata=self._md)


class KeyClient:
    def __init__(self, channel: grpc.Channel, timeout_s: float, token: str = "") -> None:
        self._stub = key_pb2_grpc.KeyServiceStub(channel)
        self._timeout = timeout_s
        self._md = bearer_metadata(token) if token else ()

    @idempotent()
    def get_public_keys(self, request: key_pb2.GetPublicKeysRequest) -> key_pb2.GetPublicKeysResponse:
        return self._stub.GetPublicKeys(request, timeout=self._timeout)

    @idempotent()
    def get_provider_info(self, request: key_pb2.GetProviderInfoRequest) -> key_pb2.GetProviderInfoResponse:
        return self._stub.GetProviderInfo(request, timeout=self._timeout)

    def reachable(self, timeout_s: float = 2.0) -> bool:
        """One quick GetProviderInfo, no retries: is this key service up right now?"""
        try:
            self._stub.GetProviderInfo(key_pb2.GetProviderInfoRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return True

    def release_key_share(self, request: key_pb2.ReleaseKeyShareRequest) -> key_pb2.ReleaseKeyShareResponse:
        return self._stub.ReleaseKeyShare(request, timeout=self._timeout)

    @idempotent()
    def import_key_share(self, request: key_pb2.ImportKeyShareRequest) -> key_pb2.ImportKeyShareResponse:
        return self._stub.ImportKeyShare(request, timeout=self._timeout, metadata=self._md)

    @idempotent()
    def activate_key(self, request: key_pb2.ActivateKeyRequest) -> key_pb2.ActivateKeyResponse:
        return self._stub.ActivateKey(request, timeout=self._timeout, metadata=self._md)

    @idempotent()
    def register_policy(self, request: key_pb2.RegisterPolicyRequest) -> key_pb2.RegisterPolicyResponse:
        return self._stub.RegisterPolicy(request, timeout=self._timeout, metadata=self._md)

    @idempotent()
    def get_release_log(self, request: key_pb2.GetReleaseLogRequest) -> key_pb2.GetReleaseLogResponse:
        return self._stub.GetReleaseLog(request, timeout=self._timeout)

    @idempotent()
    def get_release_count(self, request: key_pb2.GetReleaseCountRequest) -> key_pb2.GetReleaseCountResponse:
        return self._stub.GetReleaseCount(request, timeout=self._timeout)


class VerifierClient:
    def __init__(self, channel: grpc.Channel, timeout_s: float) -> None:
        self._stub = verifier_pb2_grpc.VerifierServiceStub(channel)
        self._timeout = timeout_s

    @idempotent()
    def get_challenge(self, request: verifier_pb2.GetChallengeRequest) -> verifier_pb2.GetChallengeResponse:
        return self._stub.GetChallenge(request, timeout=self._timeout)

    def attest(self, request: verifier_pb2.AttestRequest) -> verifier_pb2.AttestResponse:
        return self._stub.Attest(request, timeout=self._timeout)
