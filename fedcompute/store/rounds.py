"""Round lifecycle across repositories: the collector closing a round at its report goal, and round retries.

Runs inside the transaction that finishes an upload, so the input set is fixed the moment the round leaves
OPEN (no later upload can be counted: ``count_upload`` only counts while the round is OPEN).
"""

from __future__ import annotations

import math
from datetime import datetime

import structlog
from sqlalchemy.orm import Session

from fedcompute.core.clock import IdGenerator
from fedcompute.core.context import input_set_digest
from fedcompute.core.records import IterationRecord
from fedcompute.core.tasks import TaskSpec
from fedcompute.core.transitions import AssignmentStatus, IterationStatus, JobStatus, TaskStatus
from fedcompute.store.assignments import AssignmentRepository, UploadRepository
from fedcompute.store.iterations import IterationRepository
from fedcompute.store.jobs import JobRepository
from fedcompute.store.tasks import TaskRepository

log = structlog.get_logger("fedcompute.collector")


def close_round(session: Session, ids: IdGenerator, iteration: IterationRecord, now: datetime) -> str | None:
    """OPEN -> AGGREGATING, stragglers marked LATE, one aggregation job queued. Returns the job id."""
    iterations = IterationRepository(session)
    if not iterations.change_status(iteration.iteration_id, IterationStatus.OPEN, IterationStatus.AGGREGATING, now):
        return None
    assignments = AssignmentRepository(session)
    for straggler in assignments.open_in_iteration(iteration.iteration_id):
        assignments.change_status(
            straggler.assignment_id, straggler.status, AssignmentStatus.LATE, now, "report goal reached"
        )
    upload_rows = UploadRepository(session)
    upload_rows.abandon_in_iteration(iteration.iteration_id, now, "report goal reached")
    uploads = upload_rows.completed_in_iteration(iteration.iteration_id)
    pairs = [(u.assignment_id, u.blob_sha256 or "") for u in uploads]
    job_id = ids.new_id("job")
    JobRepository(session).add(
        job_id, iteration.iteration_id, iteration.task_id, input_set_digest(pairs), len(pairs), now
    )
    log.info("round_closed", task_id=iteration.task_id, round=iteration.round, contributions=len(pairs), job_id=job_id)
    return job_id


def next_cohort(session: Session, spec: TaskSpec, previous_iteration_id: str) -> int:
    """Adaptive over-selection: admit enough devices that, at the success rate the previous attempt saw
    (uploads against uploads + devices that failed or timed out), the report goal is met with 10 % to spare;
    within [report_goal, max_cohort]. Devices turned away as LATE at the close were not dropouts."""
    counts = AssignmentRepository(session).count_by_status(previous_iteration_id)
    uploaded = counts.get(AssignmentStatus.UPLOADED, 0)
    dropped = counts.get(AssignmentStatus.TIMED_OUT, 0) + counts.get(AssignmentStatus.LOCAL_FAILED, 0)
    if uploaded + dropped == 0:
        return spec.max_cohort
    success = max(uploaded / (uploaded + dropped), 0.05)
    wanted = math.ceil(spec.report_goal / success * 1.1)
    return min(max(wanted, spec.report_goal), spec.max_cohort)


def retry_or_fail_round(
    session: Session,
    ids: IdGenerator,
    iteration: IterationRecord,
    max_attempts: int,
    reason: str,
    now: datetime,
    from_status: str = IterationStatus.AGGREGATING,
) -> None:
    """A round attempt failed for good (its aggregation, or its deadline below quorum): open a fresh attempt, or
    fail the task with the reason after too many."""
    iterations = IterationRepository(session)
    if not iterations.change_status(iteration.iteration_id, from_status, IterationStatus.FAILED, now, reason):
        return
    tasks = TaskRepository(session)
    task = tasks.get(iteration.task_id)
    if task is None or task.status != TaskStatus.OPEN:
        return
    if iteration.attempt >= (task.spec.max_round_attempts or max_attempts):
        why = f"round {iteration.round} failed {iteration.attempt} times; last: {reason}"
        tasks.change_status(task.task_id, TaskStatus.OPEN, TaskStatus.FAILED, now, why)
        log.warning("task_failed", task_id=task.task_id, reason=why)
        return
    attempt = iteration.attempt + 1
    base = iteration.base_model_version
    cohort = next_cohort(session, task.spec, iteration.iteration_id)
    iterations.open(ids, task.task_id, iteration.round, attempt, base, task.spec, now, iteration.clip_norm, cohort)
    log.warning("round_reopened", task_id=task.task_id, round=iteration.round, attempt=iteration.attempt + 1)


def exhaust_budget(
    session: Session, job_id: str, job_status: str, iteration_id: str, reason: str, now: datetime
) -> bool:
    """The task's privacy budget is spent (the server's own ledger, or a key service's refusal): the job (in
    ``job_status``) and its round FAILED, the task BUDGET_EXHAUSTED, no attempt reopened (none could be released).
    False, and nothing changed, if the job was no longer in ``job_status``."""
    if not JobRepository(session).change_status(job_id, job_status, JobStatus.FAILED, now, reason, error=reason):
        return False
    iterations = IterationRepository(session)
    iterations.set_note(iteration_id, f"not released: {reason}")
    iterations.change_status(iteration_id, IterationStatus.AGGREGATING, IterationStatus.FAILED, now, reason)
    iteration = iterations.get(iteration_id)
    if iteration is not None:
        TaskRepository(session).change_status(
            iteration.task_id, TaskStatus.OPEN, TaskStatus.BUDGET_EXHAUSTED, now, reason
        )
        log.warning("privacy_budget_exhausted", task_id=iteration.task_id, reason=reason)
    return True
