"""The aggregation front and worker: bad contributions are left out and counted; internal auth; failures."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select

from fedcompute.clients.device import upload
from fedcompute.clients.typed import streamed_contribution
from fedcompute.core import checkpoints
from fedcompute.core.blobs import blob_path
from fedcompute.core.errors import FailedPrecondition
from fedcompute.core.records import JobRecord
from fedcompute.keys import hpke
from fedcompute.rpc import wire
from fedcompute.rpc.channels import open_channel
from fedcompute.server.api_workers import encode_contribution
from fedcompute.server.jobs import JobResult
from fedcompute.store.jobs import JobRepository
from fedcompute.store.models import JobRow
from fedcompute.v1 import aggregation_pb2, aggregation_pb2_grpc
from fedcompute.v1 import task_assignment_pb2 as ta
from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness, sealed, suite_settings, wait_for, zero_update
from tests.mutations import maybe_damaged


def _contribute(harness: Harness, data_for: list[object]) -> str:
    task = harness.create_task(report_goal=len(data_for), max_cohort=len(data_for), min_clients=1)
    for make in data_for:
        a = harness.check_in().task_assignment
        instruction = harness.report(a).upload_instruction
        upload(harness.uploads, instruction, make(a))  # type: ignore[operator]
    return task.task_id


def _wrong_key(a: ta.TaskAssignment) -> bytes:
    stranger = ta.TaskAssignment()
    stranger.CopyFrom(a)
    stranger.encryption_key.public_key = hpke.public_bytes(hpke.generate_private_key().public_key())
    return sealed(stranger)


@pytest.mark.aggregator
def test_bad_contributions_are_left_out_and_counted(harness: Harness) -> None:
    task_id = _contribute(
        harness,
        [
            lambda a: sealed(a, zero_update(value=0.5, metrics={"loss": 1.0, "accuracy": 0.5})),
            lambda a: sealed(a, zero_update(value=0.5, examples=3, metrics={"loss": 2.0, "accuracy": 1.0})),
            lambda a: sealed(a, key_id="k_not_a_real_key"),  # context names another key
            _wrong_key,  # claims the population key but was sealed to another one
            lambda a: sealed(a, b"not safetensors"),  # decrypts, but is no update
            lambda a: sealed(a, zero_update("digits-mlp-v1")),  # another model's tensors: not the plan's schema
            lambda a: sealed(a, zero_update(value=float("nan"))),  # not finite
            lambda a: sealed(a, zero_update(metrics={"accuracy": 7.0})),  # out of range
            lambda a: sealed(a, zero_update(metrics={"auc": 0.5})),  # a metric the plan does not ask for
        ],
    )
    wait_for(lambda: harness.task(task_id).status == tm.TASK_STATUS_COMPLETED, what="round to complete")
    [iteration] = harness.iterations(task_id)
    assert (iteration.accepted_contributions, iteration.rejected_contributions) == (2, 7)
    metrics = {m.name: m.value for m in iteration.metrics}  # weighted by the examples each device reported
    assert metrics == pytest.approx({"loss": (1.0 * 10 + 2.0 * 3) / 13, "accuracy": (0.5 * 10 + 1.0 * 3) / 13})
    assert iteration.metric_examples == 13
    engine = create_engine(harness.suite.settings.resolved_database_url())
    with engine.connect() as conn:
        counted = json.loads(conn.execute(select(JobRow.rejections_json)).scalar_one())
    engine.dispose()
    assert counted == {"unknown_key": 1, "decrypt_failed": 1, "bad_payload": 2, "non_finite": 1, "bad_metrics": 2}
    versions = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task_id)).versions
    assert [(v.version, v.parent_version, v.contributions) for v in versions] == [(1, 0, 0), (2, 1, 2)]
    assert versions[1].parent_sha256_hex == versions[0].checkpoint.sha256_hex


@pytest.mark.aggregator
def test_round_with_no_valid_contribution_is_retried(harness: Harness) -> None:
    task_id = _contribute(harness, [_wrong_key, _wrong_key])
    wait_for(lambda: len(harness.iterations(task_id)) == 2, what="a second attempt at round 1")
    first, second = harness.iterations(task_id)
    assert first.status == tm.ITERATION_STATUS_FAILED
    assert first.rejected_contributions == 0
    assert second.status == tm.ITERATION_STATUS_OPEN
    assert second.round == 1
    assert harness.task(task_id).status == tm.TASK_STATUS_OPEN


def test_worker_api_needs_the_internal_token(harness: Harness) -> None:
    stub = aggregation_pb2_grpc.AggregationServiceStub(open_channel(harness.suite.server_address))
    with pytest.raises(grpc.RpcError) as info:
        stub.ClaimJob(aggregation_pb2.ClaimJobRequest(worker_id="intruder"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        stub.ClaimJob(
            aggregation_pb2.ClaimJobRequest(worker_id="intruder"),
            timeout=5,
            metadata=(("authorization", "Bearer wrong"),),
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_stale_lease_is_refused(harness: Harness) -> None:
    with pytest.raises(grpc.RpcError) as info:
        harness.jobs.complete_job(aggregation_pb2.CompleteJobRequest(job_id="job_x", lease_id="lease_x"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection_are_served(harness: Harness) -> None:
    for address in (harness.suite.server_address, *harness.suite.key_addresses):
        health = health_pb2_grpc.HealthStub(open_channel(address))
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reply = health_pb2_grpc.HealthStub(open_channel(harness.suite.server_address)).Check(
        health_pb2.HealthCheckRequest(service="fedcompute.v1.UploadService"), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("fault", ["altered", "deleted"])
def test_the_job_stream_sends_the_input_set_in_order_and_leaves_checking_the_bytes_to_the_worker(
    harness: Harness, fault: str
) -> None:
    """The stream delivers the input set in its order. An envelope changed on the server's disk after it was counted
    goes out as it is (the server does not hash what it streams: the worker does, below); one removed stops the
    stream with DATA_LOSS naming the contribution."""
    _contribute(harness, [sealed, sealed, sealed])
    job = harness.jobs.claim_job(aggregation_pb2.ClaimJobRequest(worker_id="w")).job
    inputs = [(i.assignment_id, i.envelope_sha256_hex) for i in job.inputs]
    assert len(inputs) == 3
    request = aggregation_pb2.StreamContributionsRequest(job_id=job.job_id, lease_id=job.lease_id)
    sent = [
        (c.assignment_id, hashlib.sha256(c.envelope).hexdigest()) for c in harness.jobs.stream_contributions(request)
    ]
    assert sent == inputs
    blob = blob_path(harness.suite.settings.blob_dir(), inputs[1][1])
    if fault == "altered":
        altered = bytearray(blob.read_bytes())
        altered[-1] ^= 1
        blob.write_bytes(bytes(altered))
        streamed = [(c.assignment_id, c.envelope) for c in harness.jobs.stream_contributions(request)]
        assert [a for a, _ in streamed] == [a for a, _ in inputs]
        assert streamed[1][1] == bytes(altered)
        assert hashlib.sha256(streamed[1][1]).hexdigest() != inputs[1][1]
        return
    blob.unlink()
    stream = harness.jobs.stream_contributions(request)
    first = next(stream)
    assert (first.assignment_id, hashlib.sha256(first.envelope).hexdigest()) == inputs[0]
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert inputs[1][0] in (info.value.details() or "")


@pytest.mark.aggregator
def test_the_worker_refuses_a_round_whose_envelope_was_altered_on_the_servers_disk(harness: Harness) -> None:
    """The server's disk is untrusted: an envelope altered after it was counted is streamed as it is, and the
    worker, hashing each against the input set, fails the job naming that contribution; nothing is published."""
    task = harness.create_task(report_goal=3, max_cohort=3, min_clients=1)
    altered_id = ""
    for i in range(3):
        a = harness.check_in().task_assignment
        envelope = sealed(a)
        upload(harness.uploads, harness.report(a).upload_instruction, envelope)
        if i == 1:  # counted, the round still open: change its bytes where the server keeps them
            blob = blob_path(harness.suite.settings.blob_dir(), hashlib.sha256(envelope).hexdigest())
            blob.write_bytes(envelope[:-1] + bytes([envelope[-1] ^ 1]))
            altered_id = a.assignment_id
    wait_for(lambda: harness.iterations(task.task_id)[0].status == tm.ITERATION_STATUS_FAILED, what="the round to fail")
    first = harness.iterations(task.task_id)[0]
    assert altered_id in first.aggregation_note
    assert "does not hash to the input set's sha256" in first.aggregation_note
    versions = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task.task_id)).versions
    assert [v.version for v in versions] == [1]


@pytest.mark.parametrize("id_size", [0, 1, 26, 127, 128, 300])
@pytest.mark.parametrize("envelope_size", [0, 1, 127, 128, 16_383, 16_384, 2_097_152, 4 * 1024 * 1024 + 517])
def test_a_contribution_encoded_by_the_server_is_the_protobuf_encoding(id_size: int, envelope_size: int) -> None:
    """The server encodes each StreamContributionsResponse itself (upb's serializer is slow on 4 MiB): byte for
    byte what protobuf gives, every varint length boundary included, and it parses back to the same fields."""
    assignment_id = "a" * id_size
    envelope = bytes(range(256)) * (envelope_size // 256) + bytes(envelope_size % 256)
    encoded = encode_contribution(assignment_id, envelope)
    expected = aggregation_pb2.StreamContributionsResponse(assignment_id=assignment_id, envelope=envelope)
    assert encoded == expected.SerializeToString()
    parsed = aggregation_pb2.StreamContributionsResponse.FromString(encoded)
    assert (parsed.assignment_id, parsed.envelope) == (assignment_id, envelope)


_unknown_field = st.one_of(
    st.builds(lambda n, v: wire.varint(n << 3) + wire.varint(v), st.integers(3, 2**29 - 1), st.integers(0, 2**64 - 1)),
    st.builds(lambda n, b: wire.varint(n << 3 | 1) + b, st.integers(3, 2**29 - 1), st.binary(min_size=8, max_size=8)),
    st.builds(lambda n, b: wire.varint(n << 3 | 5) + b, st.integers(3, 2**29 - 1), st.binary(min_size=4, max_size=4)),
    st.builds(lambda n, b: wire.message((n, b)) if b else b"", st.integers(3, 2**29 - 1), st.binary(max_size=40)),
)
_field = st.one_of(
    st.builds(lambda t: wire.message((1, t)), st.text(max_size=40)),
    st.builds(lambda b: wire.message((2, b)), st.binary(max_size=300)),
    _unknown_field,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_field, max_size=8), st.data())
def test_the_worker_reads_a_streamed_contribution_as_protobuf_does(fields: list[bytes], data: st.DataObject) -> None:
    """The worker reads each StreamContributionsResponse by hand (``wire.length_delimited``: the envelope a view of
    the message, not two copies): the same fields as protobuf's parser, with unknown fields of every wire type,
    repeated fields (the last wins) and defaults; whatever it refuses, protobuf refuses too (a cut or altered
    message), so a malformed stream fails the same way (INTERNAL from gRPC)."""
    raw = maybe_damaged(b"".join(fields), data)
    try:
        expected = aggregation_pb2.StreamContributionsResponse.FromString(raw)
    except DecodeError:
        expected = None
    try:
        got = streamed_contribution(raw)
    except ValueError:
        assert expected is None, f"refused what protobuf reads: {raw!r}"
        return
    if expected is not None:
        assert (got.assignment_id, bytes(got.envelope)) == (expected.assignment_id, expected.envelope)


def test_a_streamed_envelope_is_a_view_of_the_message_not_a_copy() -> None:
    envelope = bytes(range(256)) * 20_000
    raw = encode_contribution("asg_x", envelope)
    got = streamed_contribution(raw)
    assert got.assignment_id == "asg_x"
    assert got.envelope == envelope
    assert got.envelope.obj is raw  # the message's own buffer


def _claim_in_background(
    harness: Harness, wait_ms: int
) -> tuple[threading.Thread, list[aggregation_pb2.ClaimJobResponse]]:
    answers: list[aggregation_pb2.ClaimJobResponse] = []
    request = aggregation_pb2.ClaimJobRequest(worker_id="w", wait_ms=wait_ms)
    thread = threading.Thread(target=lambda: answers.append(harness.jobs.claim_job(request)))
    thread.start()
    return thread, answers


def test_a_waiting_claim_gets_the_job_when_the_round_closes_and_shutdown_releases_one(
    database_url: str, tmp_path: Path
) -> None:
    """Workers long-poll ClaimJob (``wait_ms``): the upload that closes a round wakes the claim waiting on the same
    server at once. The server's own look for jobs queued elsewhere is set to 30 s here, longer than the claim may
    wait (15 s), so only the wake can hand it the job. A claim waiting when the server stops answers at once."""
    settings = suite_settings(tmp_path / "w", database_url, max_upload_bytes=64 * 1024, poll_interval_s=30.0)
    harness = Harness.start(settings, aggregator=False)
    try:
        thread, answers = _claim_in_background(harness, wait_ms=15_000)
        threading.Event().wait(0.3)  # it has looked, found nothing and waits
        assert thread.is_alive()
        task_id = _contribute(harness, [sealed, sealed])
        thread.join(timeout=10)
        assert not thread.is_alive(), "the round closed but the waiting claim was not woken"
        job = answers[0].job
        assert job.task_id == task_id
        assert len(job.inputs) == 2
        waiting, answers = _claim_in_background(harness, wait_ms=15_000)
        threading.Event().wait(0.3)
        harness.suite.server.jobs.close()  # as ServerApp.stop does first
        waiting.join(timeout=10)
        assert not waiting.is_alive()
        assert not answers[0].HasField("job")
    finally:
        harness.stop()


def _lease_runs_out(harness: Harness, job_id: str) -> None:
    """The worker holding the job died or hung: its lease is in the past."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    with harness.suite.server.db.transaction() as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(lease_expiry=datetime.now(UTC) - timedelta(1)))


def _result(scale: float = 1.0) -> JobResult:
    weights = checkpoints.initial_weights("digits-linear-v1", seed=0)
    return JobResult(checkpoints.encode({k: v * scale for k, v in weights.items()}), 2, 0, {})


def test_a_worker_whose_lease_is_taken_over_while_it_completes_or_fails_changes_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A's lease runs out and worker B claims the job between A's lease check and A's write (A was storing
    its result's blob, or about to fail the job): A's CompleteJob and FailJob are refused and change nothing, B's
    attempt goes on and completes, and a repeat of B's CompleteJob (a retry after a lost answer) answers SUCCEEDED
    again. Before 2026-12-02 the lease was checked in one transaction and the job changed in another: A's result
    was recorded over B's attempt, or A's failure failed the round under B, discarding B's result (found by a
    review)."""
    task_id = _contribute(harness, [sealed, sealed])
    jobs = harness.suite.server.jobs
    a = jobs.claim("worker-a")
    assert a is not None
    job_id = a.job.job_id
    taken: list[str] = []

    def taken_over() -> None:
        _lease_runs_out(harness, job_id)
        b = jobs.claim("worker-b")
        assert b is not None
        taken.append(b.job.lease_id or "")

    real_put = jobs._blobs.put

    def put_then_taken_over(data: bytes) -> str:
        address = real_put(data)
        taken_over()
        return address

    monkeypatch.setattr(jobs._blobs, "put", put_then_taken_over)
    with pytest.raises(FailedPrecondition, match="not leased under this lease id"):
        jobs.complete(job_id, a.job.lease_id or "", _result())
    monkeypatch.setattr(jobs._blobs, "put", real_put)
    real_leased = jobs._leased

    def leased_then_taken_over(job: str, lease: str) -> JobRecord:
        found = real_leased(job, lease)
        taken_over()
        return found

    monkeypatch.setattr(jobs, "_leased", leased_then_taken_over)
    with pytest.raises(FailedPrecondition, match="not leased under this lease id"):
        jobs.fail(job_id, taken[0], "worker-b's own lease, taken over in turn", retryable=False)
    monkeypatch.setattr(jobs, "_leased", real_leased)
    assert [i.status for i in harness.iterations(task_id)] == [tm.ITERATION_STATUS_AGGREGATING]
    latest = taken[-1]
    assert jobs.complete(job_id, latest, _result()) == "SUCCEEDED"
    assert jobs.complete(job_id, latest, _result()) == "SUCCEEDED"  # the same call again: answered, not recorded
    with pytest.raises(FailedPrecondition, match="another result"):
        jobs.complete(job_id, latest, _result(scale=2.0))  # not the same call: never answered as if recorded
    with pytest.raises(FailedPrecondition):
        jobs.complete(job_id, a.job.lease_id or "", _result())  # not the lease that completed it


def test_a_failjob_repeated_after_a_lost_answer_is_answered_again_and_changes_nothing(harness: Harness) -> None:
    """The worker's client retries FailJob (marked idempotent) when its answer is lost. The repeat, under the lease
    the first call ended, answers the job's status again: PENDING for a requeued job, FAILED for a failed one, and
    nothing changes (no second requeue, no second round attempt). Once a claim has taken the requeued job, the old
    lease is refused. Before 2026-12-02 the repeat got FAILED_PRECONDITION, and a worker's retry of a failure that
    had in fact been recorded ended in an error."""
    task_id = _contribute(harness, [sealed, sealed])
    claim = aggregation_pb2.ClaimJobRequest(worker_id="w")
    first = harness.jobs.claim_job(claim).job
    again = aggregation_pb2.FailJobRequest(job_id=first.job_id, lease_id=first.lease_id, reason="flaky", retryable=True)
    assert harness.jobs.fail_job(again).status == aggregation_pb2.JOB_STATUS_PENDING
    assert harness.jobs.fail_job(again).status == aggregation_pb2.JOB_STATUS_PENDING
    with harness.suite.server.db.reading() as s:
        assert s.execute(select(JobRow.status, JobRow.attempts).where(JobRow.id == first.job_id)).one() == (
            "PENDING", 1,
        )  # fmt: skip
    claimed: list[aggregation_pb2.AggregationJob] = []

    def claimed_again() -> bool:  # after its backoff
        claimed.append(harness.jobs.claim_job(claim).job)
        return bool(claimed[-1].job_id)

    wait_for(claimed_again, 10, "the job's retry")
    second = claimed[-1]
    assert (second.job_id, second.attempt) == (first.job_id, 2)
    with pytest.raises(grpc.RpcError) as info:
        harness.jobs.fail_job(again)  # the first lease is over: a claim replaced it
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    final = aggregation_pb2.FailJobRequest(
        job_id=second.job_id, lease_id=second.lease_id, reason="bad", retryable=False
    )
    assert harness.jobs.fail_job(final).status == aggregation_pb2.JOB_STATUS_FAILED
    assert harness.jobs.fail_job(final).status == aggregation_pb2.JOB_STATUS_FAILED
    statuses = [i.status for i in harness.iterations(task_id)]
    assert statuses == [tm.ITERATION_STATUS_FAILED, tm.ITERATION_STATUS_OPEN]  # one retry of the round, not two
    with pytest.raises(grpc.RpcError) as info:
        harness.jobs.complete_job(
            aggregation_pb2.CompleteJobRequest(job_id=second.job_id, lease_id=second.lease_id)
        )  # a failed job is never completed under the lease that failed it
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("call", ["fail", "complete"])
def test_a_repeat_overlapping_the_call_it_repeats_gets_the_same_answer(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """The worker's client retries FailJob and CompleteJob after a deadline, so the repeat can arrive while the
    first call still waits on the job's row lock: both have passed the lease check before either changes the job.
    The one that takes the lock second finds the job ended under its own lease and gets the same answer (PENDING,
    or SUCCEEDED for the same result), not FAILED_PRECONDITION (found by a review, 2026-12-02)."""
    _contribute(harness, [sealed, sealed])
    jobs = harness.suite.server.jobs
    claimed = jobs.claim("worker")
    assert claimed is not None
    job_id, lease_id = claimed.job.job_id, claimed.job.lease_id or ""
    both_checked = threading.Barrier(2, timeout=10)
    real_leased = jobs._leased

    def leased_then_wait(job: str, lease: str) -> JobRecord:
        found = real_leased(job, lease)
        both_checked.wait()  # neither changes the job before both have checked the lease
        return found

    monkeypatch.setattr(jobs, "_leased", leased_then_wait)
    answers: list[str] = []

    def repeat() -> None:
        try:
            if call == "fail":
                answers.append(jobs.fail(job_id, lease_id, "flaky", retryable=True))
            else:
                answers.append(jobs.complete(job_id, lease_id, _result()))
        except Exception as exc:
            answers.append(repr(exc))

    threads = [threading.Thread(target=repeat) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert answers == [{"fail": "PENDING", "complete": "SUCCEEDED"}[call]] * 2


def test_a_job_whose_lease_runs_out_on_every_attempt_is_failed_not_leased_forever(harness: Harness) -> None:
    """A job that kills every worker taking it (too large for their memory, say) never reaches FailJob: its lease
    runs out each time. After ``job_attempts`` leases the next claim fails it and retries its round, instead of
    leasing it again forever with the round AGGREGATING for good (found by a review, 2026-12-02)."""
    task_id = _contribute(harness, [sealed, sealed])
    jobs = harness.suite.server.jobs
    first = jobs.claim("worker-0")
    assert first is not None
    job_id = first.job.job_id
    last = first
    for attempt in range(2, jobs._limits.job_attempts + 1):
        _lease_runs_out(harness, job_id)
        again = jobs.claim(f"worker-{attempt}")
        assert again is not None
        assert (again.job.job_id, again.job.attempts) == (job_id, attempt)
        last = again
    _lease_runs_out(harness, job_id)
    jobs.extend(job_id, last.job.lease_id or "")  # the last worker was alive after all: it extends in time
    assert jobs.claim("worker-late") is None  # nothing claimable, and its job is not ended under it
    with harness.suite.server.db.reading() as s:
        assert s.execute(select(JobRow.status).where(JobRow.id == job_id)).scalar_one() == "RUNNING"
    _lease_runs_out(harness, job_id)
    assert jobs.claim("worker-last") is None  # failed, not leased again
    with harness.suite.server.db.reading() as s:
        status, error = s.execute(select(JobRow.status, JobRow.error).where(JobRow.id == job_id)).one()
    assert status == "FAILED"
    assert "lease ran out" in error
    statuses = [i.status for i in harness.iterations(task_id)]
    assert statuses[0] == tm.ITERATION_STATUS_FAILED
    assert statuses[1:] == [tm.ITERATION_STATUS_OPEN]  # the round's next attempt


def _succeeded_jobs(harness: Harness, populations: tuple[str, ...]) -> list[tuple[str, str]]:
    """(task id, job id) of one task per population, each with its round's job SUCCEEDED (results of distinct
    bytes: blobs are addressed by their hash), the suite's model updater stopped: the test runs one of its own."""
    harness.stop_model_updater()
    jobs, done = harness.suite.server.jobs, list[tuple[str, str]]()
    for population in populations:
        task_id = harness.create_task(population, report_goal=2, max_cohort=2, min_clients=1).task_id
        for _ in range(2):
            a = harness.check_in(population).task_assignment
            upload(harness.uploads, harness.report(a).upload_instruction, sealed(a))
        claimed = jobs.claim(f"worker-{population}")
        assert claimed is not None
        result = _result(scale=3.0 + len(done))
        assert jobs.complete(claimed.job.job_id, claimed.job.lease_id or "", result) == "SUCCEEDED"
        done.append((task_id, claimed.job.job_id))
    return done


