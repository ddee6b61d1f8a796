"""Values a request may carry that the database cannot store (a NUL character, which Postgres refuses in text; a
number past a column's range; an id long enough to pass gRPC's metadata limit when quoted back; negative counts)
get a refusal a person can act on, never INTERNAL, and change nothing stored. Found by review, 2026-12-02: each
answered INTERNAL (with a traceback per call in the log), most on RPCs any device can make."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from fedcompute.clients.device import upload
from fedcompute.v1 import aggregation_pb2, resource_pb2
from fedcompute.v1 import task_assignment_pb2 as ta
from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness, sealed


def _refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def _outcome(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The call's status and message (OK if it was answered)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_a_nul_character_in_a_string_field_is_refused_and_changes_nothing(harness: Harness) -> None:
    """On Postgres each reaches the database, which refuses the value: INVALID_ARGUMENT saying so. On SQLite,
    which stores NUL, they name nothing that exists. Check-in refuses a population with control characters first."""
    task = harness.create_task(report_goal=2, max_cohort=3)
    bad = task.task_id + "\x00"
    operators, devices, jobs = harness.operators, harness.assignments, harness.jobs
    calls: dict[str, Callable[[], object]] = {
        "GetTask": lambda: operators.get_task(tm.GetTaskRequest(task_id=bad)),
        "ListTasks": lambda: operators.list_tasks(tm.ListTasksRequest(population_name="pop\x00")),
        "CancelTask": lambda: operators.cancel_task(tm.CancelTaskRequest(task_id=bad)),
        "ListIterations": lambda: operators.list_iterations(tm.ListIterationsRequest(task_id=bad)),
        "ListModelVersions": lambda: operators.list_model_versions(tm.ListModelVersionsRequest(task_id=bad)),
        "ReportResult": lambda: devices.report_result(
            ta.ReportResultRequest(assignment_id="asg\x00", result=ta.REPORT_RESULT_COMPLETED)
        ),
        "FailJob": lambda: jobs.fail_job(aggregation_pb2.FailJobRequest(job_id="job\x00", lease_id="l", reason="r")),
        "ExtendLease": lambda: jobs.extend_lease(aggregation_pb2.ExtendLeaseRequest(job_id="job\x00", lease_id="l")),
    }
    postgres = not harness.suite.server.db.is_sqlite
    for name, call in calls.items():
        code, details = _outcome(call)
        if postgres:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
            assert "cannot be stored" in details, (name, details)
        else:
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (name, code, details)
            assert code != grpc.StatusCode.OK or name == "ListTasks"  # (SQLite lists no task of that population)
    code, details = _refusal(lambda: harness.check_in("pop\x00"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "population_name: must not hold control characters" in details
    assert harness.task(task.task_id).status == tm.TASK_STATUS_OPEN
    assert harness.check_in().HasField("task_assignment")  # the task serves as before


def test_a_model_version_past_the_stored_range_is_not_found(harness: Harness) -> None:
    task = harness.create_task(report_goal=2, max_cohort=3)
    for version in (2**31, 10**18 - 1):
        name = f"models/{task.task_id}/{version}"
        code, details = _refusal(lambda n=name: list(harness.resources.read(resource_pb2.ReadRequest(resource_name=n))))  # type: ignore[misc]
        assert code == grpc.StatusCode.NOT_FOUND, details


def test_a_long_id_quoted_back_is_cut_so_the_refusal_arrives(harness: Harness) -> None:
    """A 20,000-character task id, and 2,000 emoji: NOT_FOUND, the message cut to 1,024 bytes of UTF-8. The whole id
    quoted in the message put the trailers past the client's metadata limit, and the client saw RESOURCE_EXHAUSTED
    instead (the emoji, cut by characters, still did at random)."""
    for long_id in ("t" * 20_000, "\U0001f600" * 2_000):  # (the second: 4 bytes a character, 3 a byte on the wire)
        code, details = _refusal(lambda i=long_id: harness.operators.get_task(tm.GetTaskRequest(task_id=i)))  # type: ignore[misc]
        assert code == grpc.StatusCode.NOT_FOUND
        assert len(details.encode()) <= 1024
        assert details.endswith("(cut)")


def test_a_job_result_with_negative_counts_is_refused_before_anything_is_recorded(harness: Harness) -> None:
    """A negative rejection count: the job was recorded SUCCEEDED, then a metric's increment raised, so the worker
    was told INTERNAL for a committed result, and again on every retry. Now refused first, the job still leased."""
    harness.create_task(report_goal=1, max_cohort=1, min_clients=1)
    a = harness.check_in().task_assignment
    upload(harness.uploads, harness.report(a).upload_instruction, sealed(a))
    job = harness.jobs.claim_job(aggregation_pb2.ClaimJobRequest(worker_id="w")).job
    negative = [
        aggregation_pb2.CompleteJobRequest(
            job_id=job.job_id, lease_id=job.lease_id, update=b"x", accepted_contributions=1, rejected_contributions=-1
        ),
        aggregation_pb2.CompleteJobRequest(
            job_id=job.job_id, lease_id=job.lease_id, update=b"x", accepted_contributions=1,
            rejections=[aggregation_pb2.RejectionCount(reason="bad", count=-1)],
        ),
    ]  # fmt: skip
    for request in negative:
        code, details = _refusal(lambda r=request: harness.jobs.complete_job(r))  # type: ignore[misc]
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "rejected_contributions: counts must be >= 0" in details
    extended = harness.jobs.extend_lease(aggregation_pb2.ExtendLeaseRequest(job_id=job.job_id, lease_id=job.lease_id))
    assert extended is not None  # still this worker's job: nothing was recorded
