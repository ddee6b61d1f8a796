"""The model updater: version N + server_lr * update -> version N + 1, then the next round opens.

Each new version is safetensors whose single metadata key records its parent's checkpoint sha256, so the
versions form a hash chain back to the initial model.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import structlog
import torch

from fedcompute.core import checkpoints
from fedcompute.core.blobs import BlobCorrupted, BlobMissing, BlobStore
from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.privacy import DpSpec, epsilon
from fedcompute.core.records import IterationRecord, JobRecord, ModelVersionRecord, TaskRecord
from fedcompute.core.telemetry import UpdaterMetrics
from fedcompute.core.transitions import IterationStatus, JobStatus, TaskStatus
from fedcompute.store.assignments import UploadRepository
from fedcompute.store.database import Database
from fedcompute.store.iterations import IterationRepository
from fedcompute.store.jobs import JobRepository
from fedcompute.store.ledger import Charge, LedgerRepository
from fedcompute.store.model_versions import ModelVersionRepository
from fedcompute.store.references import referenced_blobs
from fedcompute.store.rounds import exhaust_budget, next_cohort, retry_or_fail_round
from fedcompute.store.tasks import TaskRepository

log = structlog.get_logger("fedcompute.modelupdater")
ORPHAN_SWEEP_EVERY = timedelta(minutes=10)
JOB_PAGE = 10  # succeeded jobs read per look (run_once reads every one, a page at a time)


def apply_update(
    base: dict[str, torch.Tensor], update: dict[str, torch.Tensor], server_lr: float
) -> dict[str, torch.Tensor]:
    """θ + η·Δ in float64, stored back as the base's dtype; the update must cover exactly the base's tensors.
    One float64 copy of each tensor, Δ added into it in place (promoted element by element): the four float64
    temporaries of ``θ.double() + η * Δ.double()`` are fresh memory the kernel must fault in and clear, and took
    ~30 ms of a 1M-parameter round's publish here, against ~4 ms in a warm loop."""
    if set(base) != set(update):
        raise ValueError("the update's tensors do not match the model's")
    out = {}
    for name, tensor in base.items():
        if update[name].shape != tensor.shape:
            raise ValueError(
                f"update tensor {name!r} has shape {tuple(update[name].shape)}, model has {tuple(tensor.shape)}"
            )
        total = tensor.to(torch.float64, copy=True)
        total.add_(update[name], alpha=server_lr)
        out[name] = total.to(tensor.dtype)
    return out


