"""One simulated device: check in, download and verify, train locally, report, encrypt, upload (resumable)."""

from __future__ import annotations

import hashlib
import random
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from fedcompute.clients.dataset import Split
from fedcompute.clients.examples import ExampleStore, ShardStore
from fedcompute.clients.training import train_local
from fedcompute.clients.typed import ResourceClient, TaskAssignmentClient, UploadClient, encode_write
from fedcompute.core import checkpoints, plans, programs
from fedcompute.core.context import ContributionContext
from fedcompute.core.errors import InvalidArgument
from fedcompute.core.policy import DeviceFloor
from fedcompute.keys import hpke
from fedcompute.keys.envelope import sealed_envelope
from fedcompute.keys.policy import UntrustedPolicy, check_signed
from fedcompute.keys.policy import from_message as policy_from_message
from fedcompute.keys.statement import UntrustedKey, check_dp_holders, check_trusted
from fedcompute.rpc.errors import COMMITTED_SIZE_KEY, RETRY_PUSHBACK_KEY
from fedcompute.v1 import common_pb2, resource_pb2, task_assignment_pb2, upload_pb2
from fedcompute.v1 import task_assignment_pb2 as ta

UPLOAD_ATTEMPTS = 4  # without a deadline in the instruction
MAX_UPLOAD_ATTEMPTS = 50
DOWNLOAD_ATTEMPTS = 8  # tries in a row receiving nothing (refused at the stream limit, or interrupted) before
DOWNLOAD_PATIENCE_S = 60.0  # ... giving up; or this long without a byte (a day-long pushback is not waited out)
MAX_DOWNLOAD_ATTEMPTS = 50  # tries in all, whatever each received
RECENT_PARTICIPATIONS = 100
MAX_WAIT_S = 60.0  # the longest a server's retry pushback is waited out at once (a hostile one asks for years)
MAX_RETRY_AFTER_S = 86_400.0  # the longest a rejection's retry window is taken at its word
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # an upload instruction's chunk size past this (or not positive): 1 MiB instead
CHECKPOINT_HEADER_BYTES = 1024 * 1024  # a checkpoint may be this much longer than its plan's float32 parameters


class IntegrityError(Exception):
    """A downloaded resource does not match its declared size or sha256."""


@dataclass(frozen=True)
class Participated:
    task_id: str
    round: int
    uploaded: bool
    refused_key: bool = False  # the key or the access policy: not signed by enough pinned providers, or too weak


@dataclass(frozen=True)
class Trust:
    """What a device was configured with: its pinned key providers, how many must sign a key or a policy, and
    the weakest access policy and key it accepts (its floor), whatever the server relays."""

    providers: Mapping[str, ec.EllipticCurvePublicKey]
    threshold: int
    floor: DeviceFloor = field(default_factory=DeviceFloor)

    def check(self, assignment: task_assignment_pb2.TaskAssignment) -> None:
        """Raise ``UntrustedKey``/``UntrustedPolicy`` unless this device may upload under the assignment."""
        key = assignment.encryption_key
        check_trusted(key, self.providers, self.threshold)
        if time.time() >= key.destruction_time_unix:
            raise UntrustedKey("the key's shares are destroyed (destruction_time_unix): nothing sealed to it opens")
        if hpke.key_id_for(key.public_key) != key.key_id:
            raise UntrustedKey(f"key id {key.key_id!r} does not belong to the relayed public key")
        policy = check_signed(assignment.access_policy, self.providers, self.threshold)
        if policy.plan_sha256_hex != assignment.plan.sha256_hex:
            raise UntrustedPolicy("the assignment's plan is not the one the access policy names")
        if policy.population_name != assignment.population_name or key.population_name != policy.population_name:
            raise UntrustedPolicy("the access policy or key belongs to another population")
        problems = self.floor.violations(policy, key.threshold, key.expiration_time_unix - key.activation_time_unix)
        if policy.dp is not None:
            check_dp_holders(key, self.providers)  # key services number DP releases (docs/protocol.md A.5)
        if problems:
            raise UntrustedPolicy("; ".join(problems))


@dataclass(frozen=True)
class Rejected:
    reason: str
    retry_after_s: float


