"""One contract suite for the store, run against SQLite and Postgres alike."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import select

from fedcompute.core.clock import RandomIds
from fedcompute.core.tasks import TaskSpec
from fedcompute.core.transitions import AssignmentStatus, IterationStatus, JobStatus, TaskStatus
from fedcompute.store.admission import Admission, write_admissions
from fedcompute.store.assignments import AssignmentRepository, assignment_record
from fedcompute.store.database import MIGRATIONS, Database
from fedcompute.store.iterations import IterationRepository
from fedcompute.store.jobs import JobRepository
from fedcompute.store.models import AssignmentRow, Base, StatusHistoryRow
from fedcompute.store.tasks import TaskRepository

NOW = datetime(2026, 5, 1, tzinfo=UTC)
SPEC = TaskSpec("pop", "digits-linear-v1", rounds=2, report_goal=3, max_cohort=5)
ids = RandomIds()


def _task_with_round(db: Database) -> tuple[str, str]:
    with db.transaction() as s:
        TaskRepository(s).add("task_a", SPEC, b"{}", "0" * 64, TaskStatus.OPEN, NOW)
        s.flush()
        iteration_id = IterationRepository(s).open(ids, "task_a", 1, 1, 1, SPEC, NOW)
    return "task_a", iteration_id


def test_migrations_match_the_models(db: Database) -> None:
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_migrate_twice_is_a_no_op(db: Database) -> None:
    db.migrate()
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn)
        head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
        assert context.get_current_revision() == head
        assert compare_metadata(context, Base.metadata) == []


def test_admission_cap_holds_under_concurrency(db: Database) -> None:
    _, iteration_id = _task_with_round(db)
    admitted: list[bool] = []
    lock = threading.Lock()

    def admit(n: int) -> None:  # each its own batch: 16 concurrent writes race for the round's 5 slots
        ok = write_admissions(db, [Admission(iteration_id, f"asg_{n}", "task_a", NOW)]) == {f"asg_{n}"}
        with lock:
            admitted.append(ok)

    threads = [threading.Thread(target=admit, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admitted.count(True) == SPEC.max_cohort
    with db.transaction() as s:
        record = IterationRepository(s).get(iteration_id)
    assert record is not None
    assert record.assigned == SPEC.max_cohort


def test_status_change_is_compare_and_set_with_history(db: Database) -> None:
    task_id, iteration_id = _task_with_round(db)
    with db.transaction() as s:
        repo = IterationRepository(s)
        assert repo.change_status(iteration_id, IterationStatus.OPEN, IterationStatus.AGGREGATING, NOW)
        assert not repo.change_status(iteration_id, IterationStatus.OPEN, IterationStatus.AGGREGATING, NOW)
        assert repo.count_upload(iteration_id, NOW) is None  # closed rounds count nothing
    with db.transaction() as s:
        rows = s.scalars(select(StatusHistoryRow).where(StatusHistoryRow.entity_id == iteration_id)).all()
        assert [(r.from_status, r.to_status) for r in rows] == [(None, "OPEN"), ("OPEN", "AGGREGATING")]
        with pytest.raises(ValueError, match="not allowed"):
            IterationRepository(s).change_status(iteration_id, IterationStatus.COMPLETED, IterationStatus.OPEN, NOW)
    with db.transaction() as s:
        assert TaskRepository(s).get(task_id) is not None


def test_one_worker_wins_a_lease_and_expired_leases_are_taken_over(db: Database) -> None:
    _, iteration_id = _task_with_round(db)
    with db.transaction() as s:
        JobRepository(s).add("job_1", iteration_id, "task_a", "f" * 64, 3, NOW)
    with db.transaction() as s:
        jobs = JobRepository(s)
        [job] = jobs.claimable(NOW)
        assert jobs.take_lease(job, "w1", "lease_1", NOW + timedelta(seconds=30), NOW)
        assert not jobs.take_lease(job, "w2", "lease_2", NOW + timedelta(seconds=30), NOW)
    with db.transaction() as s:
        jobs = JobRepository(s)
        assert jobs.claimable(NOW + timedelta(seconds=10)) == []
        [expired] = jobs.claimable(NOW + timedelta(seconds=31))
        later = NOW + timedelta(seconds=31)
        assert jobs.take_lease(expired, "w2", "lease_2", later + timedelta(seconds=30), later)
        assert not jobs.extend_lease("job_1", "lease_1", later, later)
        record = jobs.get("job_1")
    assert record is not None
    assert (record.status, record.lease_owner, record.attempts) == (JobStatus.RUNNING, "w2", 2)


def test_over_selection_adapts_to_the_dropout_of_the_previous_attempt(db: Database) -> None:
    from fedcompute.core.transitions import AssignmentStatus
    from fedcompute.store.assignments import AssignmentRepository
    from fedcompute.store.rounds import next_cohort

    spec = TaskSpec("pop", "digits-linear-v1", rounds=2, report_goal=4, max_cohort=20)
    _, iteration_id = _task_with_round(db)
    with db.transaction() as s:
        assert next_cohort(s, spec, iteration_id) == 20  # nothing observed yet: the task's bound
        assignments = AssignmentRepository(s)
        outcomes = [AssignmentStatus.UPLOADED] * 4 + [AssignmentStatus.TIMED_OUT] * 4 + [AssignmentStatus.LATE] * 3
        for n, status in enumerate(outcomes):
            assignments.add(f"asg_{n}", iteration_id, "task_a", NOW)
            s.flush()
            first = AssignmentStatus.LOCAL_COMPLETED if status == AssignmentStatus.UPLOADED else None
            if first:
                assignments.change_status(f"asg_{n}", AssignmentStatus.ASSIGNED, first, NOW)
            assignments.change_status(f"asg_{n}", first or AssignmentStatus.ASSIGNED, status, NOW)
        # half of those who did not finish in time dropped out (LATE ones are not dropouts): 4 / 0.5 * 1.1
        assert next_cohort(s, spec, iteration_id) == 9
        tight = TaskSpec("pop", "digits-linear-v1", rounds=2, report_goal=4, max_cohort=6)
        assert next_cohort(s, tight, iteration_id) == 6  # never above the task's bound


def test_a_locked_read_of_an_assignment_waits_for_and_sees_what_another_transaction_committed(db: Database) -> None:
    """An upload's start reads its assignment with the row's lock: the read must wait for a concurrent closer's
    change and return the row as committed then (Postgres, read committed), never the session's copy from
    before (which a plain read returns while the session holds the row), or an upload could start on an
    assignment whose round has just closed."""
    if db.is_sqlite:
        pytest.skip("SQLite: a write transaction holds the whole database, so nothing can change under it")
    task_id, iteration_id = _task_with_round(db)
    with db.transaction() as s:
        AssignmentRepository(s).add("asg_x", iteration_id, task_id, NOW)
    closer_holds = threading.Event()
    release = threading.Event()

    def closer() -> None:  # marks the assignment LATE and keeps its transaction open until told
        with db.transaction() as other:
            assert AssignmentRepository(other).change_status(
                "asg_x", AssignmentStatus.ASSIGNED, AssignmentStatus.LATE, NOW, "round closed"
            )
            closer_holds.set()
            release.wait(10)

    with db.transaction() as s:
        held = s.get(AssignmentRow, "asg_x")  # the session keeps its copy of the row
        assert held is not None
        thread = threading.Thread(target=closer)
        thread.start()
        assert closer_holds.wait(10)
        assert AssignmentRepository(s).get("asg_x") == assignment_record(held)  # a plain read: the old copy
        threading.Timer(0.3, release.set).start()
        began = time.monotonic()
        locked = AssignmentRepository(s).get("asg_x", lock=True)  # waits for the closer's commit
        waited = time.monotonic() - began
        thread.join()
    assert locked is not None
    assert locked.status == AssignmentStatus.LATE
    assert waited >= 0.2  # it did wait for the closer's row lock
