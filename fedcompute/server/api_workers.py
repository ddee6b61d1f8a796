"""AggregationService (worker-facing): decode, call JobService, encode. Internal callers only."""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc

from fedcompute.core.clock import to_unix_ms
from fedcompute.core.records import RoundMetrics
from fedcompute.core.telemetry import ServerMetrics
from fedcompute.rpc import wire
from fedcompute.rpc.auth import require_bearer
from fedcompute.server.jobs import ClaimedJob, JobResult, JobService
from fedcompute.v1 import aggregation_pb2 as pb
from fedcompute.v1 import aggregation_pb2_grpc, common_pb2

_REASON = re.compile(r"^[a-z_]{1,40}$")


def _status(name: str) -> pb.JobStatus.ValueType:
    return pb.JobStatus.Value(f"JOB_STATUS_{name}")


def _encode_job(claimed: ClaimedJob) -> pb.AggregationJob:
    job, it, task = claimed.job, claimed.iteration, claimed.task
    return pb.AggregationJob(
        job_id=job.job_id,
        task_id=task.task_id,
        population_name=task.spec.population_name,
        round=it.round,
        aggregation_id=it.aggregation_id,
        model_version=it.base_model_version,
        plan_sha256_hex=task.plan_sha256,
        contributions=job.contributions,
        lease_id=job.lease_id or "",
        lease_expiry_unix_ms=to_unix_ms(job.lease_expiry) if job.lease_expiry else 0,
        attempt=job.attempts,
        input_set_sha256_hex=job.input_set_sha256,
        dp=_encode_dp(claimed),
        access_policy=common_pb2.SignedAccessPolicy.FromString(task.access_policy),
        inputs=[common_pb2.InputRef(assignment_id=a, envelope_sha256_hex=e) for a, e in claimed.inputs],
        plan=claimed.plan,
    )


def _encode_dp(claimed: ClaimedJob) -> pb.DpParams:
    dp, goal = claimed.task.spec.dp, claimed.task.spec.report_goal
    if dp is None:
        return pb.DpParams()
    return pb.DpParams(
        enabled=True,
        clip_norm=claimed.iteration.clip_norm or dp.l2_clip_norm,
        noise_multiplier=dp.update_noise(goal),
        expected_clients=goal,
        min_clients=dp.min_clients or goal,
        adaptive_clip=dp.adaptive_clip,
        target_unclipped_quantile=dp.target_unclipped_quantile if dp.adaptive_clip else 0.0,
        clip_learning_rate=dp.clip_learning_rate if dp.adaptive_clip else 0.0,
        clipped_count_stddev=dp.count_stddev(goal) if dp.adaptive_clip else 0.0,
    )


def _decode_metrics(request: pb.CompleteJobRequest) -> RoundMetrics | None:
    if not request.metrics:
        return None
    return RoundMetrics({m.name: m.value for m in request.metrics}, request.metric_examples)


class AggregationServicer(aggregation_pb2_grpc.AggregationServiceServicer):
    def __init__(self, jobs: JobService, internal_token: str, metrics: ServerMetrics | None = None) -> None:
        self._jobs = jobs
        self._token = internal_token
        self._metrics = metrics or ServerMetrics.create()

    def ClaimJob(self, request: pb.ClaimJobRequest, context: grpc.ServicerContext) -> pb.ClaimJobResponse:
        require_bearer(context, self._token)
        claimed = self._jobs.claim(request.worker_id, request.wait_ms / 1000)
        return pb.ClaimJobResponse(job=_encode_job(claimed)) if claimed else pb.ClaimJobResponse()

    def ExtendLease(self, request: pb.ExtendLeaseRequest, context: grpc.ServicerContext) -> pb.ExtendLeaseResponse:
        require_bearer(context, self._token)
        return pb.ExtendLeaseResponse(lease_expiry_unix_ms=self._jobs.extend(request.job_id, request.lease_id))

    def StreamContributions(
        self, request: pb.StreamContributionsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StreamContributionsResponse]:
        """Each response encoded here (``encode_contribution``; registered with ``ENCODED_HERE``), as bytes."""
        require_bearer(context, self._token)
        for assignment_id, envelope in self._jobs.contributions(request.job_id, request.lease_id):
            yield encode_contribution(assignment_id, envelope)  # type: ignore[misc]  # bytes, sent as they are

    def CompleteJob(self, request: pb.CompleteJobRequest, context: grpc.ServicerContext) -> pb.CompleteJobResponse:
        require_bearer(context, self._token)
        result = JobResult(
            update=request.update,
            accepted=request.accepted_contributions,
            rejected=request.rejected_contributions,
            rejections={r.reason: r.count for r in request.rejections},
            note=request.note,
            clip_norm=request.clip_norm or None,
            next_clip_norm=request.next_clip_norm or None,
            metrics=_decode_metrics(request),
        )
        status = self._jobs.complete(request.job_id, request.lease_id, result)
        self._metrics.contributions.labels("accepted", "ok").inc(request.accepted_contributions)
        for r in request.rejections:
            reason = r.reason if _REASON.match(r.reason) else "other"  # a bounded label, whatever is sent
            self._metrics.contributions.labels("rejected", reason).inc(r.count)
        return pb.CompleteJobResponse(status=_status(status))

    def FailJob(self, request: pb.FailJobRequest, context: grpc.ServicerContext) -> pb.FailJobResponse:
        require_bearer(context, self._token)
        status = self._jobs.fail(
            request.job_id, request.lease_id, request.reason, request.retryable, request.budget_exhausted
        )
        return pb.FailJobResponse(status=_status(status))


# The AggregationService's methods whose servicer encodes its responses itself (``rpc.wire``): the server streams
# every contribution of a round through StreamContributions
ENCODED_HERE = frozenset({"StreamContributions"})


def encode_contribution(assignment_id: str, envelope: bytes) -> bytes:
    """A ``StreamContributionsResponse``, encoded (``rpc.wire``)."""
    return wire.message((1, assignment_id), (2, envelope))
