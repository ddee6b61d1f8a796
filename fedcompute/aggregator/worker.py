"""The aggregator worker loop: claim a job, stream, open and sum its contributions, complete or fail it."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable

import grpc
import structlog

from fedcompute.aggregator.contributions import JobContext, Rejected, open_contribution
from fedcompute.aggregator.dp import BelowMinimum, DpParams, DpSum
from fedcompute.aggregator.fedavg import StreamingMean
from fedcompute.aggregator.keys import JobKeys, KeyAccess, KeyUnavailable
from fedcompute.aggregator.noise import ChaChaGaussian, NoiseSource
from fedcompute.clients.typed import AggregationClient
from fedcompute.core import checkpoints
from fedcompute.core.context import input_set_digest
from fedcompute.v1 import aggregation_pb2

log = structlog.get_logger("fedcompute.aggregator")


class AggregatorWorker:
    def __init__(
        self,
        jobs: AggregationClient,
        keys: KeyAccess,
        worker_id: str,
        noise: Callable[[], NoiseSource] = ChaChaGaussian.secure,
    ) -> None:
        self._jobs = jobs
        self._keys = keys
        self._noise = noise
        self._worker_id = worker_id

    def run_once(self) -> bool:
        """Claim and process one job; False when none was waiting."""
        claimed = self._jobs.claim_job(aggregation_pb2.ClaimJobRequest(worker_id=self._worker_id))
        if not claimed.HasField("job"):
            return False
        self.process(claimed.job)
        return True

    def process(self, job: aggregation_pb2.AggregationJob) -> None:
        context = JobContext(
            job.population_name,
            job.task_id,
            job.round,
            job.aggregation_id,
            job.model_version,
            job.plan_sha256_hex,
            job.model_architecture,
        )
        keys = JobKeys(self._keys, job)
        inputs: list[tuple[str, str]] = []
        dp = _dp_params(job.dp)
        mean: StreamingMean | DpSum = DpSum(dp, self._noise()) if dp else StreamingMean()
        rejections: Counter[str] = Counter()
        seen: set[str] = set()
        lease_left = (job.lease_expiry_unix_ms / 1000 - time.time()) / 3
        next_extension = time.monotonic() + max(lease_left, 1.0)
        try:
            stream = self._jobs.stream_contributions(
                aggregation_pb2.StreamContributionsRequest(job_id=job.job_id, lease_id=job.lease_id)
            )
            for item in stream:
                inputs.append((item.assignment_id, hashlib.sha256(item.envelope).hexdigest()))
                if item.assignment_id in seen:
                    rejections["duplicate_assignment"] += 1
                    continue
                seen.add(item.assignment_id)
                try:
                    opened = open_contribution(item.envelope, item.assignment_id, context, keys)
                except Rejected as refusal:
                    rejections[refusal.reason] += 1
                    continue
                if isinstance(mean, DpSum):
                    mean.add(opened.update)  # uniform weights under DP: example counts would leak
                else:
                    mean.add(opened.update, float(opened.num_examples))
                if time.monotonic() > next_extension:
                    self._jobs.extend_lease(
                        aggregation_pb2.ExtendLeaseRequest(job_id=job.job_id, lease_id=job.lease_id)
                    )
                    next_extension = time.monotonic() + max(lease_left, 1.0)
        except KeyUnavailable as exc:
            self._fail(job, str(exc), retryable=True)
            return
        except grpc.RpcError as exc:
            self._fail(job, f"contribution stream broke: {exc.code().name}", retryable=True)
            return
        if input_set_digest(inputs) != job.input_set_sha256_hex:
            self._fail(job, "the streamed contributions do not match the job's input set; refused", retryable=False)
            return
        rejected = sum(rejections.values())
        if mean.count == 0:
            self._fail(job, f"no valid contribution among {rejected} ({dict(rejections)})", retryable=False)
            return
        clip_used = next_clip = 0.0
        if isinstance(mean, DpSum):
            try:
                update, next_clip = mean.release()
            except BelowMinimum as exc:
                self._fail(job, str(exc), retryable=False)
                return
            clip_used = job.dp.clip_norm
        else:
            update = mean.mean()
        self._jobs.complete_job(
            aggregation_pb2.CompleteJobRequest(
                job_id=job.job_id,
                lease_id=job.lease_id,
                update=checkpoints.encode(update),
                clip_norm=clip_used,
                next_clip_norm=next_clip,
                accepted_contributions=mean.count,
                rejected_contributions=rejected,
                rejections=[aggregation_pb2.RejectionCount(reason=r, count=c) for r, c in sorted(rejections.items())],
                note=_faulty_note(keys.faulty_providers),
            )
        )
        log.info("job_aggregated", job_id=job.job_id, accepted=mean.count, rejected=rejected)

    def _fail(self, job: aggregation_pb2.AggregationJob, reason: str, retryable: bool) -> None:
        log.warning("job_failing", job_id=job.job_id, reason=reason, retryable=retryable)
        self._jobs.fail_job(
            aggregation_pb2.FailJobRequest(job_id=job.job_id, lease_id=job.lease_id, reason=reason, retryable=retryable)
        )


def _faulty_note(providers: set[str]) -> str:
    if not providers:
        return ""
    return f"key services {sorted(providers)} returned shares that did not verify or rebuild the key"


def _dp_params(msg: aggregation_pb2.DpParams) -> DpParams | None:
    if not msg.enabled:
        return None
    return DpParams(
        clip_norm=msg.clip_norm,
        noise_multiplier=msg.noise_multiplier,
        expected_clients=msg.expected_clients,
        min_clients=msg.min_clients,
        adaptive_clip=msg.adaptive_clip,
        target_unclipped_quantile=msg.target_unclipped_quantile,
        clip_learning_rate=msg.clip_learning_rate,
        clipped_count_stddev=msg.clipped_count_stddev,
    )
