"""The aggregation job front: leases, the contribution stream, results (workers reach it over gRPC only)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy.orm import Session

from fedcompute.core import checkpoints
from fedcompute.core.blobs import BlobMissing, BlobStore
from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from fedcompute.core.prefetch import prefetched
from fedcompute.core.records import IterationRecord, JobRecord, RoundMetrics, TaskRecord, UploadRecord
from fedcompute.core.telemetry import ServerMetrics
from fedcompute.core.transitions import JobStatus, TaskStatus
from fedcompute.store.assignments import UploadRepository
from fedcompute.store.database import Database
from fedcompute.store.iterations import IterationRepository
from fedcompute.store.jobs import JobRepository
from fedcompute.store.rounds import exhaust_budget, retry_or_fail_round
from fedcompute.store.tasks import TaskRepository

log = structlog.get_logger("fedcompute.jobs")
MAX_CLAIM_WAIT_S = 30.0
# envelopes read ahead of the one being streamed: uploads are not in the page cache (dropped once stored), so each
# read waits on the disk; with one read at a time a 1,000-device bench-1m round streamed in 12.1 s, with two 10.1 s
# (three: 10.5, six: 10.3; 7.8 s when the uploads were still cached)
STREAM_AHEAD = 2


@dataclass(frozen=True)
class RetryLimits:
    job_attempts: int
    round_attempts: int
    backoff_base_s: float
    backoff_max_s: float


@dataclass(frozen=True)
class ClaimedJob:
    job: JobRecord
    iteration: IterationRecord
    task: TaskRecord
    inputs: list[tuple[str, str]]  # (assignment id, envelope sha256), ascending, as streamed
    plan: bytes = b""


MAX_NOTE_CHARS = 4096  # a round's note, as a worker sends it (shown to operators)


@dataclass(frozen=True)
class JobResult:
    update: bytes
    accepted: int
    rejected: int
    rejections: dict[str, int]
    note: str = ""
    clip_norm: float | None = None
    next_clip_norm: float | None = None
    metrics: RoundMetrics | None = None


class JobService:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        clock: Clock,
        ids: IdGenerator,
        lease_s: float,
        limits: RetryLimits,
        metrics: ServerMetrics | None = None,
        recheck_s: float = 1.0,
        on_succeeded: Callable[[], object] | None = None,
    ) -> None:
        self._metrics = metrics or ServerMetrics.create()
        self._recheck_s = recheck_s  # how often a waiting claim looks at the database (jobs queued elsewhere)
        self._on_succeeded = on_succeeded or (lambda: None)  # a job's result is in: the model updater may apply it
        self._queued = threading.Condition()  # notified (``wake_claims``) when this process queues a job
        self._generation = 0  # counts those notifications: a claim that saw none since its look may wait
        self._closed = False
        self._db = db
        self._blobs = blobs
        self._clock = clock
        self._ids = ids
        self._lease = timedelta(seconds=lease_s)
        self._limits = limits

    def wake_claims(self) -> None:
        """A job was queued in this process (a round closed): waiting claims look now."""
        with self._queued:
            self._generation += 1
            self._queued.notify_all()

    def close(self) -> None:
        """Shutting down: waiting claims answer now (no job) and new ones do not wait."""
        with self._queued:
            self._closed = True
            self._queued.notify_all()

    def claim(self, worker_id: str, wait_s: float = 0.0) -> ClaimedJob | None:
        """A claimable job, leased to ``worker_id``; None if there is none, after waiting up to ``wait_s`` (at most
        ``MAX_CLAIM_WAIT_S``) for one: a round closed in this process wakes the wait at once, one closed by
        another replica is seen at the next look (every ``recheck_s``). Waiting holds no database connection."""
        if not worker_id:
            raise InvalidArgument("worker_id", "must name the worker")
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_CLAIM_WAIT_S)
        while True:
            with self._queued:
                seen = self._generation
            claimed = self._claim_now(worker_id)
            left = deadline - time.monotonic()
            if claimed is not None or left <= 0:
                return claimed
            with self._queued:
                if self._closed:
                    return None
                if self._generation == seen:  # nothing queued here since the look: wait for it, or look again
                    self._queued.wait(min(left, self._recheck_s))

    def _claim_now(self, worker_id: str) -> ClaimedJob | None:
        now = self._clock.now()
        with self._db.reading() as s:  # most looks find nothing: no write lock (and no disk flush) for those
            if not JobRepository(s).claimable(now):
                return None
        with self._db.transaction() as s:
            jobs = JobRepository(s)
            for candidate in jobs.claimable(now):
                if candidate.status == JobStatus.RUNNING and candidate.attempts >= self._limits.job_attempts:
                    self._give_up(s, candidate, now)  # every attempt's worker died or hung holding it
                    continue
                if jobs.take_lease(candidate, worker_id, self._ids.new_id("lease"), now + self._lease, now):
                    # the task read under a share lock, after the job's (the order every job path takes): a cancel
                    # committing meanwhile is seen, or waits for this claim and then finds the job leased
                    status = TaskRepository(s).status_shared(candidate.task_id)
                    if status != TaskStatus.OPEN:  # canceled while its round aggregated: no worker asks the key
                        why = f"task {str(status).lower()}: not aggregated"  # services to release (and charge)
                        jobs.change_status(candidate.job_id, JobStatus.RUNNING, JobStatus.FAILED, now, why, error=why)
                        log.info("job_dropped", job_id=candidate.job_id, task_id=candidate.task_id, reason=why)
                        continue
                    if candidate.status == JobStatus.RUNNING:  # a crashed or stuck worker's lease ran out
                        self._metrics.lease_expiries.inc()
                    job = jobs.get(candidate.job_id)
                    iteration = IterationRepository(s).get(candidate.iteration_id)
                    task = TaskRepository(s).get(candidate.task_id)
                    assert job is not None
                    assert iteration is not None
                    assert task is not None
                    uploads = UploadRepository(s).completed_in_iteration(candidate.iteration_id)
                    inputs = [(u.assignment_id, u.blob_sha256 or "") for u in uploads]
                    log.info("job_claimed", job_id=job.job_id, worker=worker_id, attempt=job.attempts)
                    return ClaimedJob(job, iteration, task, inputs, TaskRepository(s).plan(task.task_id) or b"")
        return None

    def _give_up(self, s: Session, job: JobRecord, now: datetime) -> None:
        """A job whose lease ran out on its last allowed attempt (``job_attempts``): failed, not leased again, and its
        round retried or failed, as ``fail`` does for a worker that reports. Without this a job that kills every
        worker taking it (too large for their memory, say) was re-leased forever and its round never ended."""
        if not JobRepository(s).holds_lease(job.job_id, job.lease_id or "", expired_before=now):
            return  # taken or extended meanwhile (another replica's claim, a live worker): not ours to end
        reason = (
            f"the job's lease ran out on each of its {job.attempts} attempts (their workers died or hung holding it); "
            "not leased again"
        )
        self._fail_for_good(s, job, reason, now)
        self._metrics.lease_expiries.inc()

    def _fail_for_good(self, s: Session, job: JobRecord, reason: str, now: datetime) -> None:
        """The job FAILED (its lease the caller's, checked under the row lock) and its round retried, or its task
        failed after too many attempts."""
        JobRepository(s).change_status(job.job_id, JobStatus.RUNNING, JobStatus.FAILED, now, reason, error=reason)
        iterations = IterationRepository(s)
        iterations.set_note(job.iteration_id, f"aggregation failed: {reason}")
        iteration = iterations.get(job.iteration_id)
        assert iteration is not None
        retry_or_fail_round(s, self._ids, iteration, self._limits.round_attempts, reason, now)
        log.warning("job_failed", job_id=job.job_id, reason=reason)

    def count_by_status(self) -> dict[str, int]:
        """How many jobs are in each status (the queue-depth gauge, read at scrape time)."""
        with self._db.reading() as s:
            return JobRepository(s).count_by_status()

    def extend(self, job_id: str, lease_id: str) -> int:
        now = self._clock.now()
        expiry = now + self._lease
        with self._db.transaction() as s:
            if not JobRepository(s).extend_lease(job_id, lease_id, expiry, now):
                raise _not_leased(job_id)
        return int(expiry.timestamp() * 1000)

    def _leased(self, job_id: str, lease_id: str) -> JobRecord:
        with self._db.transaction() as s:
            job = JobRepository(s).get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} does not exist")
        if job.status != JobStatus.RUNNING or job.lease_id != lease_id:
            raise _not_leased(job_id)
        return job

    def contributions(self, job_id: str, lease_id: str) -> Iterator[tuple[str, bytes]]:
        """The job's fixed input set, one encrypted envelope at a time, the next ``STREAM_AHEAD`` read on
        background threads while one is sent: at most three are held, whatever the cohort. Not hashed here: the
        worker hashes every envelope against the input set (it must, the server being untrusted) and fails the job
        naming the first that differs; hashing here too cost the server 2.6 ms of CPU per 4 MiB, ~0.25 s of a
        100-device round."""
        job = self._leased(job_id, lease_id)
        with self._db.transaction() as s:
            uploads = UploadRepository(s).completed_in_iteration(job.iteration_id)
        return prefetched(uploads, self._envelope, ahead=STREAM_AHEAD)

    def _envelope(self, upload: UploadRecord) -> tuple[str, bytes]:
        try:
            return upload.assignment_id, self._blobs.get(upload.blob_sha256 or "", verify=False, once=True)
        except BlobMissing as exc:  # the worker fails the job; its retry meets the same loss
            log.error("contribution_unreadable", assignment_id=upload.assignment_id, error=str(exc))
            raise DataLoss(f"the envelope of {upload.assignment_id} cannot be read back: {exc}") from None

    def complete(self, job_id: str, lease_id: str, result: JobResult) -> str:
        """Record the job's result under the caller's lease. The lease is checked again in the transaction that
        records it, its row locked: a worker whose lease ran out and was taken over meanwhile (the decode and the
        blob's fsync lie between) is refused, never recorded over the new attempt. A repeat of the call under the
        lease that completed the job (a retry after a lost answer) answers SUCCEEDED again, recording nothing."""
        if result.rejected < 0 or any(count < 0 for count in result.rejections.values()):
            raise InvalidArgument("rejected_contributions", "counts must be >= 0")
        if len(result.note) > MAX_NOTE_CHARS:
            raise InvalidArgument("note", f"must be at most {MAX_NOTE_CHARS} characters")
        with self._db.reading() as s:
            if _completed_before(JobRepository(s).get(job_id), lease_id, result):
                return JobStatus.SUCCEEDED
        job = self._leased(job_id, lease_id)
        try:
            checkpoints.decode(result.update)
        except ValueError as exc:
            raise InvalidArgument("update", str(exc)) from None
        if result.accepted <= 0:
            raise InvalidArgument("accepted_contributions", "a job with no accepted contribution must be failed")
        update_sha = self._blobs.put(result.update)
        now = self._clock.now()
        with self._db.transaction() as s:
            if not JobRepository(s).holds_lease(job_id, lease_id):
                if _completed_before(JobRepository(s).get(job_id), lease_id, result):
                    return JobStatus.SUCCEEDED  # a repeat that overlapped the call that completed it
                raise _not_leased(job_id)
            done = JobRepository(s).change_status(
                job_id,
                JobStatus.RUNNING,
                JobStatus.SUCCEEDED,
                now,
                accepted=result.accepted,
                rejected=result.rejected,
                rejections_json=json.dumps(result.rejections, sort_keys=True),
                update_sha256=update_sha,
                clip_norm=result.clip_norm,
                next_clip_norm=result.next_clip_norm,
            )
            if not done:
                raise FailedPrecondition(f"job {job_id!r} changed while completing; it was not recorded")
            IterationRepository(s).set_outcome(
                job.iteration_id, result.accepted, result.rejected, result.note, result.metrics
            )
        log.info("job_succeeded", job_id=job_id, accepted=result.accepted, rejected=result.rejected)
        self._on_succeeded()
        return JobStatus.SUCCEEDED

    def fail(self, job_id: str, lease_id: str, reason: str, retryable: bool, budget_exhausted: bool = False) -> str:
        """Fail the job under the caller's lease: requeued (retryable, attempts left) or failed with its round
        retried or failed. The lease is checked again in the transaction that changes the job, its row locked: a
        worker whose lease was taken over meanwhile changes nothing, neither the new attempt nor the round. A repeat
        of the call under the lease it ended (a retry after a lost answer) answers the job's status again, PENDING
        (requeued) or FAILED, and changes nothing: a requeued job keeps the lease id it was failed under until a
        claim replaces it. ``budget_exhausted`` (the key services refused the release for the task's privacy
        budget): the round is failed and the task ends BUDGET_EXHAUSTED, no attempt reopened."""
        with self._db.reading() as s:
            if before := _failed_before(JobRepository(s).get(job_id), lease_id):
                return before
        job = self._leased(job_id, lease_id)
        now = self._clock.now()
        with self._db.transaction() as s:
            jobs = JobRepository(s)
            iterations = IterationRepository(s)
            if not jobs.holds_lease(job_id, lease_id):
                if before := _failed_before(jobs.get(job_id), lease_id):
                    return before  # a repeat that overlapped the call that failed it (a retry after a deadline)
                raise _not_leased(job_id)
            if budget_exhausted:
                reason = f"the key services refused the release, the task's privacy budget spent: {reason}"
                exhaust_budget(s, job_id, JobStatus.RUNNING, job.iteration_id, reason, now)
                return JobStatus.FAILED
            if retryable and job.attempts < self._limits.job_attempts:
                backoff = min(self._limits.backoff_base_s * 2 ** (job.attempts - 1), self._limits.backoff_max_s)
                jobs.change_status(
                    job_id, JobStatus.RUNNING, JobStatus.PENDING, now, reason,
                    error=reason, not_before=now + timedelta(seconds=backoff),
                )  # fmt: skip
                iterations.set_note(job.iteration_id, f"waiting to retry aggregation: {reason}")
                log.warning("job_requeued", job_id=job_id, reason=reason, backoff_s=backoff)
                return JobStatus.PENDING
            self._fail_for_good(s, job, reason, now)
        return JobStatus.FAILED


def _completed_before(found: JobRecord | None, lease_id: str, result: JobResult) -> bool:
    """Whether ``found`` was completed under ``lease_id`` (then a CompleteJob under it is a repeat): with this
    result, True; with another, refused."""
    if found is None or found.lease_id != lease_id or found.status not in (JobStatus.SUCCEEDED, JobStatus.APPLIED):
        return False
    if found.update_sha256 != hashlib.sha256(result.update).hexdigest():
        raise FailedPrecondition(f"job {found.job_id!r} was completed under this lease with another result")
    return True


def _failed_before(found: JobRecord | None, lease_id: str) -> str:
    """``found``'s status if a FailJob under ``lease_id`` ended its attempt (requeued or failed), else ""."""
    if found is not None and found.lease_id == lease_id and found.status in (JobStatus.PENDING, JobStatus.FAILED):
        return found.status
    return ""


def _not_leased(job_id: str) -> FailedPrecondition:
    return FailedPrecondition(f"job {job_id!r} is not leased under this lease id (expired or taken over)")
