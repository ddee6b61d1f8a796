"""Check-in and result reports: rejections with retry windows, the cohort cap, idempotent reports."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from fedcompute.clients.device import Device, Participated, Rejected
from fedcompute.clients.typed import KeyClient, ResourceClient, UploadClient
from fedcompute.core.clock import SystemClock
from fedcompute.core.errors import Unavailable
from fedcompute.rpc.channels import open_channel
from fedcompute.server.keyring import KeyRing
from fedcompute.v1 import common_pb2, key_pb2
from fedcompute.v1 import task_assignment_pb2 as ta
from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness


def _reason(response: ta.CreateTaskAssignmentResponse) -> str:
    assert response.HasField("rejection_info")
    info = response.rejection_info
    assert info.retry_window.delay_max.ToNanoseconds() >= info.retry_window.delay_min.ToNanoseconds() > 0
    return common_pb2.RejectionReason.Name(info.reason)


def test_assignment_carries_resources_and_key(harness: Harness) -> None:
    task = harness.create_task()
    a = harness.check_in().task_assignment
    assert (a.task_id, a.round, a.model_version) == (task.task_id, 1, 1)
    assert a.plan.sha256_hex == task.plan.sha256_hex
    assert a.checkpoint.resource_name == f"models/{task.task_id}/1"
    assert len(a.encryption_key.public_key) == 32
    assert a.encryption_key.key_id.startswith("k_")
    assert a.assignment_id
    assert a.aggregation_id
    assert a.session_token


def test_unknown_population_and_version_mismatch_are_rejections(harness: Harness) -> None:
    harness.create_task(min_client_version="2.0", max_client_version="3.0")
    assert _reason(harness.check_in("nobody-here")) == "REJECTION_REASON_NO_ACTIVE_TASK"
    assert _reason(harness.check_in(version="1.9")) == "REJECTION_REASON_CLIENT_VERSION_MISMATCH"
    assert _reason(harness.check_in(version="not-a-version")) == "REJECTION_REASON_CLIENT_VERSION_MISMATCH"
    assert harness.check_in(version="2.5").HasField("task_assignment")


def test_cohort_cap_holds_under_concurrent_check_ins(harness: Harness) -> None:
    task = harness.create_task(report_goal=3, max_cohort=4)
    responses: list[ta.CreateTaskAssignmentResponse] = []
    lock = threading.Lock()

    def check_in() -> None:
        response = harness.check_in()
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=check_in) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = [r for r in responses if r.HasField("task_assignment")]
    assert len(accepted) == 4
    assert {_reason(r) for r in responses if not r.HasField("task_assignment")} == {
        "REJECTION_REASON_NO_TASK_AVAILABLE"
    }
    assert harness.iterations(task.task_id)[0].assigned == 4


def test_device_is_not_assigned_the_same_round_twice(harness: Harness) -> None:
    task = harness.create_task()
    harness.check_in()
    again = harness.assignments.create_task_assignment(
        ta.CreateTaskAssignmentRequest(
            population_name="pop",
            client_version=common_pb2.ClientVersion(version_code="1.0"),
            recent_participations=[ta.Participation(task_id=task.task_id, round=1)],
        )
    )
    assert _reason(again) == "REJECTION_REASON_NO_TASK_AVAILABLE"


def test_report_result_is_idempotent_and_checked(harness: Harness) -> None:
    task = harness.create_task()
    a = harness.check_in().task_assignment
    first = harness.report(a)
    assert first.upload_instruction.resource_name == f"uploads/{a.assignment_id}"
    assert harness.report(a) == first
    b = harness.check_in().task_assignment
    assert harness.report(b, ta.REPORT_RESULT_NOT_ELIGIBLE) == ta.ReportResultResponse()
    assert harness.report(b, ta.REPORT_RESULT_NOT_ELIGIBLE) == ta.ReportResultResponse()
    iteration = harness.iterations(task.task_id)[0]
    assert (iteration.assigned, iteration.completed_uploads) == (2, 0)

    unknown = ta.TaskAssignment()
    unknown.CopyFrom(a)
    unknown.assignment_id = "asg_unknown"
    with pytest.raises(grpc.RpcError) as info:
        harness.report(unknown)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    forged = ta.TaskAssignment()
    forged.CopyFrom(a)
    forged.session_token = "0" * 64
    with pytest.raises(grpc.RpcError) as info:
        harness.report(forged)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as info:
        harness.report(a, ta.REPORT_RESULT_UNSPECIFIED)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_canceled_task_gets_no_more_devices(harness: Harness) -> None:
    task = harness.create_task()
    a = harness.check_in().task_assignment
    harness.operators.cancel_task(tm.CancelTaskRequest(task_id=task.task_id))
    assert _reason(harness.check_in()) == "REJECTION_REASON_NO_ACTIVE_TASK"
    late = harness.report(a)
    assert late.rejection_info.reason == common_pb2.REJECTION_REASON_RESULT_NOT_NEEDED


def _device(harness: Harness, resources: ResourceClient, uploads: UploadClient) -> Device:
    from fedcompute.clients.dataset import non_iid_shards, train_test_split

    train, _ = train_test_split(seed=0)
    return Device("d0", non_iid_shards(train, 1, 0)[0], "pop", harness.assignments, resources, uploads, harness.trust())


def _unreachable() -> grpc.Channel:
    """A channel to a loopback port nobody listens on: every call fails UNAVAILABLE (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return open_channel(f"127.0.0.1:{port}")


def test_a_device_whose_turn_failed_before_its_upload_may_take_the_round_again(harness: Harness) -> None:
    """The reference device counts a round as done once its upload began, not at check-in: a turn that broke off
    earlier (here its downloads fail) sent nothing, so it checks in for the same round again and contributes."""
    task = harness.create_task(report_goal=1, max_cohort=3)
    dead = _unreachable()
    device = _device(harness, ResourceClient(dead, 5.0), harness.uploads)
    with pytest.raises(grpc.RpcError) as failed:
        device.participate()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert device.done == set()
    device.resources = harness.resources
    outcome = device.participate()
    assert isinstance(outcome, Participated)
    assert (outcome.task_id, outcome.round, outcome.uploaded) == (task.task_id, 1, True)
    assert device.done == {(task.task_id, 1)}
    assert harness.iterations(task.task_id)[0].completed_uploads == 1


def test_a_device_whose_upload_began_never_takes_the_round_again(harness: Harness) -> None:
    """Once bytes may have left, the round is done for the device even if the upload failed: the server may hold
    its contribution, and a second one in the round would double its weight and its privacy cost."""
    task = harness.create_task(report_goal=2, max_cohort=3, upload_deadline_s=2)
    device = _device(harness, harness.resources, UploadClient(_unreachable(), 5.0))
    with pytest.raises(grpc.RpcError) as failed:
        device.participate()  # retried until the instruction's upload deadline
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert device.done == {(task.task_id, 1)}
    device.uploads = harness.uploads
    again = device.participate()
    assert isinstance(again, Rejected)
    assert again.reason == "NO_TASK_AVAILABLE"
    assert harness.iterations(task.task_id)[0].completed_uploads == 0


def test_out_of_range_device_fields_are_invalid_argument_and_kept_nowhere(harness: Harness) -> None:
    """Fields a device fills as it likes (found by a review, 2026-12-02, each answered INTERNAL or kept in a
    process cache before): a ReportResult value this server does not know (proto3 keeps it), a model version past
    a 64-bit integer in a Read, a population name past MAX_POPULATION_CHARS (refused before the attestor or the
    pacing keep it), a client version past MAX_VERSION_CHARS (out of every range, never parsed or cached)."""
    from fedcompute.core.tasks import MAX_POPULATION_CHARS
    from fedcompute.core.versions import MAX_VERSION_CHARS, parse_version
    from fedcompute.v1 import resource_pb2

    task = harness.create_task()
    a = harness.check_in().task_assignment
    for unknown in (99, -1):
        request = ta.ReportResultRequest(
            population_name="pop", task_id=a.task_id, aggregation_id=a.aggregation_id,
            assignment_id=a.assignment_id, session_token=a.session_token, result=unknown,  # type: ignore[arg-type]
        )  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            harness.assignments.report_result(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "result" in (info.value.details() or "")
    assert harness.report(a).upload_instruction.resource_name  # the assignment is as it was: it reports fine
    for version in ("18446744073709551616", "9" * 5000):
        with pytest.raises(grpc.RpcError) as info:
            list(harness.resources.read(resource_pb2.ReadRequest(resource_name=f"models/{task.task_id}/{version}")))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        harness.check_in("p" * (MAX_POPULATION_CHARS + 1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "population_name" in (info.value.details() or "")
    parse_version.cache_clear()
    long_code = ".".join(["1"] * MAX_VERSION_CHARS)
    assert _reason(harness.check_in(version=long_code)) == "REJECTION_REASON_CLIENT_VERSION_MISMATCH"
    assert parse_version.cache_info().currsize <= 1  # the task's bounds at most, never the device's code


def test_a_report_that_loses_the_race_with_the_deadline_sweeper_answers_what_the_assignment_is_now(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report reads the assignment ASSIGNED, then the deadline sweeper times it out before the report's
    compare-and-set (Postgres, read committed): the report answers RESULT_NOT_NEEDED, not an upload grant for an
    assignment that can no longer upload (found by a review, 2026-12-02: it ignored the compare-and-set's
    outcome). Played by handing the report a read taken before the sweeper's change."""
    from dataclasses import replace

    from sqlalchemy import update

    from fedcompute.store.assignments import AssignmentRepository
    from fedcompute.store.models import AssignmentRow

    harness.create_task()
    a = harness.check_in().task_assignment
    with harness.suite.server.db.transaction() as s:
        s.execute(update(AssignmentRow).where(AssignmentRow.id == a.assignment_id).values(status="TIMED_OUT"))
    real_get = AssignmentRepository.get
    reads: list[str] = []

    def stale_first(self: AssignmentRepository, assignment_id: str, lock: bool = False) -> object:
        found = real_get(self, assignment_id, lock)
        reads.append(assignment_id)
        return replace(found, status="ASSIGNED") if len(reads) == 1 and found is not None else found

    monkeypatch.setattr(AssignmentRepository, "get", stale_first)
    answer = harness.report(a)
    assert not answer.HasField("upload_instruction")
    assert common_pb2.RejectionReason.Name(answer.rejection_info.reason) == "REJECTION_REASON_RESULT_NOT_NEEDED"


@pytest.mark.parametrize(
    "method",
    [
        "/fedcompute.v1.TaskAssignmentService/CreateTaskAssignment",
        "/fedcompute.v1.TaskAssignmentService/ReportResult",
        "/fedcompute.v1.UploadService/QueryWriteStatus",
        "/fedcompute.v1.ResourceService/Read",
    ],
)
def test_a_request_protobuf_cannot_parse_is_invalid_argument(harness: Harness, method: str) -> None:
    """A unary request that is not a valid message of its method (cut short; a string that is not UTF-8) is
    INVALID_ARGUMENT with a message, counted and logged like any refusal; gRPC's own decoding answered INTERNAL
    "Exception deserializing request!" (found by a review, 2026-12-02). Write decodes its own requests (test_upload)."""
    call = open_channel(harness.suite.server_address).unary_unary(method, None, None)  # bytes as they are
    for bad in (b"\x0a\x05ab", b"\x0a\x02\xc3\x28"):
        with pytest.raises(grpc.RpcError) as info:
            call(bad, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid protobuf message" in (info.value.details() or "")


CALLERS = 16


class _SlowCountingKeys(KeyClient):
    """A real key-service client that counts its look-ups of a population's keys and holds each until every caller
    of the burst has started its own (then 0.2 s more, for the last to reach the cache): a slow provider, with
    every caller arriving while the first look-up is under way, however the threads are scheduled."""

    def __init__(self, address: str) -> None:
        super().__init__(open_channel(address), 10.0)
        self.asked = 0
        self.arrived = threading.Semaphore(0)  # released once by each caller, just before its look-up
        self._lock = threading.Lock()

    def get_public_keys(self, request: key_pb2.GetPublicKeysRequest) -> key_pb2.GetPublicKeysResponse:
        with self._lock:
            self.asked += 1
            for _ in range(CALLERS if self.asked == 1 else 0):
                assert self.arrived.acquire(timeout=30)
        time.sleep(0.2)
        return super().get_public_keys(request)


def _burst(ring: KeyRing, keys: _SlowCountingKeys, population: str) -> list[common_pb2.PublicKey | Exception]:
    """``CALLERS`` check-ins' look-ups of the population's key, all at once."""
    start = threading.Barrier(CALLERS)

    def look_up(_: int) -> common_pb2.PublicKey | Exception:
        start.wait()
        keys.arrived.release()
        try:
            return ring.active_key(population)
        except Exception as exc:  # each caller's own outcome, compared below
            return exc

    with ThreadPoolExecutor(CALLERS) as pool:
        return list(pool.map(look_up, range(CALLERS)))


def test_a_burst_of_check_ins_on_a_cold_key_cache_asks_the_key_services_once(harness: Harness) -> None:
    """A new population's first devices (or the cache entry's expiry under load) arrive together: one look-up at
    the key services, whose answer every waiting check-in relays; the next check-in finds it cached."""
    harness.create_task("pop")
    published = harness.keys.get_public_keys(key_pb2.GetPublicKeysRequest(population_name="pop")).keys
    keys = _SlowCountingKeys(harness.suite.key_addresses[0])
    ring = KeyRing([keys], SystemClock())
    answers = _burst(ring, keys, "pop")
    assert keys.asked == 1
    assert all(isinstance(a, common_pb2.PublicKey) for a in answers), answers
    assert {a.SerializeToString() for a in answers} == {published[0].SerializeToString()}  # type: ignore[union-attr]
    ring.active_key("pop")
    assert keys.asked == 1


def test_a_failed_key_look_up_fails_every_check_in_waiting_on_it_and_is_not_remembered() -> None:
    """No key service answers: the check-ins that waited on the one look-up get UNAVAILABLE each (a message of
    their own), and the next check-in asks again (a failure is not cached)."""
    with socket.socket() as closed:  # a port with nobody listening
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    keys = _SlowCountingKeys(address)
    ring = KeyRing([keys], SystemClock())
    answers = _burst(ring, keys, "pop")
    assert keys.asked == 1
    assert all(isinstance(a, Unavailable) and "no key service is reachable (UNAVAILABLE)" in str(a) for a in answers)
    assert len({id(a) for a in answers}) == len(answers)
    with pytest.raises(Unavailable):
        ring.active_key("pop")
    assert keys.asked == 2
