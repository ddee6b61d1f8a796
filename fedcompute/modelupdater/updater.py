"""The model updater: version N + server_lr * update -> version N + 1, then the next round opens.

Each new version is safetensors whose single metadata key records its parent's checkpoint sha256, so the
versions form a hash chain back to the initial model.
"""

from __future__ import annotations

import structlog
import torch

from fedcompute.core import checkpoints
from fedcompute.core.blobs import BlobStore
from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.records import JobRecord, ModelVersionRecord
from fedcompute.core.transitions import IterationStatus, JobStatus, TaskStatus
from fedcompute.store.database import Database
from fedcompute.store.iterations import IterationRepository
from fedcompute.store.jobs import JobRepository
from fedcompute.store.model_versions import ModelVersionRepository
from fedcompute.store.rounds import retry_or_fail_round
from fedcompute.store.tasks import TaskRepository

log = structlog.get_logger("fedcompute.modelupdater")


def apply_update(
    base: dict[str, torch.Tensor], update: dict[str, torch.Tensor], server_lr: float
) -> dict[str, torch.Tensor]:
    """θ + η·Δ in float64, stored back as the base's dtype; the update must cover exactly the base's tensors."""
    if set(base) != set(update):
        raise ValueError("the update's tensors do not match the model's")
    out = {}
    for name, tensor in base.items():
        if update[name].shape != tensor.shape:
            raise ValueError(
                f"update tensor {name!r} has shape {tuple(update[name].shape)}, model has {tuple(tensor.shape)}"
            )
        out[name] = (tensor.to(torch.float64) + server_lr * update[name].to(torch.float64)).to(tensor.dtype)
    return out


class ModelUpdater:
    def __init__(self, db: Database, blobs: BlobStore, clock: Clock, ids: IdGenerator, max_attempts: int) -> None:
        self._max_attempts = max_attempts
        self._db = db
        self._blobs = blobs
        self._clock = clock
        self._ids = ids

    def run_once(self) -> int:
        """Apply every succeeded job; return how many versions were published."""
        with self._db.transaction() as s:
            jobs = JobRepository(s).with_status(JobStatus.SUCCEEDED)
        return sum(1 for job in jobs if self.apply(job))

    def apply(self, job: JobRecord) -> bool:
        with self._db.transaction() as s:
            iteration = IterationRepository(s).get(job.iteration_id)
            task = TaskRepository(s).get(job.task_id)
            assert iteration is not None
            assert task is not None
            base = ModelVersionRepository(s).get(job.task_id, iteration.base_model_version)
        assert base is not None
        if iteration.status != IterationStatus.AGGREGATING or task.status != TaskStatus.OPEN:
            self._discard(job, f"round is {iteration.status}, task is {task.status}")
            return False
        try:
            weights = checkpoints.decode(self._blobs.get(base.checkpoint_sha256))
            update = checkpoints.decode(self._blobs.get(job.update_sha256 or ""))
            new_weights = apply_update(weights, update, task.spec.server_learning_rate)
        except ValueError as exc:
            self._discard(job, f"update could not be applied: {exc}")
            return False
        version = base.version + 1
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
        now = self._clock.now()
        with self._db.transaction() as s:
            if not JobRepository(s).change_status(job.job_id, JobStatus.SUCCEEDED, JobStatus.APPLIED, now):
                return False  # another updater applied it
            iterations = IterationRepository(s)
            if not iterations.change_status(
                iteration.iteration_id, IterationStatus.AGGREGATING, IterationStatus.COMPLETED, now
            ):
                raise RuntimeError("round changed state while its update was applied")
            ModelVersionRepository(s).add(
                ModelVersionRecord(
                    task.task_id,
                    version,
                    base.version,
                    sha,
                    len(data),
                    base.checkpoint_sha256,
                    iteration.round,
                    job.accepted,
                    now,
                )
            )
            tasks = TaskRepository(s)
            if iteration.round >= task.spec.rounds:
                tasks.set_progress(task.task_id, iteration.round, version, now)
                tasks.change_status(task.task_id, TaskStatus.OPEN, TaskStatus.COMPLETED, now, "all rounds done")
            else:
                iterations.open(self._ids, task.task_id, iteration.round + 1, 1, version, task.spec, now)
                tasks.set_progress(task.task_id, iteration.round + 1, version, now)
        log.info("model_published", task_id=task.task_id, version=version, round=iteration.round)
        return True

    def _discard(self, job: JobRecord, reason: str) -> None:
        """Fail the job; a round still aggregating is retried (or its task failed after too many attempts)."""
        now = self._clock.now()
        with self._db.transaction() as s:
            if not JobRepository(s).change_status(job.job_id, JobStatus.SUCCEEDED, JobStatus.FAILED, now, reason):
                return
            iteration = IterationRepository(s).get(job.iteration_id)
            if iteration is not None and iteration.status == IterationStatus.AGGREGATING:
                retry_or_fail_round(s, self._ids, iteration, self._max_attempts, reason, now)
        log.warning("update_discarded", job_id=job.job_id, reason=reason)
