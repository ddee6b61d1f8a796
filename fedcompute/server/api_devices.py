"""Device-facing services: TaskAssignmentService, UploadService, ResourceService."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf.message import DecodeError

from fedcompute.core.errors import InvalidArgument
from fedcompute.core.tasks import MAX_POPULATION_CHARS
from fedcompute.core.telemetry import ServerMetrics
from fedcompute.rpc import wire
from fedcompute.rpc.idle import IdleStreams
from fedcompute.server.assignment import Assignment, AssignmentService, Refusal
from fedcompute.server.device_attestation import AcceptEveryDevice, DeviceAttestor
from fedcompute.server.encoding import checkpoint_resource, duration, plan_resource
from fedcompute.server.pace import PaceSteering
from fedcompute.server.resources import Download, ResourceService
from fedcompute.server.uploads import UploadService, WriteChunk
from fedcompute.v1 import (
    common_pb2,
    resource_pb2,
    resource_pb2_grpc,
    task_assignment_pb2,
    task_assignment_pb2_grpc,
    upload_pb2,
)
from fedcompute.v1 import task_assignment_pb2 as ta


def rejection(pace: PaceSteering, refusal: Refusal, population: str) -> common_pb2.RejectionInfo:
    start, end = pace.window(refusal, population)
    return common_pb2.RejectionInfo(
        reason=common_pb2.RejectionReason.Value(f"REJECTION_REASON_{refusal.reason}"),
        retry_window=common_pb2.RetryWindow(delay_min=duration(start), delay_max=duration(end)),
        message=refusal.message,
    )


class TaskAssignmentServicer(task_assignment_pb2_grpc.TaskAssignmentServiceServicer):
    def __init__(
        self,
        service: AssignmentService,
        pace: PaceSteering,
        max_upload_bytes: int,
        chunk_size: int,
        metrics: ServerMetrics | None = None,
        attestor: DeviceAttestor | None = None,
    ) -> None:
        self._service = service
        self._pace = pace
        self._max_upload_bytes = max_upload_bytes
        self._chunk_size = chunk_size
        self._metrics = metrics or ServerMetrics.create()
        self._assigned = self._metrics.checkins.labels("assigned")  # looked up once: labels() costs on a hot path
        self._rejected = self._metrics.checkins.labels("rejected")
        self._attestor = attestor or AcceptEveryDevice()

    def CreateTaskAssignment(
        self, request: ta.CreateTaskAssignmentRequest, context: grpc.ServicerContext
    ) -> ta.CreateTaskAssignmentResponse:
        if len(request.population_name) > MAX_POPULATION_CHARS:  # before anything keeps or looks at it
            raise InvalidArgument("population_name", f"must be at most {MAX_POPULATION_CHARS} characters")
        if not request.population_name.isprintable():
            raise InvalidArgument("population_name", "must not hold control characters (NUL, newlines, ...)")
        self._attestor.check(request.population_name, request.device_attestation)
        done = {(p.task_id, p.round) for p in request.recent_participations}
        self._pace.observe(request.population_name)
        outcome = self._service.check_in(request.population_name, request.client_version.version_code, done)
        if isinstance(outcome, Refusal):
            self._rejected.inc()
            self._metrics.rejections.labels(outcome.reason.lower()).inc()
            info = rejection(self._pace, outcome, request.population_name)
            return ta.CreateTaskAssignmentResponse(rejection_info=info)
        self._assigned.inc()
        return _encode_assignment(outcome)

    def ReportResult(self, request: ta.ReportResultRequest, context: grpc.ServicerContext) -> ta.ReportResultResponse:
        try:
            result = ta.ReportResult.Name(request.result).removeprefix("REPORT_RESULT_")
        except ValueError:  # proto3 keeps an enum value this server does not know
            raise InvalidArgument("result", f"{request.result} is not a ReportResult this server knows") from None
        self._metrics.reports.labels(result.lower()).inc()
        outcome = self._service.report(
            request.assignment_id, request.session_token, request.task_id, request.aggregation_id, result
        )
        if outcome is None:
            return ta.ReportResultResponse()
        if isinstance(outcome, Refusal):
            return ta.ReportResultResponse(rejection_info=rejection(self._pace, outcome, request.population_name))
        return ta.ReportResultResponse(
            upload_instruction=ta.UploadInstruction(
                resource_name=outcome.resource_name,
                upload_token=outcome.upload_token,
                max_size_bytes=self._max_upload_bytes,
                chunk_size_bytes=self._chunk_size,
                upload_deadline_unix=int(outcome.deadline.timestamp()),
            )
        )


_TEMPLATES: dict[tuple[object, ...], ta.CreateTaskAssignmentResponse] = {}


def _encode_assignment(a: Assignment) -> ta.CreateTaskAssignmentResponse:
    """The response: what every assignment of a round shares (plan, checkpoint, key, signed policy) is encoded
    once, then copied with this device's ids. Keyed on everything it is built from that the database holds (the
    round, the relayed policy's bytes, the plan's hash) and the key: whatever the store says now is what the
    device gets."""
    cache_key = (
        a.iteration.iteration_id, a.iteration.round, a.iteration.aggregation_id, a.iteration.base_model_version,
        a.task.task_id, a.task.spec.population_name, a.task.access_policy, a.task.plan_sha256,
        a.task.plan_size, a.checkpoint_sha256, a.checkpoint_size, a.encryption_key.SerializeToString(),
    )  # fmt: skip
    template = _TEMPLATES.get(cache_key)
    if template is None:
        if len(_TEMPLATES) > 1_000:
            _TEMPLATES.clear()
        template = _TEMPLATES[cache_key] = ta.CreateTaskAssignmentResponse(task_assignment=_round_template(a))
    encoded = ta.CreateTaskAssignmentResponse()
    encoded.CopyFrom(template)
    encoded.task_assignment.assignment_id = a.assignment_id
    encoded.task_assignment.session_token = a.session_token
    return encoded


def _round_template(a: Assignment) -> task_assignment_pb2.TaskAssignment:
    return task_assignment_pb2.TaskAssignment(
        population_name=a.task.spec.population_name,
        task_id=a.task.task_id,
        round=a.iteration.round,
        aggregation_id=a.iteration.aggregation_id,
        plan=plan_resource(a.task),
        checkpoint=checkpoint_resource(
            a.task.task_id, a.iteration.base_model_version, a.checkpoint_sha256, a.checkpoint_size
        ),
        model_version=a.iteration.base_model_version,
        encryption_key=a.encryption_key,
        access_policy=common_pb2.SignedAccessPolicy.FromString(a.task.access_policy),
    )


class UploadServicer:
    """UploadService (registered with ``add_service``: its Write reads the messages as received, not the generated
    servicer's parsed WriteRequests)."""

    def __init__(self, service: UploadService, idle: IdleStreams, metrics: ServerMetrics | None = None) -> None:
        self._service = service
        self._metrics = metrics or ServerMetrics.create()
        self._idle = idle  # a stream gone quiet must not hold a thread

    def _chunks(self, requests: Iterator[bytes]) -> Iterator[WriteChunk]:
        for raw in requests:
            chunk = write_chunk(raw)
            self._metrics.upload_bytes.inc(len(chunk.data))
            yield chunk

    def Write(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> upload_pb2.WriteResponse:
        """Each WriteRequest arrives as received (``DECODED_HERE``) and is read by ``write_chunk``. Cancelled if the
        device sends nothing for ``stream_idle_s`` (``rpc.idle``): what it committed is kept for its resume."""
        with self._idle.watching(context, "Write") as watched:
            status = self._service.write(self._chunks(watched.received(request_iterator)))
        if status.complete:
            self._metrics.uploads.inc()
        return upload_pb2.WriteResponse(committed_size=status.committed_size, complete=status.complete)

    def QueryWriteStatus(
        self, request: upload_pb2.QueryWriteStatusRequest, context: grpc.ServicerContext
    ) -> upload_pb2.QueryWriteStatusResponse:
        status = self._service.query(request.resource_name, request.upload_token)
        return upload_pb2.QueryWriteStatusResponse(committed_size=status.committed_size, complete=status.complete)


class ResourceServicer(resource_pb2_grpc.ResourceServiceServicer):
    def __init__(self, service: ResourceService, idle: IdleStreams) -> None:
        self._service = service
        self._idle = idle  # a download its device stopped reading must not hold a thread

    def Read(
        self, request: resource_pb2.ReadRequest, context: grpc.ServicerContext
    ) -> Iterator[resource_pb2.ReadResponse]:
        """Each ``ReadResponse`` encoded here (``rpc.wire``; registered with ``ENCODED_HERE``), as bytes: the
        first carries the size and sha256 beside its data. Cancelled if the device reads nothing for
        ``stream_idle_s`` (``rpc.idle``)."""
        with self._idle.watching(context, "Read", waiting=False) as watched:  # a slot before the blob is read
            download = self._service.read(request.resource_name, request.read_offset)
            yield from watched.sent(self._encoded(download))  # type: ignore[misc]

    @staticmethod
    def _encoded(download: Download) -> Iterator[bytes]:
        first = True
        for chunk in download.chunks:
            if first:
                yield encode_read(chunk, download.total_size, download.sha256_hex)
                first = False
            else:
                yield encode_read(chunk)
        if first:
            yield encode_read(b"", download.total_size, download.sha256_hex)


# The device services' methods whose servicer encodes its responses itself (``rpc.wire``): every device downloads
# the plan and the model, a megabyte a message, every round
ENCODED_HERE = frozenset({"Read"})
# ... and whose servicer decodes its requests itself: every device uploads its update, a megabyte a message
DECODED_HERE = frozenset({"Write"})
_DATA = upload_pb2.WriteRequest.DESCRIPTOR.fields_by_name["data"].number


def write_chunk(raw: bytes) -> WriteChunk:
    """A WriteRequest as received: its data a view of the message (``rpc.wire.split_off``), every other field read
    by protobuf's parser from what is left, so each is read by protobuf's rules; the runtime's parse and bytes-field
    read would copy the data twice. A message protobuf cannot read is INVALID_ARGUMENT; the upload's committed bytes
    stay as they are (the device resumes from them)."""
    try:
        try:
            rest, data = wire.split_off(raw, _DATA)
            r = upload_pb2.WriteRequest.FromString(rest)
        except wire.TooManyFields:  # not what a device sends: protobuf reads it whole, as it used to
            r = upload_pb2.WriteRequest.FromString(raw)
            data = memoryview(r.data)
    except (ValueError, DecodeError):
        raise InvalidArgument("requests", "a WriteRequest that is not a valid protobuf message") from None
    return WriteChunk(
        r.resource_name, r.write_offset, r.finish_write, b"" if data is None else data, r.upload_token,
        r.metadata.total_size_bytes, r.metadata.sha256_hex,
    )  # fmt: skip


def encode_read(data: bytes, total_size: int = 0, sha256_hex: str = "") -> bytes:
    """A ``ReadResponse``, encoded (``rpc.wire``)."""
    return wire.message((1, data), (2, total_size), (3, sha256_hex))
