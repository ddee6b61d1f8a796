"""Task management: create, inspect and cancel tasks; list their rounds and model versions."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace

import structlog
import torch

from fedcompute.core import checkpoints, plans, programs
from fedcompute.core.architectures import ARCHITECTURES
from fedcompute.core.blobs import BlobStore
from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.errors import InvalidArgument, NotFound
from fedcompute.core.policy import AccessPolicy, for_task
from fedcompute.core.records import IterationRecord, ModelVersionRecord, TaskRecord
from fedcompute.core.tasks import TaskSpec
from fedcompute.core.transitions import AssignmentStatus, IterationStatus, TaskStatus
from fedcompute.store.assignments import AssignmentRepository, UploadRepository
from fedcompute.store.database import Database
from fedcompute.store.iterations import IterationRepository
from fedcompute.store.ledger import LedgerRepository
from fedcompute.store.model_versions import ModelVersionRepository
from fedcompute.store.tasks import TaskRepository

log = structlog.get_logger("fedcompute.tasks")
MAX_PAGE = 100


def _check_policy(spec: TaskSpec, policy: AccessPolicy | None) -> None:
    if policy is None:
        raise InvalidArgument(
            "access_policy",
            "is missing: register the task's access policy with the key services first "
            "(`fedcompute task create` and the TaskBuilder do both)",
        )
    policy.check()
    expected = for_task(spec, policy.policy_id, policy.allowed_measurements)
    for name in ("population_name", "min_clients", "dp", "aggregation", "version", "plan_sha256_hex"):
        if getattr(expected, name) != getattr(policy, name):
            raise InvalidArgument(
                f"access_policy.policy.{name}",
                f"does not match the spec: the spec implies {getattr(expected, name)!r}, "
                f"the policy says {getattr(policy, name)!r}",
            )


class TaskService:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        clock: Clock,
        ids: IdGenerator,
        max_plan_bytes: int = plans.DEFAULT_MAX_PLAN_BYTES,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._on_change = on_change or (lambda: None)  # tasks opened or closed: check-in's cache forgets
        self._max_plan_bytes = max_plan_bytes
        self._db = db
        self._blobs = blobs
        self._clock = clock
        self._ids = ids

    def create(self, spec: TaskSpec, policy: AccessPolicy | None, signed_policy: bytes) -> TaskRecord:
        """Create a task under its access policy, which the operator registered with the key services first.

        The server only checks that the policy matches the spec (so devices and workers get a coherent task);
        devices and workers check the key services' signatures themselves and trust nothing else."""
        spec.validate()
        spec = spec.resolved()  # DP: validated against the task, noise multiplier calibrated
        _check_policy(spec, policy)
        assert policy is not None
        plan = spec.plan_bytes()
        parsed = plans.parse(plan, self._max_plan_bytes, where="spec.plan")
        programs.check_program(parsed.program, "spec.plan.program")
        if parsed.kind != spec.kind:
            raise InvalidArgument("spec.kind", f"is {spec.kind!r} but the plan is for {parsed.kind!r}")
        if spec.dp and spec.dp.noise_metrics and not parsed.metrics:
            raise InvalidArgument("spec.dp.noise_metrics", "is set but the plan reports no metrics")
        weights = self._initial_weights(spec, parsed)
        checkpoint = checkpoints.encode(weights)
        checkpoint_sha = self._blobs.put(checkpoint)
        now = self._clock.now()
        task_id = self._ids.new_id("task")
        with self._db.transaction() as s:
            tasks = TaskRepository(s)
            tasks.add(
                task_id, spec, plan, hashlib.sha256(plan).hexdigest(), TaskStatus.OPEN, now,
                signed_policy, policy.sha256_hex(), parsed.name, parsed.parameter_count(),
            )  # fmt: skip
            s.flush()
            ModelVersionRepository(s).add(
                ModelVersionRecord(task_id, 1, None, checkpoint_sha, len(checkpoint), "", 0, 0, now)
            )
            clip = spec.dp.l2_clip_norm if spec.dp else None
            IterationRepository(s).open(self._ids, task_id, 1, 1, 1, spec, now, clip)
            tasks.set_progress(task_id, 1, 1, now)
            record = tasks.get(task_id)
        assert record is not None
        log.info("task_created", task_id=task_id, population=spec.population_name, rounds=spec.rounds)
        self._on_change()
        return record

    def _initial_weights(self, spec: TaskSpec, plan: plans.Plan) -> dict[str, torch.Tensor]:
        if spec.initial_weights:
            try:
                tensors = checkpoints.decode(spec.initial_weights)
            except ValueError as exc:
                raise InvalidArgument("spec.initial_weights", str(exc)) from None
        elif spec.model_architecture not in ARCHITECTURES:
            raise InvalidArgument(
                "spec.initial_weights", "is empty: a task with its own plan needs its model's initial weights"
            )
        else:
            tensors = checkpoints.initial_weights(spec.model_architecture, spec.initial_seed)
        try:
            plans.check_tensors(plan.schema(), tensors)
        except ValueError as exc:
            raise InvalidArgument("spec.initial_weights", str(exc)) from None
        return tensors

    def get(self, task_id: str) -> TaskRecord:
        """The task, with the aggregated metrics of each completed round."""
        with self._db.reading() as s:
            record = TaskRepository(s).get(task_id)
            rounds = IterationRepository(s).for_task(task_id) if record else []
        if record is None:
            raise NotFound(f"task {task_id!r} does not exist")
        metrics = tuple(
            (it.round, it.metrics) for it in rounds if it.status == IterationStatus.COMPLETED and it.metrics
        )
        return replace(record, round_metrics=metrics)

    def _require(self, task_id: str) -> None:
        with self._db.reading() as s:
            if TaskRepository(s).get(task_id) is None:
                raise NotFound(f"task {task_id!r} does not exist")

    def page(self, population: str, page_size: int, page_token: str, status: str = "") -> tuple[list[TaskRecord], str]:
        """A page of tasks in id order, of one population and in one status when given ("": any)."""
        if page_size < 0:
            raise InvalidArgument("page_size", "must be >= 0")
        limit = min(page_size or MAX_PAGE, MAX_PAGE)
        with self._db.reading() as s:
            records = TaskRepository(s).page(population, page_token, limit, status)
        next_token = records[-1].task_id if len(records) == limit else ""
        return records, next_token

    def cancel(self, task_id: str, reason: str) -> TaskRecord:
        now = self._clock.now()
        why = reason or "canceled by operator"
        with self._db.transaction() as s:
            tasks = TaskRepository(s)
            record = tasks.get(task_id)
            if record is None:
                raise NotFound(f"task {task_id!r} does not exist")
            if record.status != TaskStatus.OPEN:
                return record  # canceling a finished task changes nothing (idempotent)
            # the round's row first, then the task's, as the sweeper, a job's end and the updater take them when
            # they open a round: one opening an attempt meanwhile has done so when this reads the latest
            iterations = IterationRepository(s)
            current = iterations.lock_current(task_id)
            if not tasks.change_status(task_id, TaskStatus.OPEN, TaskStatus.CANCELED, now, why):
                s.expire_all()  # read again, not the row as first loaded
                finished = tasks.get(task_id)  # ended meanwhile (its last attempt failed, say): nothing to cancel
                assert finished is not None
                return finished
            if current and current.status in (IterationStatus.OPEN, IterationStatus.AGGREGATING):
                iterations.change_status(current.iteration_id, current.status, IterationStatus.CANCELED, now, why)
                assignments = AssignmentRepository(s)
                for a in assignments.open_in_iteration(current.iteration_id):
                    assignments.change_status(a.assignment_id, a.status, AssignmentStatus.CANCELED, now, why)
                UploadRepository(s).abandon_in_iteration(current.iteration_id, now, why)
            updated = tasks.get(task_id)
        assert updated is not None
        log.info("task_canceled", task_id=task_id)
        self._on_change()
        return updated

    def iterations(self, task_id: str) -> list[IterationRecord]:
        self._require(task_id)
        with self._db.reading() as s:
            return IterationRepository(s).for_task(task_id)

    def model_versions(self, task_id: str) -> list[ModelVersionRecord]:
        self._require(task_id)
        with self._db.reading() as s:
            versions = ModelVersionRepository(s).for_task(task_id)
            charged = LedgerRepository(s).by_version(task_id)
        return [
            replace(v, epsilon_spent=charged[v.version][0], clip_norm=charged[v.version][1])
            if v.version in charged
            else v
            for v in versions
        ]