class ModelUpdater:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        clock: Clock,
        ids: IdGenerator,
        max_attempts: int,
        upload_retention_s: float = 0.0,
        orphan_grace_s: float = 3600.0,
        metrics: UpdaterMetrics | None = None,
        purge_every_s: float = 0.0,
    ) -> None:
        """``purge_every_s``: the least time between two looks for released envelopes to purge (housekeeping: the
        retention is hours in production; every call of ``run_once`` when 0)."""
        self._metrics = metrics or UpdaterMetrics.create()
        self._max_attempts = max_attempts
        self._retention = timedelta(seconds=upload_retention_s)
        self._orphan_grace = timedelta(seconds=orphan_grace_s)
        self._next_orphan_sweep: datetime | None = None
        self._purge_every = timedelta(seconds=purge_every_s)
        self._next_purge: datetime | None = None
        self._db = db
        self._blobs = blobs
        self._clock = clock
        self._ids = ids

    def run_once(self) -> int:
        """Apply every succeeded job, then purge released envelopes; return how many versions were published. Every
        job is looked at, a page (``JOB_PAGE``) at a time: jobs that keep failing (logged, retried next pass) never
        hold up another task's, however many they are."""
        published, after = 0, ""
        while True:
            with self._db.reading() as s:
                jobs = JobRepository(s).with_status(JobStatus.SUCCEEDED, JOB_PAGE, after)
            for job in jobs:
                try:
                    if self.apply(job):
                        published += 1
                except Exception:
                    log.exception("update_not_applied", job_id=job.job_id, task_id=job.task_id)
            if len(jobs) < JOB_PAGE:
                break
            after = jobs[-1].job_id
        now = self._clock.now()
        if self._next_purge is None or now >= self._next_purge:
            self.purge_uploads()
            self._next_purge = now + self._purge_every
        if self._next_orphan_sweep is None or now >= self._next_orphan_sweep:
            self.sweep_orphans()
            self._next_orphan_sweep = now + ORPHAN_SWEEP_EVERY
        return published

    def sweep_orphans(self) -> int:
        """Delete blobs no row refers to that are older than the grace period: what a process killed between
        storing an upload and the commit that would have counted it left behind. A put of bytes already stored
        sets their stored time to now (the stores' ``put``), so a blob about to be referred to again (an update
        identical to one a crash left unreferenced) is not old: the blobs are listed again once the references
        are read, and only those still old are deleted. What is left: a put of such bytes that lands between that
        second listing and their delete (milliseconds), then commits, refers to a deleted blob."""
        cutoff = self._clock.now() - self._orphan_grace
        stored = self._blobs.stored_before(cutoff)
        if not stored:
            return 0
        with self._db.transaction() as s:
            referenced = referenced_blobs(s)
        candidates = [sha for sha in stored if sha not in referenced]
        still_old = set(self._blobs.stored_before(cutoff)) if candidates else set()
        orphans = [sha for sha in candidates if sha in still_old]
        for sha in orphans:
            self._blobs.delete(sha)
        if orphans:
            log.warning("orphan_blobs_deleted", count=len(orphans))
        return len(orphans)

    def purge_uploads(self) -> int:
        """Delete the encrypted uploads of rounds that were released or abandoned longer ago than the retention:
        once a round is over nothing needs them, and a copy of the disk then holds nothing to decrypt later."""
        now = self._clock.now()
        with self._db.reading() as s:
            due = UploadRepository(s).purgeable(now - self._retention)
        if not due:
            return 0
        for _, blob in due:
            self._blobs.delete(blob)
        with self._db.transaction() as s:  # one for the batch: a crash before it leaves rows a next pass redoes
            UploadRepository(s).mark_purged([upload_id for upload_id, _ in due], now)
        log.info("uploads_purged", count=len(due))
        return len(due)

    def apply(self, job: JobRecord) -> bool:
        with self._db.transaction() as s:
            iteration = IterationRepository(s).get(job.iteration_id)
            task = TaskRepository(s).get(job.task_id)
            assert iteration is not None
            assert task is not None
            base = ModelVersionRepository(s).get(job.task_id, iteration.base_model_version)
            releases = LedgerRepository(s).releases(job.task_id)
        assert base is not None
        if iteration.status != IterationStatus.AGGREGATING or task.status != TaskStatus.OPEN:
            self._discard(job, f"round is {iteration.status}, task is {task.status}")
            return False
        if task.spec.kind == "evaluation":  # metrics only: no new version, but a DP release is still charged
            charge = self._privacy_charge(task, iteration, job, base.version, releases)
            if charge and task.spec.dp and charge.epsilon > task.spec.dp.target_epsilon:
                self._exhausted(job, iteration, task, charge)
                return False
            return self._finish_round(job, iteration, task, base.version, None, charge)
        try:
            weights = checkpoints.decode(self._blobs.get(base.checkpoint_sha256))
        except (BlobMissing, BlobCorrupted) as exc:  # the published model itself: nothing a retried round mends
            raise RuntimeError(f"the base checkpoint of {job.task_id} v{base.version} cannot be read: {exc}") from exc
        try:
            update = checkpoints.decode(self._blobs.get(job.update_sha256 or ""))
            new_weights = apply_update(weights, update, task.spec.server_learning_rate)
        except (ValueError, BlobMissing, BlobCorrupted) as exc:  # a lost or damaged result: the round is retried
            self._discard(job, f"update could not be applied: {exc}")
            return False
        version = base.version + 1
        charge = self._privacy_charge(task, iteration, job, version, releases)
        if charge and task.spec.dp and charge.epsilon > task.spec.dp.target_epsilon:
            self._exhausted(job, iteration, task, charge)
            return False
        data = checkpoints.encode(
            new_weights,
            {
                "task_id": task.task_id,
                "version": version,
                "parent_version": base.version,
                "parent_sha256": base.checkpoint_sha256,
                "round": iteration.round,
            },
        )
        sha = self._blobs.put(data)
        published = ModelVersionRecord(
            task.task_id, version, base.version, sha, len(data), base.checkpoint_sha256, iteration.round, job.accepted,
            self._clock.now(),
        )  # fmt: skip
        return self._finish_round(job, iteration, task, version, published, charge)

    def _finish_round(
        self,
        job: JobRecord,
        iteration: IterationRecord,
        task: TaskRecord,
        version: int,
        published: ModelVersionRecord | None,
        charge: Charge | None = None,
    ) -> bool:
        """One transaction: the job applied, the round completed, the version (if any) published and charged,
        and the next round opened on ``version`` (or the task completed)."""
        now = self._clock.now()
        with self._db.transaction() as s:
            if not JobRepository(s).change_status(job.job_id, JobStatus.SUCCEEDED, JobStatus.APPLIED, now):
                return False  # another updater applied it
            iterations = IterationRepository(s)
            if not iterations.change_status(
                iteration.iteration_id, IterationStatus.AGGREGATING, IterationStatus.COMPLETED, now
            ):
                raise RuntimeError("round changed state while its update was applied")
            opened = iterations.opened_at(iteration.iteration_id)
            if published:
                ModelVersionRepository(s).add(replace(published, created_at=now))
            if charge:
                LedgerRepository(s).charge(charge, now)  # charged before the version is visible
            tasks = TaskRepository(s)
            if iteration.round >= task.spec.rounds:
                tasks.set_progress(task.task_id, iteration.round, version, now)
                tasks.change_status(task.task_id, TaskStatus.OPEN, TaskStatus.COMPLETED, now, "all rounds done")
            else:
                clip = _next_clip(task.spec.dp, job)
                cohort = next_cohort(s, task.spec, iteration.iteration_id)
                iterations.open(self._ids, task.task_id, iteration.round + 1, 1, version, task.spec, now, clip, cohort)
                tasks.set_progress(task.task_id, iteration.round + 1, version, now)
        log.info("round_released", task_id=task.task_id, version=version, round=iteration.round, new=bool(published))
        if published:
            self._metrics.versions.inc()
        if opened is not None:
            self._metrics.round_duration.observe(max(0.0, (now - opened).total_seconds()))
        return True

    def _privacy_charge(
        self, task: TaskRecord, iteration: IterationRecord, job: JobRecord, version: int, releases: int
    ) -> Charge | None:
        """What publishing this version costs: ε after one more release, by the task's accountant."""
        dp = task.spec.dp
        if dp is None:
            return None
        q = dp.sample_rate(task.spec.report_goal)
        spent = epsilon(dp.noise_multiplier, q, releases + 1, dp.target_delta, dp.accountant)
        clip = job.clip_norm or iteration.clip_norm or dp.l2_clip_norm
        return Charge(
            task.task_id, version, iteration.round, spent, dp.target_delta, dp.noise_multiplier, q, dp.accountant, clip
        )

    def _exhausted(self, job: JobRecord, iteration: IterationRecord, task: TaskRecord, charge: Charge) -> None:
        """Refuse the release: the round fails and the task ends as BUDGET_EXHAUSTED."""
        assert task.spec.dp is not None
        reason = (
            f"publishing round {iteration.round} would bring ε to {charge.epsilon:.4g}, "
            f"over the budget {task.spec.dp.target_epsilon:g}; nothing was released"
        )
        now = self._clock.now()
        with self._db.transaction() as s:
            ended = exhaust_budget(s, job.job_id, JobStatus.SUCCEEDED, iteration.iteration_id, reason, now)
        if ended:
            self._metrics.failed_rounds.inc()

    def _discard(self, job: JobRecord, reason: str) -> None:
        """Fail the job; a round still aggregating is retried (or its task failed after too many attempts)."""
        now = self._clock.now()
        with self._db.transaction() as s:
            if not JobRepository(s).change_status(job.job_id, JobStatus.SUCCEEDED, JobStatus.FAILED, now, reason):
                return
            iteration = IterationRepository(s).get(job.iteration_id)
            if iteration is not None and iteration.status == IterationStatus.AGGREGATING:
                retry_or_fail_round(s, self._ids, iteration, self._max_attempts, reason, now)
        self._metrics.failed_rounds.inc()
        log.warning("update_discarded", job_id=job.job_id, reason=reason)


def _next_clip(dp: DpSpec | None, job: JobRecord) -> float | None:
    if dp is None:
        return None
    if dp.adaptive_clip and job.next_clip_norm:
        return job.next_clip_norm
    return dp.l2_clip_norm
