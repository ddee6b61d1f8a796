"""The reference device against a hostile server, over real gRPC. The server here is ours to script: it relays an
honest assignment (a key and policy the real key services signed, a plan the operator registered) with the fields
no signature covers changed, serves bytes of its choosing and answers uploads as it likes. Each way it tries to
crash, stall or exhaust the device ends in a report of FAILED_OPS_ERROR (the slot freed, nothing uploaded) or a
bounded wait, never an exception escaping ``participate`` (a simulated fleet's thread ended with it) nor a device
holding a gigabyte or sleeping for years. Found by review, 2026-12-02."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import torch

from fedcompute.clients import device
from fedcompute.clients.device import Device, Participated, Rejected, Trust
from fedcompute.clients.typed import ResourceClient, TaskAssignmentClient, UploadClient
from fedcompute.core import checkpoints
from fedcompute.rpc.channels import open_channel
from fedcompute.rpc.errors import RETRY_PUSHBACK_KEY
from fedcompute.v1 import (
    common_pb2,
    resource_pb2,
    resource_pb2_grpc,
    task_assignment_pb2_grpc,
    upload_pb2,
    upload_pb2_grpc,
)
from fedcompute.v1 import task_assignment_pb2 as ta
from tests.harness import Harness, suite_settings

POP = "hostile"


class HostileServer(
    task_assignment_pb2_grpc.TaskAssignmentServiceServicer,
    resource_pb2_grpc.ResourceServiceServicer,
    upload_pb2_grpc.UploadServiceServicer,
):
    """Answers the device's every call with what the test put here, and records what the device did."""

    def __init__(self, assignment: ta.TaskAssignment, blobs: dict[str, bytes]) -> None:
        self.assignment = assignment
        self.rejection: common_pb2.RejectionInfo | None = None
        self.blobs = blobs
        self.instruction = ta.UploadInstruction(resource_name="uploads/x", upload_token="u")
        self.pushback_ms: int | None = None
        self.reports: list[str] = []
        self.reads: list[str] = []
        self.writes: list[int] = []  # WriteRequests in each Write stream

    def CreateTaskAssignment(self, request: Any, context: Any) -> ta.CreateTaskAssignmentResponse:
        if self.rejection is not None:
            return ta.CreateTaskAssignmentResponse(rejection_info=self.rejection)
        return ta.CreateTaskAssignmentResponse(task_assignment=self.assignment)

    def ReportResult(self, request: ta.ReportResultRequest, context: Any) -> ta.ReportResultResponse:
        self.reports.append(ta.ReportResult.Name(request.result))
        if request.result == ta.REPORT_RESULT_COMPLETED:
            return ta.ReportResultResponse(upload_instruction=self.instruction)
        return ta.ReportResultResponse()

    def Read(self, request: resource_pb2.ReadRequest, context: Any) -> Iterator[resource_pb2.ReadResponse]:
        self.reads.append(request.resource_name)
        data = self.blobs[request.resource_name]
        for start in range(request.read_offset, len(data), 1024 * 1024):
            yield resource_pb2.ReadResponse(data=data[start : start + 1024 * 1024])

    def Write(self, requests: Iterator[upload_pb2.WriteRequest], context: Any) -> upload_pb2.WriteResponse:
        count = 0
        for request in requests:
            count += 1
            if request.finish_write or count > 1000:  # (an endless stream is cut here, and seen in the count)
                break
        self.writes.append(count)
        if self.pushback_ms is not None:
            context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(self.pushback_ms)),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        return upload_pb2.WriteResponse(committed_size=1, complete=True)

    def QueryWriteStatus(self, request: Any, context: Any) -> upload_pb2.QueryWriteStatusResponse:
        return upload_pb2.QueryWriteStatusResponse()


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ta.TaskAssignment, dict[str, bytes], Trust]]:
    """An honest assignment, its plan and checkpoint bytes, and the device's trust, from a real suite (SQLite)."""
    from fedcompute.clients.device import download

    work = tmp_path_factory.mktemp("hostile")
    harness = Harness.start(suite_settings(work / "w", f"sqlite:///{work / 'db.sqlite'}"), aggregator=False)
    try:
        harness.create_task(POP, report_goal=2, max_cohort=3)
        a = harness.check_in(POP).task_assignment
        blobs = {r.resource_name: download(harness.resources, r) for r in (a.plan, a.checkpoint)}
        trust = harness.trust()
        yield a, blobs, Trust(trust.providers, trust.threshold)
    finally:
        harness.stop()