@dataclass
class Device:
    device_id: str
    data: Split
    population: str
    assignments: TaskAssignmentClient
    resources: ResourceClient
    uploads: UploadClient
    trust: Trust
    client_version: str = "1.0.0"
    rng: random.Random = field(default_factory=random.Random)
    done: set[tuple[str, int]] = field(default_factory=set)
    on_payload: Callable[[bytes], None] | None = None  # tests: see the plaintext this device sealed
    examples: ExampleStore | None = None  # default: ``data`` as the "digits" collection

    def participate(self) -> Participated | Rejected:
        response = self.assignments.create_task_assignment(
            ta.CreateTaskAssignmentRequest(
                population_name=self.population,
                client_version=common_pb2.ClientVersion(version_code=self.client_version),
                recent_participations=[
                    ta.Participation(task_id=t, round=r)
                    for t, r in sorted(self.done, key=lambda p: p[1], reverse=True)[:RECENT_PARTICIPATIONS]
                ],
            )
        )
        if response.HasField("rejection_info"):
            return self._rejected(response.rejection_info)
        assignment = response.task_assignment
        turn = (assignment.task_id, assignment.round)
        outcome = self._take_part(assignment, turn)  # an error before the upload began leaves the round not done
        self.done.add(turn)
        return outcome

    def _take_part(self, assignment: task_assignment_pb2.TaskAssignment, turn: tuple[str, int]) -> Participated:
        """One assignment, from the trust check to the upload. The round counts as done (never offered again)
        once this turn ends, or as soon as the upload begins: from then on the server may hold this device's
        contribution, and a second one in the same round would double its weight (and its privacy cost). A turn
        that fails before then (the server restarted mid-download, say) sent nothing, so the device may be
        offered the round again: its stale assignment's slot comes back at the local-compute deadline."""
        try:
            if assignment.population_name != self.population:
                raise UntrustedPolicy(f"assigned to population {assignment.population_name!r}, not this device's")
            self.trust.check(assignment)
        except (UntrustedKey, UntrustedPolicy):
            self.assignments.report_result(report_request(assignment, ta.REPORT_RESULT_FAILED_OPS_ERROR))
            return Participated(assignment.task_id, assignment.round, False, refused_key=True)
        try:
            context = context_of(assignment)
            context.encode()  # what the upload is bound to: fields it cannot hold are refused before any download
        except (ValueError, struct.error):
            return self._failed(assignment)
        if assignment.plan.size_bytes > plans.DEFAULT_MAX_PLAN_BYTES:  # no server's plan is larger
            return self._failed(assignment)
        try:
            plan = plans.parse(download(self.resources, assignment.plan))
            programs.check_program(plan.program)
        except (InvalidArgument, IntegrityError):  # a plan this device cannot run, or not the one declared
            return self._failed(assignment)
        data = (self.examples or ShardStore({"digits": self.data})).select(plan.example_selector)
        if data is None or len(data) == 0:
            self.assignments.report_result(report_request(assignment, ta.REPORT_RESULT_NOT_ELIGIBLE))
            return Participated(assignment.task_id, assignment.round, False)
        if assignment.checkpoint.size_bytes > plan.parameter_count() * 4 + CHECKPOINT_HEADER_BYTES:
            return self._failed(assignment)  # longer than the plan's parameters could be: not read at all
        try:
            weights = checkpoints.decode(download(self.resources, assignment.checkpoint))
            plans.check_tensors(plan.schema(), weights)  # exactly the plan's names, shapes and float32
        except (ValueError, IntegrityError):  # not the checkpoint declared, not a checkpoint, or not the plan's
            return self._failed(assignment)
        try:
            result = train_local(plan, weights, data, seed=self.rng.randrange(2**31))
        except InvalidArgument:  # a checkpoint the plan's model does not load (a fault of this device's own escapes)
            return self._failed(assignment)
        report = self.assignments.report_result(report_request(assignment, ta.REPORT_RESULT_COMPLETED))
        if not report.HasField("upload_instruction"):
            return Participated(assignment.task_id, assignment.round, False)
        payload = checkpoints.encode(result.delta, {"num_examples": result.examples, "metrics": result.metrics})
        if self.on_payload:
            self.on_payload(payload)
        envelope = sealed_envelope(payload, context, assignment.encryption_key.public_key)
        self.done.add(turn)
        try:
            upload(self.uploads, report.upload_instruction, envelope)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # the round closed before we finished
                return Participated(assignment.task_id, assignment.round, False)
            raise
        return Participated(assignment.task_id, assignment.round, True)

    def _failed(self, assignment: task_assignment_pb2.TaskAssignment) -> Participated:
        """A resource the device will not use (never loaded past its check): reported as an error, so the server
        frees the slot now rather than at the local-compute deadline; nothing was sent, the round is not done."""
        self.assignments.report_result(report_request(assignment, ta.REPORT_RESULT_FAILED_OPS_ERROR))
        return Participated(assignment.task_id, assignment.round, False)

    def _rejected(self, info: common_pb2.RejectionInfo) -> Rejected:
        low = min(max(info.retry_window.delay_min.ToNanoseconds() / 1e9, 0.0), MAX_RETRY_AFTER_S)
        high = min(max(info.retry_window.delay_max.ToNanoseconds() / 1e9, 0.0), MAX_RETRY_AFTER_S)
        reason = common_pb2.RejectionReason.Name(info.reason).removeprefix("REJECTION_REASON_")
        return Rejected(reason, self.rng.uniform(low, max(low, high)))


