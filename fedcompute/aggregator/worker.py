"""The aggregator worker loop: claim a job, verify its task's signed access policy and obey it, stream, open and
sum its contributions, complete or fail it. DP noise comes from a fresh key for every job attempt (the OS's
CSPRNG, inside the attested worker): a retried or replayed job is a new release, charged by every key service."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
import structlog
import torch

from fedcompute.aggregator.contributions import JobContext, Rejected
from fedcompute.aggregator.dp import BelowMinimum, DpSum
from fedcompute.aggregator.fedavg import MetricMean, StreamingMean, accumulation_device
from fedcompute.aggregator.keys import BudgetExhausted, JobKeys, KeyAccess, KeyRefused, KeyUnavailable
from fedcompute.aggregator.noise import ChaChaGaussian, NoiseSource, Rehearsed
from fedcompute.aggregator.obey import PolicyConflict, dp_params
from fedcompute.aggregator.opener import LocalEnvelope, Opener, local_envelopes
from fedcompute.clients.typed import AggregationClient, StreamedContribution
from fedcompute.core import checkpoints, plans
from fedcompute.core.context import input_set_digest
from fedcompute.core.errors import InvalidArgument
from fedcompute.core.telemetry import WorkerMetrics
from fedcompute.keys.policy import UntrustedPolicy, check_signed
from fedcompute.v1 import aggregation_pb2, common_pb2

log = structlog.get_logger("fedcompute.aggregator")
# DP noise for the release is drawn while contributions still stream in (8 bytes per parameter held until the
# release) up to this size, 8M parameters; a larger model draws it at the release, as before
NOISE_AHEAD_MAX_BYTES = 64 * 1024 * 1024


class AggregatorWorker:
    def __init__(
        self,
        jobs: AggregationClient,
        keys: KeyAccess,
        worker_id: str,
        noise: Callable[[bytes], NoiseSource] = ChaChaGaussian,
        metrics: WorkerMetrics | None = None,
        device: str | torch.device = "cpu",
        claim_wait_s: float = 0.0,
        blob_dir: Path | None = None,
        max_envelope_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._blob_dir = blob_dir  # the server's blobs on this disk: read there, not streamed (see _contributions)
        self._max_envelope_bytes = max_envelope_bytes
        self._claim_wait_s = claim_wait_s  # how long the server may hold a claim waiting for a job (a long poll)
        self._device = accumulation_device(str(device))  # ValueError now, at start, if this machine lacks it
        self._metrics = metrics or WorkerMetrics.create()
        self._jobs = jobs
        self._keys = keys
        self._noise = noise
        self._worker_id = worker_id

    def run_once(self) -> bool:
        """Claim and process one job. Without one: True if the server held the claim its wait (a long poll: ask
        again at once, the server paces it), False if it answered at once (the loop waits its interval)."""
        began = time.monotonic()
        wait_ms = int(self._claim_wait_s * 1000)
        claimed = self._jobs.claim_job(aggregation_pb2.ClaimJobRequest(worker_id=self._worker_id, wait_ms=wait_ms))
        if not claimed.HasField("job"):
            return wait_ms > 0 and time.monotonic() - began >= self._claim_wait_s / 2
        started = time.monotonic()
        # one request id for the whole job: the server, the key services and the verifier log it with each call
        with structlog.contextvars.bound_contextvars(request_id=f"job-{claimed.job.job_id}-{claimed.job.attempt}"):
            self.process(claimed.job)
        self._metrics.duration.observe(time.monotonic() - started)
        return True

    def process(self, job: aggregation_pb2.AggregationJob) -> None:
        try:
            policy = check_signed(job.access_policy, self._keys.trusted, self._keys.threshold)
            dp = dp_params(policy, job)
        except (UntrustedPolicy, PolicyConflict) as exc:
            self._fail(job, str(exc), retryable=False)
            return
        inputs = [(i.assignment_id, i.envelope_sha256_hex) for i in job.inputs]
        problem = _input_set_problem(inputs, job.input_set_sha256_hex, policy.min_clients)
        if problem:
            self._fail(job, problem, retryable=False)
            return
        if job.plan_sha256_hex != policy.plan_sha256_hex:
            self._fail(job, "the job's plan is not the one the task's signed access policy names; refused", False)
            return
        if hashlib.sha256(job.plan).hexdigest() != job.plan_sha256_hex:
            self._fail(job, "the job's plan does not hash to the plan_sha256_hex its contributions are bound to", False)
            return
        try:
            plan = plans.parse(job.plan, max_bytes=len(job.plan))
        except InvalidArgument as exc:
            self._fail(job, f"the task's plan is refused: {exc}", retryable=False)
            return
        policy_hash = policy.sha256_hex()
        context = JobContext(
            job.population_name,
            job.task_id,
            job.round,
            job.aggregation_id,
            job.model_version,
            job.plan_sha256_hex,
            policy_hash,
            {} if plan.kind == "evaluation" else plan.schema(),
            plan.metrics,
        )
        metrics = MetricMean()
        keys = JobKeys(self._keys, job, policy_hash, inputs, numbered=policy.dp is not None)
        mean: StreamingMean | DpSum = DpSum(dp, self._device) if dp else StreamingMean(self._device)
        rejections: Counter[str] = Counter()
        lease_left = (job.lease_expiry_unix_ms / 1000 - time.time()) / 3
        next_extension = time.monotonic() + max(lease_left, 1.0)
        opener = Opener(inputs, context, keys, self._metrics, norms=isinstance(mean, DpSum))
        ahead: Rehearsed | None = None  # the release's noise, drawn during the stream (DP)
        # this attempt's noise key: fresh, never derived from anything the server chooses or could make repeat
        # (a repeat of a release with the same noise and another clip norm would cancel the noise exactly)
        noise_key = secrets.token_bytes(32)
        looked_ahead = False
        try:
            # the next ones are read, hashed, checked (in order) and opened on other threads while this one is added
            for outcome in opener.outcomes(self._contributions(job, inputs)):
                if outcome is None:
                    self._fail(job, opener.refusal or "the stream is not the job's input set", retryable=False)
                    return
                if isinstance(outcome, Rejected):
                    rejections[outcome.reason] += 1
                elif isinstance(mean, DpSum):
                    mean.add(outcome.update, outcome.metrics, outcome.norm)  # uniform weights: counts would leak
                    if not looked_ahead:  # the sum's tensors are known now
                        ahead, looked_ahead = self._noise_ahead(noise_key, mean), True
                else:
                    mean.add(outcome.update, float(outcome.num_examples))
                    metrics.add(outcome.metrics, outcome.num_examples)  # under DP metrics are left out
                if time.monotonic() > next_extension:
                    self._jobs.extend_lease(
                        aggregation_pb2.ExtendLeaseRequest(job_id=job.job_id, lease_id=job.lease_id)
                    )
                    next_extension = time.monotonic() + max(lease_left, 1.0)
        except KeyRefused as exc:
            self._fail(job, str(exc), retryable=False, budget_exhausted=isinstance(exc, BudgetExhausted))
            return
        except KeyUnavailable as exc:
            self._fail(job, str(exc), retryable=True)
            return
        except grpc.RpcError as exc:
            self._fail(job, f"contribution stream broke: {exc.code().name}", retryable=True)
            return
        except OSError as exc:  # a local envelope gone or replaced since it was looked at: the retry streams it
            self._fail(job, f"a contribution could not be read from the server's blob directory: {exc}", True)
            return
        if opener.matched != len(inputs):
            self._fail(job, f"the stream ended after {opener.matched} of {len(inputs)} contributions", retryable=True)
            return
        rejected = sum(rejections.values())
        if mean.count < policy.min_clients:
            self._fail(
                job,
                f"{mean.count} valid contributions ({rejected} rejected: {dict(rejections)}), fewer than the access "
                f"policy's min_clients ({policy.min_clients}); nothing released",
                retryable=False,
            )
            return
        clip_used = next_clip = 0.0
        if isinstance(mean, DpSum):
            noise = _drawn_ahead(ahead, mean.noise_plan()) or self._noise(noise_key)
            try:
                update, next_clip = mean.release(noise)
            except BelowMinimum as exc:
                self._fail(job, str(exc), retryable=False)
                return
            released = mean.release_metrics(noise)  # noised as the policy says, or none
            clip_used = job.dp.clip_norm
        else:
            update = mean.mean()
            released = metrics.means()
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
                metrics=[common_pb2.MetricValue(name=k, value=v) for k, v in released.items()],
                metric_examples=metrics.examples,
            )
        )
        log.info("job_aggregated", job_id=job.job_id, accepted=mean.count, rejected=rejected, device=str(self._device))
        self._metrics.jobs.labels("completed").inc()
        self._metrics.contributions.labels("accepted").inc(mean.count)
        self._metrics.contributions.labels("rejected").inc(rejected)

    def _contributions(
        self, job: aggregation_pb2.AggregationJob, inputs: list[tuple[str, str]]
    ) -> Iterable[StreamedContribution | LocalEnvelope]:
        """The job's envelopes in input order: read from the server's blob directory where this worker shares its
        disk and every one is there as a regular file of at most the upload limit (the blob store is addressed by
        sha256: ``sha256/ab/cdef...``); else streamed by the server. Either way each is hashed and checked against
        the input set before anything is opened: the directory is the server's store, as untrusted as its stream.
        Read here, an envelope costs neither side the gRPC transfer (the server read, encoded and sent, the worker
        received 4.5 MB each: more CPU than opening and adding it, bench/round_time.py)."""
        if self._blob_dir is not None:
            local, missing = local_envelopes(self._blob_dir, inputs, self._max_envelope_bytes)
            if not missing:
                return local
            log.info("contributions_streamed", job_id=job.job_id, not_local=len(missing), first=missing[0])
        return self._jobs.stream_contributions(
            aggregation_pb2.StreamContributionsRequest(job_id=job.job_id, lease_id=job.lease_id)
        )

    def _noise_ahead(self, key: bytes, mean: DpSum) -> Rehearsed | None:
        """Start drawing the release's noise now, under this attempt's noise key, once the sum's tensors are
        known (``_drawn_ahead`` checks at the release that its calls are the planned ones)."""
        plan = mean.noise_plan()
        if 8 * sum(count for count, _ in plan) > NOISE_AHEAD_MAX_BYTES:
            return None
        return Rehearsed(self._noise(key), plan)

    def _fail(
        self, job: aggregation_pb2.AggregationJob, reason: str, retryable: bool, budget_exhausted: bool = False
    ) -> None:
        log.warning("job_failing", job_id=job.job_id, reason=reason, retryable=retryable)
        self._metrics.jobs.labels("failed").inc()
        self._jobs.fail_job(
            aggregation_pb2.FailJobRequest(
                job_id=job.job_id, lease_id=job.lease_id, reason=reason, retryable=retryable,
                budget_exhausted=budget_exhausted,
            )
        )  # fmt: skip


def _drawn_ahead(ahead: Rehearsed | None, plan: list[tuple[int, float]]) -> Rehearsed | None:
    """The noise drawn during the stream (under the attempt's one noise key), if drawn for the release's calls:
    then it is exactly what a source made now would give; otherwise None (it is dropped, never mixed in)."""
    return ahead if ahead is not None and ahead.plan == plan else None


def _faulty_note(providers: set[str]) -> str:
    if not providers:
        return ""
    return f"key services {sorted(providers)} returned shares that did not verify or rebuild the key"


def _input_set_problem(inputs: list[tuple[str, str]], digest: str, min_clients: int) -> str:
    """Why the job's input set must be refused before anything is asked of the key services ('' if none)."""
    try:
        if input_set_digest(inputs) != digest:
            return "the job's input list does not hash to its input set digest; refused"
    except ValueError as exc:
        return f"the job's input list is refused: {exc}"
    if [a for a, _ in inputs] != sorted({a for a, _ in inputs}):
        return "the job's input list is not in ascending, distinct assignment order; refused"
    if len(inputs) < min_clients:
        return (
            f"the job's input set holds {len(inputs)} contributions; the access policy needs at least {min_clients}; "
            "nothing released"
        )
    return ""
