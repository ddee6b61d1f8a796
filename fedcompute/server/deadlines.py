"""The deadline sweeper: rounds always finish.

For every open round (attempt), by its task's deadlines:
- an assignment still ASSIGNED ``local_compute_deadline_s`` after check-in, or still LOCAL_COMPLETED (reported,
  upload unfinished) ``upload_deadline_s`` after reporting, is TIMED_OUT: its slot goes back to the round at once
  and its upload, if any, is abandoned (late reports get RESULT_NOT_NEEDED, late uploads FAILED_PRECONDITION);
- at ``round_deadline_s`` after the attempt opened, what has arrived is aggregated if it reaches the access
  policy's min_clients; otherwise the attempt fails and the round is retried as a new attempt, and after
  ``max_round_attempts`` the task fails with the reason.

Every change is a compare-and-set taken after the round's row lock (the same lock order as uploads and the
collector), so one sweeper can run in every server replica.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial

import structlog

from fedcompute.core.clock import Clock, IdGenerator
from fedcompute.core.records import IterationRecord
from fedcompute.core.tasks import TaskSpec
from fedcompute.core.telemetry import ServerMetrics
from fedcompute.core.transitions import AssignmentStatus, IterationStatus
from fedcompute.store.assignments import AssignmentRepository, UploadRepository
from fedcompute.store.database import Database, Session
from fedcompute.store.iterations import IterationRepository
from fedcompute.store.rounds import close_round, retry_or_fail_round
from fedcompute.store.tasks import TaskRepository

log = structlog.get_logger("fedcompute.deadlines")


def _anything_due(s: Session, iteration: IterationRecord, opened: datetime, spec: TaskSpec, now: datetime) -> bool:
    if now >= opened + timedelta(seconds=spec.round_deadline_s):
        return True
    assignments = AssignmentRepository(s)
    return bool(
        assignments.overdue(
            iteration.iteration_id, AssignmentStatus.ASSIGNED, now - timedelta(seconds=spec.local_compute_deadline_s)
        )
        or assignments.overdue(
            iteration.iteration_id, AssignmentStatus.LOCAL_COMPLETED, now - timedelta(seconds=spec.upload_deadline_s)
        )
    )


class DeadlineSweeper:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        ids: IdGenerator,
        max_round_attempts: int,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self._metrics = metrics or ServerMetrics.create()
        self._db = db
        self._clock = clock
        self._ids = ids
        self._max_attempts = max_round_attempts

    def run_once(self) -> int:
        """Sweep every open round once; return how many changes were made."""
        now = self._clock.now()
        with self._db.reading() as s:  # a read: the write lock is taken only for rounds with work due
            due = [
                (iteration, opened, task.spec)
                for iteration, opened in IterationRepository(s).open_ones()
                if (task := TaskRepository(s).get(iteration.task_id)) is not None
                and _anything_due(s, iteration, opened, task.spec, now)
            ]
        changes = 0
        for iteration, opened, spec in due:
            changes += self._db.run(partial(self._sweep, iteration=iteration, opened=opened, spec=spec, now=now))
        return changes

    def _sweep(self, s: Session, iteration: IterationRecord, opened: datetime, spec: TaskSpec, now: datetime) -> int:
        iterations = IterationRepository(s)
        iterations.lock(iteration.iteration_id)
        current = iterations.get(iteration.iteration_id)
        if current is None or current.status != IterationStatus.OPEN:
            return 0
        changes = self._time_out(s, current, AssignmentStatus.ASSIGNED, spec.local_compute_deadline_s, now)
        changes += self._time_out(s, current, AssignmentStatus.LOCAL_COMPLETED, spec.upload_deadline_s, now)
        if now < opened + timedelta(seconds=spec.round_deadline_s):
            return changes
        current = iterations.get(iteration.iteration_id)
        assert current is not None
        quorum = spec.min_clients_or_default()
        if current.completed_uploads >= quorum:
            log.info("round_deadline_aggregating", task_id=current.task_id, round=current.round,
                     uploads=current.completed_uploads)  # fmt: skip
            close_round(s, self._ids, current, now)
            return changes + 1
        reason = (
            f"round {current.round} reached its deadline ({spec.round_deadline_s} s) with "
            f"{current.completed_uploads} uploads, fewer than min_clients ({quorum})"
        )
        self._end_attempt(s, current, reason, now)
        retry_or_fail_round(s, self._ids, current, self._max_attempts, reason, now, IterationStatus.OPEN)
        return changes + 1

    def _time_out(self, s: Session, iteration: IterationRecord, status: str, deadline_s: int, now: datetime) -> int:
        assignments = AssignmentRepository(s)
        overdue = assignments.overdue(iteration.iteration_id, status, now - timedelta(seconds=deadline_s))
        which = "local-compute" if status == AssignmentStatus.ASSIGNED else "upload"
        for assignment_id in overdue:
            if assignments.change_status(assignment_id, status, AssignmentStatus.TIMED_OUT, now, f"{which} deadline"):
                IterationRepository(s).release_slot(iteration.iteration_id, now)
                UploadRepository(s).abandon_in_iteration(iteration.iteration_id, now, "upload deadline", assignment_id)
        if overdue:
            self._metrics.timeouts.inc(len(overdue))
            log.info("assignments_timed_out", task_id=iteration.task_id, round=iteration.round, deadline=which,
                     count=len(overdue))  # fmt: skip
        return len(overdue)

    def _end_attempt(self, s: Session, iteration: IterationRecord, reason: str, now: datetime) -> None:
        assignments = AssignmentRepository(s)
        for a in assignments.open_in_iteration(iteration.iteration_id):
            assignments.change_status(a.assignment_id, a.status, AssignmentStatus.TIMED_OUT, now, reason)
        UploadRepository(s).abandon_in_iteration(iteration.iteration_id, now, reason)