def report_request(a: task_assignment_pb2.TaskAssignment, result: ta.ReportResult.ValueType) -> ta.ReportResultRequest:
    return ta.ReportResultRequest(
        population_name=a.population_name,
        task_id=a.task_id,
        aggregation_id=a.aggregation_id,
        assignment_id=a.assignment_id,
        session_token=a.session_token,
        result=result,
    )


def context_of(a: task_assignment_pb2.TaskAssignment) -> ContributionContext:
    return ContributionContext(
        a.population_name,
        a.task_id,
        a.round,
        a.aggregation_id,
        a.assignment_id,
        a.encryption_key.key_id,
        a.model_version,
        a.plan.sha256_hex,
        policy_from_message(a.access_policy.policy).sha256_hex(),
    )


def download(client: ResourceClient, resource: common_pb2.Resource) -> bytes:
    """Read a resource in chunks and verify its size and sha256 against the assignment's declaration. A server
    that sends more than the declared size is cut off at the message that passes it (the stream cancelled): the
    device holds at most the declared size and one message (the channel's receive limit), not the whole stream.

    An interrupted download (the server away, the stream cancelled for going quiet, the call's deadline) resumes
    from the bytes received (``read_offset``), their hash carried on; a server serving its most streams at once
    (RESOURCE_EXHAUSTED with a pushback) is asked again after the wait it names, as an upload waits one out. It
    gives up after ``DOWNLOAD_ATTEMPTS`` tries in a row that received nothing, or ``DOWNLOAD_PATIENCE_S`` without
    a byte, or ``MAX_DOWNLOAD_ATTEMPTS`` tries in all (a hostile server sending a byte a try)."""
    received = _Received()

    def stop(state: RetryCallState) -> bool:
        late = time.time() >= received.moved_unix + DOWNLOAD_PATIENCE_S
        return late or received.stalled >= DOWNLOAD_ATTEMPTS or state.attempt_number >= MAX_DOWNLOAD_ATTEMPTS

    def wait(state: RetryCallState) -> float:
        return _upload_wait(state, deadline_unix=received.moved_unix + DOWNLOAD_PATIENCE_S)

    for attempt in Retrying(retry=retry_if_exception(_download_resumable), stop=stop, wait=wait, reraise=True):
        with attempt:
            before = received.size
            try:
                if received.size < resource.size_bytes:  # (all of it may have come before the call failed)
                    _read_into(client, resource, received)
            finally:
                received.stalled = 0 if received.size > before else received.stalled + 1
            if received.size != resource.size_bytes or received.digest.hexdigest() != resource.sha256_hex:
                raise IntegrityError(f"{resource.resource_name} does not match its declared size and sha256")
            return b"".join(received.parts)
    raise AssertionError("unreachable")  # pragma: no cover


class _Received:
    """What a download has received so far."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.digest = hashlib.sha256()
        self.moved_unix = time.time()  # when the last bytes came (or the download began)
        self.stalled = 0  # tries in a row that received nothing


def _read_into(client: ResourceClient, resource: common_pb2.Resource, received: _Received) -> None:
    """Read the resource from the bytes received on, to the stream's end."""
    request = resource_pb2.ReadRequest(resource_name=resource.resource_name, read_offset=received.size)
    stream = client.read(request)
    for response in stream:
        if received.size + len(response.data) > resource.size_bytes:
            cancel = getattr(stream, "cancel", None)
            if cancel is not None:
                cancel()
            raise IntegrityError(f"{resource.resource_name} is longer than its declared {resource.size_bytes} bytes")
        if response.data:
            received.parts.append(response.data)
            received.size += len(response.data)
            received.digest.update(response.data)
            received.moved_unix = time.time()


# a download may go on from the bytes received: the server was away, cancelled the stream for going quiet
# (``stream_idle_s``) or was restarted, or the call's deadline came first (or, after its pushback, its stream limit)
_DOWNLOAD_RESUMABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
)


def _download_resumable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and (exc.code() in _DOWNLOAD_RESUMABLE or _pushback_s(exc) is not None)