def test_a_lost_result_is_discarded_and_holds_up_no_other_task(harness: Harness) -> None:
    """Task A's aggregated update is gone from the blob store before the model updater applies it (a damaged disk,
    an orphan sweep racing a retried job); task B's job succeeded after it. The updater discards A's job, retrying
    its round, and publishes B's version in the same pass. Before 2026-12-02 the missing blob escaped the pass
    before any later job was looked at, every pass, so no task published again (found by a review)."""
    from fedcompute.core.clock import RandomIds, SystemClock
    from fedcompute.modelupdater.updater import ModelUpdater

    server = harness.suite.server
    (a_task, a_job), (b_task, _) = _succeeded_jobs(harness, ("pop", "pop-b"))
    with server.db.reading() as s:
        lost = s.execute(select(JobRow.update_sha256).where(JobRow.id == a_job)).scalar_one()
    server.blobs.delete(lost or "")
    updater = ModelUpdater(server.db, server.blobs, SystemClock(), RandomIds(), 2)
    assert updater.run_once() == 1  # B's version
    assert harness.task(b_task).latest_model_version == 2
    assert harness.task(a_task).latest_model_version == 1
    assert [i.status for i in harness.iterations(a_task)] == [tm.ITERATION_STATUS_FAILED, tm.ITERATION_STATUS_OPEN]
    with server.db.reading() as s:
        assert s.execute(select(JobRow.status).where(JobRow.task_id == a_task)).scalar_one() == "FAILED"