def _serve(server: HostileServer) -> tuple[grpc.Server, str]:
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    task_assignment_pb2_grpc.add_TaskAssignmentServiceServicer_to_server(server, grpc_server)
    resource_pb2_grpc.add_ResourceServiceServicer_to_server(server, grpc_server)
    upload_pb2_grpc.add_UploadServiceServicer_to_server(server, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    return grpc_server, f"127.0.0.1:{port}"


def _device(address: str, trust: Trust) -> Device:
    from fedcompute.clients.dataset import non_iid_shards, train_test_split

    channel = open_channel(address)
    train, _ = train_test_split(seed=0)
    return Device(
        "d0", non_iid_shards(train, 1, 0)[0], POP, TaskAssignmentClient(channel, 10), ResourceClient(channel, 10),
        UploadClient(channel, 10), trust,
    )  # fmt: skip


def _participate(server: HostileServer, trust: Trust) -> Participated | Rejected:
    grpc_server, address = _serve(server)
    try:
        return _device(address, trust).participate()
    finally:
        grpc_server.stop(0)


def _relayed(a: ta.TaskAssignment, **fields: Any) -> ta.TaskAssignment:
    changed = ta.TaskAssignment()
    changed.CopyFrom(a)
    for name, value in fields.items():
        setattr(changed, name, value)
    return changed


def _with_checkpoint(a: ta.TaskAssignment, blobs: dict[str, bytes], data: bytes) -> HostileServer:
    """The checkpoint resource declared as exactly these bytes (the server declares its own sha256)."""
    changed = _relayed(a)
    changed.checkpoint.size_bytes = len(data)
    changed.checkpoint.sha256_hex = hashlib.sha256(data).hexdigest()
    return HostileServer(changed, {**blobs, a.checkpoint.resource_name: data})


def test_the_honest_relay_is_uploaded(honest: tuple[ta.TaskAssignment, dict[str, bytes], Trust]) -> None:
    """The scripted server relaying the assignment as given: the device trains and uploads (the cases below differ
    from this one only in what they change)."""
    a, blobs, trust = honest
    server = HostileServer(a, blobs)
    outcome = _participate(server, trust)
    assert isinstance(outcome, Participated)
    assert outcome.uploaded
    assert server.reports == ["REPORT_RESULT_COMPLETED"]


@pytest.mark.parametrize(
    "change",
    ["a bias of 11 values", "float64 weights", "int64 weights", "an empty weight"],
)
def test_a_checkpoint_not_shaped_as_its_plan_is_reported_not_trained_on(
    honest: tuple[ta.TaskAssignment, dict[str, bytes], Trust], change: str
) -> None:
    """The checkpoint's bytes and hash are the server's to declare: tensors of the plan's names but another shape
    or dtype. Before, training raised RuntimeError out of ``participate``, nothing reported."""
    a, blobs, trust = honest
    weights = checkpoints.decode(blobs[a.checkpoint.resource_name])
    bias = next(n for n in weights if n.endswith("bias"))
    weight = next(n for n in weights if n.endswith("weight"))
    if change == "a bias of 11 values":
        weights[bias] = torch.zeros(11)
    elif change == "float64 weights":
        weights[weight] = weights[weight].double()
    elif change == "int64 weights":
        weights[weight] = weights[weight].long()
    else:
        weights[weight] = torch.zeros(0, weights[weight].shape[1])
    server = _with_checkpoint(a, blobs, checkpoints.encode(weights))
    outcome = _participate(server, trust)
    assert isinstance(outcome, Participated)
    assert not outcome.uploaded
    assert server.reports == ["REPORT_RESULT_FAILED_OPS_ERROR"]


@pytest.mark.parametrize(
    "fields",
    [{"round": -1}, {"model_version": -1}, {"task_id": "t" * 70_000}, {"assignment_id": "a" * 70_000}],
    ids=["negative round", "negative model version", "long task id", "long assignment id"],
)
def test_assignment_fields_the_upload_cannot_be_bound_to_are_refused_before_anything_is_read(
    honest: tuple[ta.TaskAssignment, dict[str, bytes], Trust], fields: dict[str, Any]
) -> None:
    """No signature covers these fields; the context the upload is bound to cannot hold them. Before, the device
    downloaded, trained and reported COMPLETED, then sealing raised out of ``participate``."""
    a, blobs, trust = honest
    server = HostileServer(_relayed(a, **fields), blobs)
    outcome = _participate(server, trust)
    assert isinstance(outcome, Participated)
    assert not outcome.uploaded
    assert server.reports == ["REPORT_RESULT_FAILED_OPS_ERROR"]
    assert server.reads == []


@pytest.mark.parametrize("resource", ["plan", "checkpoint"])
def test_a_resource_declared_larger_than_any_honest_one_is_not_read(
    honest: tuple[ta.TaskAssignment, dict[str, bytes], Trust], resource: str
) -> None:
    """A plan declared past the largest plan a server takes (8 MiB), or a checkpoint past its plan's parameters
    (float32) and a header allowance: refused before a byte is read. Before, the device held every byte the
    declared size allowed (a gigabyte, say) before the hash check failed."""
    a, blobs, trust = honest
    changed = _relayed(a)
    getattr(changed, resource).size_bytes = 1 << 30
    server = HostileServer(changed, blobs)
    outcome = _participate(server, trust)
    assert isinstance(outcome, Participated)
    assert server.reports == ["REPORT_RESULT_FAILED_OPS_ERROR"]
    assert getattr(a, resource).resource_name not in server.reads


def test_an_upload_chunk_size_that_is_not_positive_is_replaced(
    honest: tuple[ta.TaskAssignment, dict[str, bytes], Trust],
) -> None:
    """chunk_size_bytes -1: each chunk was empty and the offset never moved, an endless stream. Now 1 MiB."""
    a, blobs, trust = honest
    server = HostileServer(a, blobs)
    server.instruction.chunk_size_bytes = -1
    outcome = _participate(server, trust)
    assert isinstance(outcome, Participated)
    assert outcome.uploaded
    assert server.writes == [1]  # the envelope is under 1 MiB: one message, finish_write set


def test_a_retry_pushback_of_years_is_waited_out_for_at_most_a_minute(
    honest: tuple[ta.TaskAssignment, dict[str, bytes], Trust], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Write refused RESOURCE_EXHAUSTED with a pushback of 31 years, under an upload deadline ten years
    away: each wait is cut to MAX_WAIT_S (here 0.1 s), so the device's tries end. Before, it slept 31 years."""
    a, blobs, trust = honest
    monkeypatch.setattr(device, "MAX_WAIT_S", 0.1)
    monkeypatch.setattr(device, "MAX_UPLOAD_ATTEMPTS", 3)
    server = HostileServer(a, blobs)
    server.pushback_ms = 999_999_999_999
    server.instruction.upload_deadline_unix = 2**40
    errors: list[BaseException] = []

    def turn() -> None:
        try:
            _participate(server, trust)
        except grpc.RpcError as exc:
            errors.append(exc)

    thread = threading.Thread(target=turn, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the device is still waiting out the pushback"
    assert len(server.writes) == 3
    assert [e.code() for e in errors] == [grpc.StatusCode.RESOURCE_EXHAUSTED]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("seconds", "bounded"), [(10**11, 86_400.0), (-50, 0.0)])
def test_a_rejections_retry_window_is_taken_within_bounds(
    honest: tuple[ta.TaskAssignment, dict[str, bytes], Trust], seconds: int, bounded: float
) -> None:
    """A retry window of 3,000 years made a fleet's wait overflow (its thread ended); a negative one was passed
    on as a negative wait. Now within [0, MAX_RETRY_AFTER_S]."""
    from google.protobuf.duration_pb2 import Duration

    a, blobs, trust = honest
    server = HostileServer(a, blobs)
    window = common_pb2.RetryWindow(delay_min=Duration(seconds=seconds), delay_max=Duration(seconds=seconds))
    server.rejection = common_pb2.RejectionInfo(
        reason=common_pb2.REJECTION_REASON_NO_TASK_AVAILABLE, retry_window=window
    )
    outcome = _participate(server, trust)
    assert isinstance(outcome, Rejected)
    assert outcome.retry_after_s == bounded


def test_a_key_past_its_destruction_time_is_refused() -> None:
    """The protocol's test-vector key, signed by its providers, was destroyed on 2026-02-07: nothing sealed to it
    could ever be opened, so the device refuses it (it uploaded to it before)."""
    from fedcompute.keys.statement import UntrustedKey
    from tests.unit.test_protocol_vectors import vector_assignment

    assignment, trust = vector_assignment()
    assert assignment.encryption_key.destruction_time_unix < 1_800_000_000
    with pytest.raises(UntrustedKey, match="destroyed"):
        trust.check(assignment)