def upload(
    client: UploadClient, instruction: ta.UploadInstruction, data: bytes, sha256_hex: str = ""
) -> upload_pb2.WriteResponse:
    """Upload with resume: send from offset 0 (no round trip first: a server holding committed bytes says where to
    resume); when interrupted (unavailable, corrupted in transit, another stream of it still open, or told to
    resume elsewhere) back off exponentially with jitter, ask for the committed size and send the rest, until the
    upload deadline of the instruction (or ``UPLOAD_ATTEMPTS`` tries when it names none). ``sha256_hex``: the
    envelope's hash when the caller already computed it (declared as given: the server checks it at finish)."""
    declared = sha256_hex or hashlib.sha256(data).hexdigest()
    metadata = upload_pb2.UploadMetadata(total_size_bytes=len(data), sha256_hex=declared)
    chunk = instruction.chunk_size_bytes if 0 < instruction.chunk_size_bytes <= MAX_CHUNK_BYTES else 1024 * 1024
    left_s = instruction.upload_deadline_unix - time.time()
    stop: stop_base = stop_after_attempt(UPLOAD_ATTEMPTS)
    if instruction.upload_deadline_unix:
        stop = stop_after_delay(max(left_s, 0.0)) | stop_after_attempt(MAX_UPLOAD_ATTEMPTS)
    for attempt in Retrying(
        retry=retry_if_exception(_resumable),
        stop=stop,
        wait=partial(_upload_wait, deadline_unix=instruction.upload_deadline_unix),
        reraise=True,
    ):
        with attempt:
            committed = 0  # a first attempt starts at 0: the server answers with where to resume, if elsewhere
            if attempt.retry_state.attempt_number > 1:
                status = client.query_write_status(
                    upload_pb2.QueryWriteStatusRequest(
                        resource_name=instruction.resource_name, upload_token=instruction.upload_token
                    )
                )
                if status.complete:
                    return upload_pb2.WriteResponse(committed_size=status.committed_size, complete=True)
                committed = status.committed_size
            return client.write_encoded(_requests(instruction, metadata, data, committed, chunk))
    raise AssertionError("unreachable")  # pragma: no cover


# the upload may go on from its committed size: the server was away, the bytes were damaged in transit, another
# stream of it was still open, or the server cancelled a stream that had gone quiet (``stream_idle_s``)
_RESUMABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}
)


def _resumable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and (
        exc.code() in _RESUMABLE or _offset_hint(exc) or _pushback_s(exc) is not None
    )


def _pushback_s(exc: BaseException) -> float | None:
    """A rate-limited call's wait (RESOURCE_EXHAUSTED with ``grpc-retry-pushback-ms``), else None."""
    if not isinstance(exc, grpc.Call) or exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_PUSHBACK_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            return int(text) / 1000 if text.isdigit() and len(text) <= 12 else None  # a hostile server's digits
    return None


def _upload_wait(state: RetryCallState, deadline_unix: float = 0.0) -> float:
    """The server's pushback when it gave one (at most ``MAX_WAIT_S``), else jittered exponential backoff; never
    past the upload deadline (a server asking for a day's wait is not waited for past it: the stop then ends the
    tries), whose own distance the cap bounds too (``MAX_UPLOAD_ATTEMPTS`` waits at most)."""
    backoff = _BACKOFF(state)
    failed = state.outcome.exception() if state.outcome is not None else None
    pushback = _pushback_s(failed) if failed is not None else None
    wait = max(backoff, min(pushback, MAX_WAIT_S)) if pushback is not None else backoff
    return min(wait, max(deadline_unix - time.time(), 0.0)) if deadline_unix else wait


_BACKOFF = wait_exponential_jitter(multiplier=0.05, max=5.0, jitter=0.05)


def _offset_hint(exc: grpc.RpcError) -> bool:
    trailing: Sequence[tuple[str, str | bytes]] = (
        exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
    ) or ()
    return any(key == COMMITTED_SIZE_KEY for key, _ in trailing)


def _requests(
    instruction: ta.UploadInstruction, metadata: upload_pb2.UploadMetadata, data: bytes, start: int, chunk: int
) -> Iterator[bytes]:
    """The WriteRequests from ``start``, encoded (``encode_write``: each chunk a view of ``data`` until then); the
    first names the upload and declares it."""
    view = memoryview(data)
    offset = start
    first = True
    while True:
        piece = view[offset : offset + chunk]
        last = offset + len(piece) >= len(data)
        if first:
            yield encode_write(offset, piece, last, instruction.resource_name, instruction.upload_token, metadata)
            first = False
        else:
            yield encode_write(offset, piece, last)
        offset += len(piece)
        if last:
            return