def test_jobs_that_keep_failing_to_apply_hold_up_no_other_task_however_many(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Succeeded jobs whose apply keeps raising (a fault no retry mends, here one that fills every page but the
    last: pages of one job) stay SUCCEEDED and are logged; every pass still reaches the job after them. Before
    2026-12-02 the updater read the first 10 succeeded jobs only: ten jobs failing for good stopped every task."""
    from fedcompute.core.clock import RandomIds, SystemClock
    from fedcompute.modelupdater import updater as updater_module

    server = harness.suite.server
    succeeded = sorted(_succeeded_jobs(harness, ("pop", "pop-b", "pop-c")), key=lambda done: done[1])
    stuck = {job_id for _, job_id in succeeded[:2]}  # the first pages, in the order the updater reads them
    monkeypatch.setattr(updater_module, "JOB_PAGE", 1)
    updater = updater_module.ModelUpdater(server.db, server.blobs, SystemClock(), RandomIds(), 2)
    real_apply = updater.apply

    def apply(job: JobRecord) -> bool:
        if job.job_id in stuck:
            raise RuntimeError("the base checkpoint cannot be read")
        return real_apply(job)

    monkeypatch.setattr(updater, "apply", apply)
    pages: list[str] = []
    real_page = JobRepository.with_status

    def page(self: JobRepository, status: str, limit: int = 10, after: str = "") -> list[JobRecord]:
        pages.append(after)
        return real_page(self, status, limit, after)

    monkeypatch.setattr(JobRepository, "with_status", page)
    assert updater.run_once() == 1  # the third task's version, past two pages that failed
    assert pages == ["", *(job_id for _, job_id in succeeded)]  # a page each, then an empty one
    assert updater.run_once() == 0  # the next pass looks at the stuck jobs again, and publishes nothing twice
    assert [harness.task(task_id).latest_model_version for task_id, _ in succeeded] == [1, 1, 2]
    with server.db.reading() as s:
        statuses = {job_id: status for job_id, status in s.execute(select(JobRow.id, JobRow.status))}
    assert sorted(statuses[job_id] for job_id in stuck) == ["SUCCEEDED", "SUCCEEDED"]


def test_a_job_of_a_task_canceled_while_its_round_aggregated_is_not_handed_to_a_worker(harness: Harness) -> None:
    """The round closed (a PENDING job), then the operator canceled the task: the next claim fails the job and
    hands out nothing, so no worker asks the key services to release, and charge the privacy budget, for a result
    the model updater would throw away. Before 2026-12-02 the job was claimed and aggregated as if the task were
    open (found by review)."""
    task_id = _contribute(harness, [sealed])
    assert [i.status for i in harness.iterations(task_id)] == [tm.ITERATION_STATUS_AGGREGATING]
    harness.operators.cancel_task(tm.CancelTaskRequest(task_id=task_id))
    claimed = harness.jobs.claim_job(aggregation_pb2.ClaimJobRequest(worker_id="w"))
    assert not claimed.HasField("job")
    with harness.suite.server.db.reading() as s:
        jobs = list(s.execute(select(JobRow.status, JobRow.error).where(JobRow.task_id == task_id)))
    assert [(status, error) for status, error in jobs] == [("FAILED", "task canceled: not aggregated")]
    assert [i.status for i in harness.iterations(task_id)] == [tm.ITERATION_STATUS_CANCELED]
